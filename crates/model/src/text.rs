//! Text encodings VMware descriptors come in.

/// windows-1252 bytes 0x80–0x9F (0 where undefined; those map to U+FFFD).
const CP1252_HIGH: [u16; 32] = [
    0x20AC, 0, 0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160, 0x2039,
    0x0152, 0, 0x017D, 0, 0, 0x2018, 0x2019, 0x201C, 0x201D, 0x2022, 0x2013, 0x2014, 0x02DC,
    0x2122, 0x0161, 0x203A, 0x0153, 0, 0x017E, 0x0178,
];

/// Decodes windows-1252 (Latin-1 plus the 0x80–0x9F punctuation block).
pub fn decode_windows_1252(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| match b {
            0x80..=0x9f => {
                char::from_u32(u32::from(CP1252_HIGH[(b - 0x80) as usize])).unwrap_or('\u{fffd}')
            }
            _ => char::from(b),
        })
        .collect()
}

/// Encodes `text` as windows-1252; a character it cannot hold becomes `?`.
pub fn encode_windows_1252(text: &str) -> Vec<u8> {
    text.chars()
        .map(|c| match u32::from(c) {
            n @ (0..=0x7f | 0xa0..=0xff) => n as u8,
            n => CP1252_HIGH
                .iter()
                .position(|&h| h != 0 && u32::from(h) == n)
                .map_or(b'?', |k| 0x80 + k as u8),
        })
        .collect()
}

/// UTF-8 when it is valid, else windows-1252 (what older VMware products
/// on Windows wrote).
pub fn decode_utf8_or_windows_1252(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => decode_windows_1252(bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_1252_high_block_and_latin1() {
        assert_eq!(decode_windows_1252(b"caf\xe9 \x80 \x93x\x94"), "café € “x”");
        assert_eq!(decode_utf8_or_windows_1252("café".as_bytes()), "café");
        let bytes = b"caf\xe9 \x80 \x93x\x94";
        assert_eq!(encode_windows_1252(&decode_windows_1252(bytes)), bytes);
        assert_eq!(encode_windows_1252("\u{4e2d}"), b"?");
    }
}
