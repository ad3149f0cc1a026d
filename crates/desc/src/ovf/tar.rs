//! A tar reader that lists members in place: 512-byte headers (v7, ustar,
//! GNU and pax), checksums verified, sizes in octal or base-256, GNU long
//! names (`././@LongLink`) and pax `path`/`size` records. Nothing is
//! extracted: each member is a name, an offset and a size in the archive.
//!
//! Every number is checked before use; every member name is checked to be
//! relative and free of `..`; the number of headers and the size of
//! extended headers are bounded, so a hostile archive costs neither memory
//! nor time in proportion to what its headers claim.

use std::fmt;
use std::fs::File;
use std::io;

/// The most members (files, directories, links) an archive may list.
pub(crate) const MAX_MEMBERS: usize = vmshift_model::limits::OVA_MEMBERS;
/// The longest member name accepted, in bytes.
pub(crate) const MAX_NAME: usize = vmshift_model::limits::OVA_NAME_BYTES;
/// The most headers of any kind (members plus extended headers).
const MAX_HEADERS: usize = 4 * MAX_MEMBERS;
/// The largest pax extended header accepted.
const MAX_PAX: u64 = 64 << 10;
const BLOCK: u64 = 512;

/// Positioned, exact reads (the archive is never read sequentially, so a
/// shared handle needs no seek position).
pub(crate) trait ReadAt {
    /// Fills `buf` from `offset`, or fails.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for File {
    #[cfg(unix)]
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }

    #[cfg(windows)]
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        use std::os::windows::fs::FileExt;
        while !buf.is_empty() {
            match self.seek_read(buf, offset)? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
            }
        }
        Ok(())
    }

    #[cfg(not(any(unix, windows)))]
    fn read_exact_at(&self, _buf: &mut [u8], _offset: u64) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// What is wrong with an archive, and where.
#[derive(Debug)]
pub(crate) struct TarError {
    /// The offset of the header at fault.
    pub offset: u64,
    pub message: String,
}

impl TarError {
    fn new(offset: u64, message: impl Into<String>) -> TarError {
        TarError {
            offset,
            message: message.into(),
        }
    }
}

impl fmt::Display for TarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tar header at offset {}: {}", self.offset, self.message)
    }
}

/// What kind of member an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    File,
    Directory,
    HardLink,
    Symlink,
    Device,
    Fifo,
    /// GNU or pax sparse file: its data is not stored contiguously.
    Sparse,
    /// Any other type flag (contiguous-file `7` counts as a file).
    Other(u8),
}

impl Kind {
    pub(crate) fn describe(self) -> String {
        match self {
            Kind::File => "a file".into(),
            Kind::Directory => "a directory".into(),
            Kind::HardLink => "a hard link".into(),
            Kind::Symlink => "a symbolic link".into(),
            Kind::Device => "a device".into(),
            Kind::Fifo => "a FIFO".into(),
            Kind::Sparse => "a sparse file".into(),
            Kind::Other(t) => format!("an entry of type '{}'", t.escape_ascii()),
        }
    }

    /// Kinds that carry no data; a size on them is refused, since readers
    /// disagree on whether to skip it.
    fn dataless(self) -> bool {
        matches!(
            self,
            Kind::Directory | Kind::HardLink | Kind::Symlink | Kind::Device | Kind::Fifo
        )
    }
}

/// One entry of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The normalized name: relative, `/`-separated, no `.` or `..`.
    pub name: String,
    pub kind: Kind,
    pub header_offset: u64,
    pub data_offset: u64,
    pub size: u64,
}

/// An archive's entries, and whether it ended with the end-of-archive
/// zero block (a missing one is tolerated, as GNU tar does).
#[derive(Debug)]
pub(crate) struct Listing {
    pub entries: Vec<Entry>,
    pub end_marker: bool,
}

/// Extended-header values for the next entry.
#[derive(Default)]
struct Pending {
    long_name: Option<String>,
    pax_path: Option<String>,
    pax_size: Option<u64>,
    pax_sparse: bool,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.long_name.is_none()
            && self.pax_path.is_none()
            && self.pax_size.is_none()
            && !self.pax_sparse
    }
}

