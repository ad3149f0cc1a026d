//! DMTF programmatic units (DSP0004 appendix C) as OVF writes them:
//! `byte * 2^30`, `byte*10^9`, and the older words `MegaBytes`,
//! `GigaBytes`.

/// Bytes per unit of `units`; `None` when it is not a byte unit this
/// reader knows or the multiplier overflows.
pub(crate) fn bytes_per_unit(units: &str) -> Option<u64> {
    let s: String = units
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    let word = match s.as_str() {
        "" | "byte" | "bytes" => Some(1),
        "kilobytes" | "kilobyte" | "kb" | "kib" => Some(1 << 10),
        "megabytes" | "megabyte" | "mb" | "mib" => Some(1 << 20),
        "gigabytes" | "gigabyte" | "gb" | "gib" => Some(1 << 30),
        "terabytes" | "terabyte" | "tb" | "tib" => Some(1 << 40),
        _ => None,
    };
    if word.is_some() {
        return word;
    }
    let mut parts = s.split('*');
    if !matches!(parts.next(), Some("byte" | "bytes")) {
        return None;
    }
    let mut m: u64 = 1;
    for p in parts {
        let f = match p.split_once('^') {
            Some((b, e)) => b.parse::<u64>().ok()?.checked_pow(e.parse().ok()?)?,
            None => p.parse().ok()?,
        };
        m = m.checked_mul(f)?;
    }
    (m > 0).then_some(m)
}

/// `quantity` (decimal text) × `units`, in bytes; `None` when either does
/// not parse or the product overflows.
pub(crate) fn bytes(quantity: &str, units: Option<&str>) -> Option<u64> {
    let q: u64 = quantity.trim().parse().ok()?;
    q.checked_mul(bytes_per_unit(units.unwrap_or("byte"))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programmatic_units_and_words_parse() {
        assert_eq!(bytes_per_unit("byte * 2^30"), Some(1 << 30));
        assert_eq!(bytes_per_unit("byte*2^20"), Some(1 << 20));
        assert_eq!(bytes_per_unit("byte * 10^9"), Some(1_000_000_000));
        assert_eq!(bytes_per_unit("byte * 1024"), Some(1024));
        assert_eq!(bytes_per_unit("MegaBytes"), Some(1 << 20));
        assert_eq!(bytes_per_unit("byte"), Some(1));
        assert_eq!(bytes("16", Some("byte * 2^30")), Some(16 << 30));
        assert_eq!(bytes("17179869184", None), Some(16 << 30));
    }

    #[test]
    fn nonsense_and_overflow_give_none() {
        assert_eq!(bytes_per_unit("hertz * 10^6"), None);
        assert_eq!(bytes_per_unit("byte * 2^64"), None);
        assert_eq!(bytes_per_unit("byte * 2^"), None);
        assert_eq!(bytes_per_unit("byte * 0"), None);
        assert_eq!(bytes("${disk.size}", Some("byte")), None);
        assert_eq!(bytes("18446744073709551615", Some("byte * 2^1")), None);
    }
}
