//! Reply text: the reply without quoted text and signatures (being written).

/// The trimmed reply of a raw message.
pub fn reply_text(_raw: &[u8]) -> Option<String> {
    None
}
