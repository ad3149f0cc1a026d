use std::fmt;

/// Why a size string was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeError {
    input: String,
    reason: &'static str,
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid size '{}': {}", self.input, self.reason)
    }
}

impl std::error::Error for SizeError {}

/// Parses a size the way `qemu-img` does: a number of bytes, optionally with
/// a fraction and a binary suffix (`b`, `k`/`K`, `M`, `G`, `T`, `P`, `E`;
/// 1 K = 1024 bytes). `10G`, `512M`, `1.5G` and `4096` are all accepted.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let err = |reason| SizeError {
        input: input.to_string(),
        reason,
    };
    let s = input.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.is_empty() {
        return Err(err(
            "expected a number, optionally followed by k, M, G, T, P or E",
        ));
    }
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" | "KiB" => 10,
        "m" | "M" | "MiB" => 20,
        "g" | "G" | "GiB" => 30,
        "t" | "T" | "TiB" => 40,
        "p" | "P" | "PiB" => 50,
        "e" | "E" | "EiB" => 60,
        _ => return Err(err("unknown suffix (expected k, M, G, T, P or E)")),
    };
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    if frac_part.contains('.') || (int_part.is_empty() && frac_part.is_empty()) {
        return Err(err("malformed number"));
    }
    let int: u64 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().map_err(|_| err("number too large"))?
    };
    let unit = 1u64 << shift;
    let mut bytes = int
        .checked_mul(unit)
        .ok_or_else(|| err("number too large"))?;
    if !frac_part.is_empty() {
        if shift == 0 {
            return Err(err("a byte count cannot have a fraction"));
        }
        // Exact for up to 18 fractional digits: frac / 10^digits * unit.
        let digits = frac_part.len().min(18);
        let frac: u128 = frac_part[..digits]
            .parse()
            .map_err(|_| err("malformed fraction"))?;
        let extra = frac * u128::from(unit) / 10u128.pow(digits as u32);
        bytes = bytes
            .checked_add(u64::try_from(extra).map_err(|_| err("number too large"))?)
            .ok_or_else(|| err("number too large"))?;
    }
    Ok(bytes)
}

/// Formats a byte count the way `qemu-img info` prints it: `64 MiB`,
/// `1.5 GiB`, `396 KiB`, `512 B` (three significant digits).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    let mut value = bytes as f64;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    let text = if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    };
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    };
    format!("{text} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_size_suffixes_are_binary() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("0.5k"), Ok(512));
    }

    #[test]
    fn parse_size_rejects_garbage_and_overflow() {
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("10X").is_err());
        assert!(parse_size("1.2.3M").is_err());
        assert!(parse_size("16E").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("1.5").is_err());
    }

    #[test]
    fn format_size_matches_qemu_img_style() {
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(64 << 20), "64 MiB");
        assert_eq!(format_size(405504), "396 KiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
    }
}
