//! RFC 8601 section 5: incoming Authentication-Results headers that claim our authserv-id are
//! forgeries (or stale) and are removed before ours is added. Every other byte stays as it was.

/// Removes every Authentication-Results header whose authserv-id is `authserv_id`
/// (case-insensitive). `None` when there is none, so the caller need not copy the message.
pub fn strip_forged_results(raw: &[u8], authserv_id: &str) -> Option<Vec<u8>> {
    let end = header_end(raw);
    let mut remove: Vec<(usize, usize)> = Vec::new();
    let mut pos = 0;
    while pos < end {
        let field_end = field_end(raw, pos, end);
        if claims(&raw[pos..field_end], authserv_id) {
            remove.push((pos, field_end));
        }
        pos = field_end;
    }
    if remove.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut from = 0;
    for (start, stop) in remove {
        out.extend_from_slice(&raw[from..start]);
        from = stop;
    }
    out.extend_from_slice(&raw[from..]);
    Some(out)
}

/// Offset of the blank line that ends the header section (or the end of the message).
fn header_end(raw: &[u8]) -> usize {
    let mut start = 0;
    while start < raw.len() {
        if raw[start..].starts_with(b"\r\n") || raw[start] == b'\n' {
            return start;
        }
        match memchr::memchr(b'\n', &raw[start..]) {
            Some(i) => start += i + 1,
            None => return raw.len(),
        }
    }
    raw.len()
}

/// End of the field starting at `pos`: its first line and every continuation line.
fn field_end(raw: &[u8], pos: usize, end: usize) -> usize {
    let mut next = pos;
    loop {
        next = match memchr::memchr(b'\n', &raw[next..end]) {
            Some(i) => next + i + 1,
            None => return end,
        };
        if next >= end || !matches!(raw[next], b' ' | b'\t') {
            return next;
        }
    }
}

/// The field is an Authentication-Results header whose authserv-id is `id`.
fn claims(field: &[u8], id: &str) -> bool {
    let Some(colon) = memchr::memchr(b':', field) else {
        return false;
    };
    let name = field[..colon].trim_ascii_end();
    if !name.eq_ignore_ascii_case(b"Authentication-Results") {
        return false;
    }
    let value = skip_cfws(&field[colon + 1..]);
    let found = match value.first() {
        Some(b'"') => quoted(&value[1..]),
        _ => {
            let n = value.iter().position(|b| matches!(b, b';' | b'(' | b' ' | b'\t' | b'\r' | b'\n'));
            value[..n.unwrap_or(value.len())].to_vec()
        }
    };
    let trim = |s: &[u8]| s.strip_suffix(b".").unwrap_or(s).to_vec();
    !found.is_empty() && trim(&found).eq_ignore_ascii_case(&trim(id.as_bytes()))
}

/// Skips folding white space and (nested) comments.
fn skip_cfws(mut s: &[u8]) -> &[u8] {
    loop {
        s = s.trim_ascii_start();
        if s.first() != Some(&b'(') {
            return s;
        }
        let mut depth = 0usize;
        let mut i = 0;
        while i < s.len() {
            match s[i] {
                b'\\' => i += 1,
                b'(' => depth += 1,
                b')' => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        s = s.get(i + 1..).unwrap_or_default();
    }
}

/// The content of a quoted string (after its opening quote), unescaped.
fn quoted(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut it = s.iter();
    while let Some(&b) = it.next() {
        match b {
            b'"' => break,
            b'\\' => out.extend(it.next()),
            b'\r' | b'\n' => {}
            _ => out.push(b),
        }
    }
    out
}