/// Lists the entries of the `len`-byte archive `src`.
pub(crate) fn list(src: &(impl ReadAt + ?Sized), len: u64) -> Result<Listing, TarError> {
    let mut entries = Vec::new();
    let mut pending = Pending::default();
    let mut headers = 0usize;
    let mut off = 0u64;
    let mut block = [0u8; BLOCK as usize];
    loop {
        if off >= len {
            if !pending.is_empty() {
                return Err(TarError::new(
                    off,
                    "the archive ends after an extended header, before the member it describes",
                ));
            }
            return Ok(Listing {
                entries,
                end_marker: false,
            });
        }
        if len - off < BLOCK {
            return Err(TarError::new(
                off,
                format!(
                    "the archive ends inside a header ({} of 512 bytes)",
                    len - off
                ),
            ));
        }
        src.read_exact_at(&mut block, off)
            .map_err(|e| TarError::new(off, format!("cannot read the header: {e}")))?;
        if block.iter().all(|&b| b == 0) {
            if !pending.is_empty() {
                return Err(TarError::new(
                    off,
                    "the archive ends after an extended header, before the member it describes",
                ));
            }
            return Ok(Listing {
                entries,
                end_marker: true,
            });
        }
        headers += 1;
        if headers > MAX_HEADERS {
            return Err(TarError::new(
                off,
                format!("more than {MAX_HEADERS} headers; not an OVA"),
            ));
        }
        verify_checksum(&block).map_err(|m| TarError::new(off, m))?;

        let typeflag = block[156];
        let extended = matches!(typeflag, b'L' | b'K' | b'x' | b'g');
        let header_size = numeric(&block[124..136])
            .map_err(|m| TarError::new(off, format!("size field: {m}")))?;
        let size = if extended {
            header_size
        } else {
            pending.pax_size.take().unwrap_or(header_size)
        };
        let data = off + BLOCK;
        let end = data
            .checked_add(size)
            .filter(|&e| e <= len)
            .ok_or_else(|| {
                TarError::new(
                    off,
                    format!(
                        "the entry is truncated: its header says {size} bytes, the archive holds {} after the header",
                        len - data
                    ),
                )
            })?;
        // The last entry's padding may be missing; its data is complete.
        let next = end.div_ceil(BLOCK).saturating_mul(BLOCK).min(len);

        match typeflag {
            b'L' | b'K' => {
                let bytes = read_extended(src, data, size, MAX_NAME as u64 + 1, off)?;
                if typeflag == b'L' {
                    let name = c_string(&bytes);
                    pending.long_name = Some(utf8_name(name, off)?);
                }
            }
            b'x' | b'g' => {
                let bytes = read_extended(src, data, size, MAX_PAX, off)?;
                let mut scratch = Pending::default();
                let target = if typeflag == b'x' {
                    &mut pending
                } else {
                    &mut scratch
                };
                parse_pax(&bytes, target).map_err(|m| TarError::new(off, m))?;
            }
            _ => {
                let raw = match (pending.pax_path.take(), pending.long_name.take()) {
                    (Some(p), _) | (None, Some(p)) => p,
                    (None, None) => header_name(&block).map_err(|m| TarError::new(off, m))?,
                };
                let mut kind = match typeflag {
                    b'0' | 0 | b'7' if raw.ends_with('/') => Kind::Directory,
                    b'0' | 0 | b'7' => Kind::File,
                    b'5' => Kind::Directory,
                    b'1' => Kind::HardLink,
                    b'2' => Kind::Symlink,
                    b'3' | b'4' => Kind::Device,
                    b'6' => Kind::Fifo,
                    b'S' => Kind::Sparse,
                    t => Kind::Other(t),
                };
                if std::mem::take(&mut pending.pax_sparse) {
                    kind = Kind::Sparse;
                }
                if kind.dataless() && size != 0 {
                    return Err(TarError::new(
                        off,
                        format!(
                            "'{raw}' is {} yet claims {size} bytes of data",
                            kind.describe()
                        ),
                    ));
                }
                let name = normalize_name(&raw)
                    .map_err(|m| TarError::new(off, format!("member name '{raw}': {m}")))?;
                if entries.len() >= MAX_MEMBERS {
                    return Err(TarError::new(
                        off,
                        format!("more than {MAX_MEMBERS} members; not an OVA"),
                    ));
                }
                entries.push(Entry {
                    name,
                    kind,
                    header_offset: off,
                    data_offset: data,
                    size,
                });
            }
        }
        off = next;
    }
}

