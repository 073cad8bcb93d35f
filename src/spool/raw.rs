//! Chunked blobs in the raw tree, from spools written before segment files (`segments.rs`):
//! they are still read and removed, never written. Key = blob id (BE u64) + chunk index (BE
//! u32); every value is at most 4 KiB.

use sled::Tree;

use super::SpoolError;
use super::keys::id_key;
#[cfg(test)]
use super::keys::{CHUNK, chunk_key};

/// Writes `data` as blob `id`, as spools before segment files did (tests build such spools).
/// An empty blob is one empty chunk, so that a blob that exists can be told from one that
/// does not.
#[cfg(test)]
pub(super) fn write(tree: &Tree, id: u64, data: &[u8]) -> Result<(), SpoolError> {
    if data.is_empty() {
        tree.insert(chunk_key(id, 0), &[][..])?;
        return Ok(());
    }
    for (index, chunk) in data.chunks(CHUNK).enumerate() {
        let index = u32::try_from(index).map_err(|_| SpoolError::Corrupt(format!("blob {id} has too many chunks")))?;
        tree.insert(chunk_key(id, index), chunk)?;
    }
    Ok(())
}

/// Reads blob `id`; `None` when it has no chunk at all.
pub(super) fn read(tree: &Tree, id: u64) -> Result<Option<Vec<u8>>, SpoolError> {
    let mut out = Vec::new();
    let mut expected: u32 = 0;
    for item in tree.scan_prefix(id_key(id)) {
        let (k, v) = item?;
        let index = k.get(8..12).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes);
        if k.len() != 12 || index != Some(expected) {
            return Err(SpoolError::Corrupt(format!("blob {id}: chunk {expected} missing or misplaced")));
        }
        out.extend_from_slice(&v);
        expected = expected.wrapping_add(1);
    }
    Ok(if expected == 0 { None } else { Some(out) })
}

/// Removes blob `id` (best effort cleanup after a failed or duplicate store).
pub(super) fn remove(tree: &Tree, id: u64) -> Result<(), SpoolError> {
    for item in tree.scan_prefix(id_key(id)).keys() {
        tree.remove(item?)?;
    }
    Ok(())
}