/// The data of an extended header, refused past `max` bytes.
fn read_extended(
    src: &(impl ReadAt + ?Sized),
    data: u64,
    size: u64,
    max: u64,
    off: u64,
) -> Result<Vec<u8>, TarError> {
    if size > max {
        return Err(TarError::new(
            off,
            format!("an extended header of {size} bytes (at most {max} are accepted)"),
        ));
    }
    let mut bytes = vec![0u8; size as usize];
    src.read_exact_at(&mut bytes, data)
        .map_err(|e| TarError::new(off, format!("cannot read the extended header: {e}")))?;
    Ok(bytes)
}

/// The stored checksum must equal the header's byte sum with the checksum
/// field counted as spaces (unsigned, or signed as some old tars wrote).
fn verify_checksum(h: &[u8; 512]) -> Result<(), String> {
    let stored =
        octal(&h[148..156]).map_err(|m| format!("checksum field: {m}; not a tar archive"))?;
    let (mut unsigned, mut signed) = (0u64, 0i64);
    for (i, &b) in h.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    if stored == unsigned || i64::try_from(stored) == Ok(signed) {
        Ok(())
    } else {
        Err(format!(
            "header checksum is {stored:o} but the header sums to {unsigned:o}: not a tar archive, or a corrupt one"
        ))
    }
}

/// A numeric field: octal digits (leading spaces, ended by NUL or space),
/// or GNU base-256 when the high bit of the first byte is set.
fn numeric(f: &[u8]) -> Result<u64, String> {
    match f.first() {
        Some(&b) if b & 0x80 != 0 => {
            if b & 0x40 != 0 {
                return Err("a negative base-256 number".into());
            }
            f[1..].iter().try_fold(u64::from(b & 0x3f), |v, &x| {
                v.checked_mul(256)
                    .and_then(|v| v.checked_add(u64::from(x)))
                    .ok_or_else(|| "a base-256 number past 2^64".to_string())
            })
        }
        _ => octal(f),
    }
}

fn octal(f: &[u8]) -> Result<u64, String> {
    let start = f.iter().position(|&b| b != b' ').unwrap_or(f.len());
    let digits = &f[start..];
    let end = digits
        .iter()
        .position(|&b| b == 0 || b == b' ')
        .unwrap_or(digits.len());
    if digits[end..].iter().any(|&b| b != 0 && b != b' ') {
        return Err(format!("'{}' is not an octal number", f.escape_ascii()));
    }
    digits[..end].iter().try_fold(0u64, |v, &d| {
        if !(b'0'..=b'7').contains(&d) {
            return Err(format!("'{}' is not an octal number", f.escape_ascii()));
        }
        v.checked_mul(8)
            .and_then(|v| v.checked_add(u64::from(d - b'0')))
            .ok_or_else(|| "an octal number past 2^64".to_string())
    })
}

/// The bytes before the first NUL.
fn c_string(b: &[u8]) -> &[u8] {
    &b[..b.iter().position(|&c| c == 0).unwrap_or(b.len())]
}

fn utf8_name(b: &[u8], off: u64) -> Result<String, TarError> {
    String::from_utf8(b.to_vec()).map_err(|_| {
        TarError::new(
            off,
            format!("member name '{}' is not UTF-8", b.escape_ascii()),
        )
    })
}

/// The name of a header: ustar's `prefix/name`, or the name field alone.
fn header_name(h: &[u8; 512]) -> Result<String, String> {
    let name = c_string(&h[0..100]);
    let posix = &h[257..263] == b"ustar\0";
    let prefix = if posix { c_string(&h[345..500]) } else { &[] };
    let mut full = Vec::with_capacity(prefix.len() + 1 + name.len());
    if !prefix.is_empty() {
        full.extend_from_slice(prefix);
        full.push(b'/');
    }
    full.extend_from_slice(name);
    String::from_utf8(full)
        .map_err(|e| format!("member name '{}' is not UTF-8", e.as_bytes().escape_ascii()))
}

/// Reads pax records (`"<len> <key>=<value>\n"`) into `p`: `path`,
/// `size`, and whether the entry is a GNU sparse file.
fn parse_pax(mut rest: &[u8], p: &mut Pending) -> Result<(), String> {
    while !rest.is_empty() {
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let sp = rest
            .iter()
            .position(|&b| b == b' ')
            .ok_or("a pax record without a length")?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("a pax record length that is not a number")?;
        if len <= sp + 2 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err("a pax record whose length does not match its text".into());
        }
        let rec = &rest[sp + 1..len - 1];
        let eq = rec
            .iter()
            .position(|&b| b == b'=')
            .ok_or("a pax record without '='")?;
        let (key, value) = (&rec[..eq], &rec[eq + 1..]);
        match key {
            b"path" if value.is_empty() => p.pax_path = None,
            b"path" => {
                if value.len() > MAX_NAME {
                    return Err(format!("a pax path of {} bytes", value.len()));
                }
                p.pax_path = Some(
                    String::from_utf8(value.to_vec())
                        .map_err(|_| "a pax path that is not UTF-8")?,
                );
            }
            b"size" => {
                p.pax_size = Some(
                    std::str::from_utf8(value)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or("a pax size that is not a number")?,
                );
            }
            k if k.starts_with(b"GNU.sparse.") => p.pax_sparse = true,
            _ => {}
        }
        rest = &rest[len..];
    }
    Ok(())
}

/// Checks a member name and returns it normalized: relative, `/`
/// separated, without empty or `.` components. Absolute names, drive
/// letters, `..` components, backslashes, control characters and names
/// longer than [`MAX_NAME`] are refused.
pub(crate) fn normalize_name(raw: &str) -> Result<String, String> {
    if raw.len() > MAX_NAME {
        return Err(format!("longer than {MAX_NAME} bytes"));
    }
    if raw.chars().any(char::is_control) {
        return Err("contains control characters".into());
    }
    if raw.starts_with('/') || raw.starts_with('\\') {
        return Err("is absolute".into());
    }
    if raw.contains('\\') {
        return Err("contains a backslash".into());
    }
    let b = raw.as_bytes();
    if b.len() >= 2 && b[1] == b':' && b[0].is_ascii_alphabetic() {
        return Err("starts with a drive letter".into());
    }
    let mut parts = Vec::new();
    for c in raw.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err("contains a '..' component".into()),
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return Err("is empty".into());
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalized_or_refused() {
        assert_eq!(normalize_name("./vm.ovf").unwrap(), "vm.ovf");
        assert_eq!(normalize_name("dir//a/./b").unwrap(), "dir/a/b");
        for bad in [
            "/etc/passwd",
            "../evil",
            "a/../../b",
            "..",
            "C:x",
            "a\\b",
            "",
            "./",
            "a\nb",
        ] {
            assert!(normalize_name(bad).is_err(), "{bad:?}");
        }
        assert!(normalize_name(&"a".repeat(MAX_NAME + 1)).is_err());
    }

    #[test]
    fn numeric_fields_parse_octal_and_base_256() {
        assert_eq!(numeric(b"00000001750\0"), Ok(1000));
        assert_eq!(numeric(b"     1750 \0\0"), Ok(1000));
        assert_eq!(numeric(b"\0\0\0\0\0\0\0\0\0\0\0\0"), Ok(0));
        let mut f = [0u8; 12];
        f[0] = 0x80;
        f[7] = 2; // 2 << 32
        assert_eq!(numeric(&f), Ok(2 << 32));
        f[0] = 0xff;
        assert!(numeric(&f).is_err());
        assert!(numeric(b"0000000175x\0").is_err());
        assert!(numeric(b"0000 175000\0").is_err());
        let mut huge = [0xffu8; 12];
        huge[0] = 0x80;
        assert!(numeric(&huge).is_err());
    }

    #[test]
    fn pax_records_give_path_and_size() {
        let mut p = Pending::default();
        parse_pax(
            b"20 path=a/long.vmdk\n16 size=1234567\n11 mtime=1\n",
            &mut p,
        )
        .unwrap();
        assert_eq!(p.pax_path.as_deref(), Some("a/long.vmdk"));
        assert_eq!(p.pax_size, Some(1_234_567));
        for bad in [
            &b"99 path=x\n"[..],
            b"5 path=x\n",
            b"x path\n",
            b"9 pathx\n\n",
        ] {
            assert!(
                parse_pax(bad, &mut Pending::default()).is_err(),
                "{:?}",
                bad.escape_ascii().to_string()
            );
        }
    }
}
