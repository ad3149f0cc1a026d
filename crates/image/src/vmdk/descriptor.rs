//! The VMDK text descriptor: header keys, extent lines, the disk database.
//!
//! Parsed losslessly (every line kept, in order) so a descriptor can be
//! rewritten with only the changed lines touched. Accepts LF and CRLF,
//! UTF-8 and windows-1252, and stops at the first NUL (embedded descriptors
//! are NUL padded).

use crate::error::{Ctx, Result};

/// QEMU reads at most this much of a descriptor; so do we.
pub const MAX_DESCRIPTOR_BYTES: usize = vmshift_model::limits::VMDK_DESCRIPTOR_BYTES;

/// How an extent may be accessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadWrite,
    ReadOnly,
    NoAccess,
}

/// The storage behind an extent line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentType {
    /// Raw bytes in a file, from an offset (`FLAT`, ESXi `VMFS`).
    Flat,
    /// Hosted sparse "KDMV" file (`SPARSE`).
    Sparse,
    /// No file: reads as zeros.
    Zero,
    /// ESXi "COWD" delta (`VMFSSPARSE`).
    VmfsSparse,
    /// ESXi space-efficient sparse delta (`SESPARSE`).
    SeSparse,
    /// Raw device mappings (`VMFSRDM`, `VMFSRAW`): not image data.
    Device,
}

/// One extent line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    pub access: Access,
    /// Length in 512-byte sectors.
    pub sectors: u64,
    pub kind: ExtentType,
    /// The type word as written (`FLAT`, `VMFS`, `SPARSE`, …).
    pub type_word: String,
    /// The file, as named (relative to the descriptor's folder).
    pub file: Option<String>,
    /// Start sector inside the file (flat extents).
    pub offset: u64,
    /// 1-based line number, for messages.
    pub line: usize,
}

/// A parsed descriptor.
#[derive(Debug, Clone, Default)]
pub struct Descriptor {
    /// Its size in bytes, as read (up to a NUL that ends an embedded one).
    pub len: usize,
    /// Every line as read (without line ends).
    pub lines: Vec<String>,
    pub crlf: bool,
    /// The bytes were windows-1252 (not valid UTF-8): written back so.
    pub windows_1252: bool,
    /// Header keys (`version`, `CID`, `createType`, …) in order.
    pub header: Vec<(String, String)>,
    pub extents: Vec<ExtentLine>,
    /// `ddb.*` keys in order, values unquoted.
    pub ddb: Vec<(String, String)>,
}

impl Descriptor {
    /// Parses descriptor bytes (embedded or a file). `ctx` names the file
    /// for errors; `base` is the byte offset of the text in that file.
    pub(crate) fn parse(bytes: &[u8], ctx: &Ctx, base: u64) -> Result<Descriptor> {
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        let bytes = &bytes[..end];
        if bytes.len() > MAX_DESCRIPTOR_BYTES {
            return Err(ctx.invalid(
                "descriptor",
                base,
                format!(
                    "{} bytes is larger than the 1 MiB a descriptor may have",
                    bytes.len()
                ),
            ));
        }
        let text = decode(bytes);
        let mut d = Descriptor {
            len: bytes.len(),
            crlf: text.contains("\r\n"),
            windows_1252: std::str::from_utf8(bytes).is_err(),
            ..Descriptor::default()
        };
        for (i, raw) in text.split('\n').enumerate() {
            let line = raw.strip_suffix('\r').unwrap_or(raw);
            d.lines.push(line.to_string());
            let lineno = i + 1;
            let t = line.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            if let Some(ext) = parse_extent(t, lineno, ctx, base)? {
                d.extents.push(ext);
                continue;
            }
            let Some((k, v)) = t.split_once('=') else {
                return Err(ctx.invalid(
                    &format!("descriptor line {lineno}"),
                    base,
                    format!(
                        "'{}' is neither key=value nor an extent line",
                        t.escape_debug()
                    ),
                ));
            };
            let key = k.trim().to_string();
            let value = unquote(v.trim()).to_string();
            if key.starts_with("ddb.") {
                d.ddb.push((key, value));
            } else {
                d.header.push((key, value));
            }
        }
        if d.extents.is_empty() {
            return Err(ctx.invalid("descriptor", base, "has no extent lines"));
        }
        Ok(d)
    }

    /// The descriptor's text for a disk of `sectors` sectors: its one
    /// extent line and `ddb.geometry.cylinders` rewritten, every other
    /// line as it was.
    pub(crate) fn resized_text(&self, sectors: u64) -> Option<String> {
        let [ext] = self.extents.as_slice() else {
            return None;
        };
        let mut lines = self.lines.clone();
        let access = match ext.access {
            Access::ReadWrite => "RW",
            Access::ReadOnly => "RDONLY",
            Access::NoAccess => "NOACCESS",
        };
        let file = ext
            .file
            .as_deref()
            .map(|f| format!(" \"{f}\""))
            .unwrap_or_default();
        let offset = if ext.kind == ExtentType::Flat && ext.type_word == "FLAT" {
            format!(" {}", ext.offset)
        } else {
            String::new()
        };
        *lines.get_mut(ext.line.checked_sub(1)?)? =
            format!("{access} {sectors} {}{file}{offset}", ext.type_word);
        Some(self.finish_text(lines, sectors))
    }

    /// The descriptor's text with `extra` extent lines after its last one
    /// (whose size becomes `last_sectors`, when given), for a disk of
    /// `sectors` sectors in all (cylinders follow).
    pub(crate) fn with_more_extents(
        &self,
        extra: &[String],
        sectors: u64,
        last_sectors: Option<u64>,
    ) -> Option<String> {
        let ext = self.extents.last()?;
        let last = ext.line;
        let mut lines = self.lines.clone();
        if last == 0 || last > lines.len() {
            return None;
        }
        if let Some(n) = last_sectors {
            // The last extent line with its new size (same access, type,
            // file and offset).
            let line = &lines[last - 1];
            let t = line.trim_start();
            let (access, rest) = t.split_once(char::is_whitespace)?;
            let rest = rest.trim_start();
            let (_, tail) = rest.split_once(char::is_whitespace)?;
            lines[last - 1] = format!("{access} {n} {}", tail.trim_start());
        }
        for (k, l) in extra.iter().enumerate() {
            lines.insert(last + k, l.clone());
        }
        Some(self.finish_text(lines, sectors))
    }

    /// The descriptor's text with only its first `keep` extent lines (the
    /// last one's size becoming `last_sectors`, when given), for a disk of
    /// `sectors` sectors in all.
    pub(crate) fn truncated_text(
        &self,
        keep: usize,
        last_sectors: Option<u64>,
        last_file: Option<&str>,
        sectors: u64,
    ) -> Option<String> {
        let dropped: Vec<usize> = self.extents.get(keep..)?.iter().map(|e| e.line).collect();
        let mut lines = self.lines.clone();
        if let (Some(n), Some(e)) = (
            last_sectors,
            keep.checked_sub(1).and_then(|k| self.extents.get(k)),
        ) {
            let line = lines.get(e.line.checked_sub(1)?)?;
            let t = line.trim_start();
            let (access, rest) = t.split_once(char::is_whitespace)?;
            let (_, tail) = rest.trim_start().split_once(char::is_whitespace)?;
            let mut tail = tail.trim_start().to_string();
            if let Some(name) = last_file {
                // TYPE "file" [offset]: the quoted name replaced.
                let open = tail.find('"')?;
                let close = open + 1 + tail[open + 1..].find('"')?;
                tail.replace_range(open..=close, &format!("\"{name}\""));
            }
            lines[e.line - 1] = format!("{access} {n} {tail}");
        }
        let lines: Vec<String> = lines
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !dropped.contains(&(i + 1)))
            .map(|(_, l)| l)
            .collect();
        Some(self.finish_text(lines, sectors))
    }

    /// `lines` as descriptor text for a disk of `sectors` sectors: the
    /// geometry's cylinders follow the size; the line ends stay as read.
    fn finish_text(&self, mut lines: Vec<String>, sectors: u64) -> String {
        let num = |k: &str| self.ddb(k).and_then(|v| v.trim().parse::<u64>().ok());
        if let (Some(h), Some(s)) = (num("ddb.geometry.heads"), num("ddb.geometry.sectors")) {
            let cylinders = (sectors / (h * s).max(1)).min(65535);
            for l in &mut lines {
                if l.trim_start().starts_with("ddb.geometry.cylinders") {
                    *l = format!("ddb.geometry.cylinders = \"{cylinders}\"");
                }
            }
        }
        lines.join(if self.crlf { "\r\n" } else { "\n" })
    }

    /// Descriptor text (from the `*_text` methods) as bytes in the
    /// encoding the descriptor came in.
    pub(crate) fn encode(&self, text: &str) -> Vec<u8> {
        match self.windows_1252 {
            true => vmshift_model::text::encode_windows_1252(text),
            false => text.as_bytes().to_vec(),
        }
    }

    /// A header key's value (keys compare case-insensitively).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.header
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    /// A `ddb.*` value.
    pub fn ddb(&self, key: &str) -> Option<&str> {
        self.ddb
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    pub fn create_type(&self) -> &str {
        self.get("createType").unwrap_or("")
    }

    /// A CID field (hex); `ffffffff` when absent.
    pub(crate) fn cid(&self, key: &str, ctx: &Ctx) -> Result<u32> {
        match self.get(key) {
            None => Ok(0xffff_ffff),
            Some(v) => u32::from_str_radix(v.trim(), 16)
                .map_err(|_| ctx.invalid(key, 0, format!("'{v}' is not a hexadecimal content id"))),
        }
    }

    pub fn parent_hint(&self) -> Option<&str> {
        self.get("parentFileNameHint").filter(|s| !s.is_empty())
    }
}

/// UTF-8 when it is valid, else windows-1252 (what older VMware products
/// on Windows wrote).
fn decode(bytes: &[u8]) -> String {
    vmshift_model::text::decode_utf8_or_windows_1252(bytes)
}

fn unquote(v: &str) -> &str {
    v.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(v)
}

/// The first blank-separated word of `s`, and what follows it.
fn next_word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.find(char::is_whitespace) {
        Some(i) => (&s[..i], s[i..].trim_start()),
        None => (s, ""),
    }
}

/// Parses `ACCESS SECTORS TYPE ["FILE" [OFFSET]]`; `None` when the line is
/// not an extent line at all.
fn parse_extent(t: &str, line: usize, ctx: &Ctx, base: u64) -> Result<Option<ExtentLine>> {
    // Fields are separated by any run of blanks.
    let (access_word, rest) = next_word(t);
    let access = match access_word {
        "RW" => Access::ReadWrite,
        "RDONLY" => Access::ReadOnly,
        "NOACCESS" => Access::NoAccess,
        _ => return Ok(None),
    };
    let field = format!("descriptor line {line}");
    let bad = |why: String| ctx.invalid(&field, base, why);
    let (size_word, rest) = next_word(rest);
    let sectors: u64 = size_word
        .parse()
        .map_err(|_| bad(format!("extent size '{size_word}' is not a sector count")))?;
    let (type_word, after) = next_word(rest);
    let kind = match type_word {
        "FLAT" | "VMFS" => ExtentType::Flat,
        "SPARSE" => ExtentType::Sparse,
        "ZERO" => ExtentType::Zero,
        "VMFSSPARSE" => ExtentType::VmfsSparse,
        "SESPARSE" => ExtentType::SeSparse,
        "VMFSRDM" | "VMFSRAW" => ExtentType::Device,
        other => return Err(bad(format!("unknown extent type '{other}'"))),
    };
    let (file, after) = if let Some(q) = after.strip_prefix('"') {
        let close = q
            .find('"')
            .ok_or_else(|| bad("extent file name has no closing quote".into()))?;
        (Some(q[..close].to_string()), q[close + 1..].trim())
    } else if kind == ExtentType::Zero {
        (None, after)
    } else {
        // Before the offset: an unquoted name is not an offset.
        return Err(bad(match after.split_whitespace().next() {
            None => format!("a {type_word} extent needs a quoted file name"),
            Some(name) => format!("extent file name '{name}' is not in double quotes"),
        }));
    };
    let offset = match after.split_whitespace().next() {
        None => 0,
        Some(o) => o
            .parse()
            .map_err(|_| bad(format!("extent offset '{o}' is not a sector number")))?,
    };
    Ok(Some(ExtentLine {
        access,
        sectors,
        kind,
        type_word: type_word.to_string(),
        file,
        offset,
        line,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn ctx() -> Ctx {
        Ctx::new(Path::new("test.vmdk"))
    }

    #[test]
    fn parse_esxi_descriptor_with_crlf_and_spaces() {
        let text = "# Disk DescriptorFile\r\nversion=1\r\nencoding=\"UTF-8\"\r\nCID=fffffffe\r\nparentCID=ffffffff\r\ncreateType=\"vmfs\"\r\n\r\n# Extent description\r\nRW 2048 VMFS \"my disk-flat.vmdk\"\r\n\r\n# The Disk Data Base\r\n#DDB\r\n\r\nddb.adapterType = \"lsilogic\"\r\nddb.uuid = \"60 00 C2 97 ee 00 4e ed-cb 09 ab 10 91 3f 7f 99\"\r\n";
        let d = Descriptor::parse(text.as_bytes(), &ctx(), 0).unwrap();
        assert!(d.crlf);
        assert_eq!(d.create_type(), "vmfs");
        assert_eq!(d.cid("CID", &ctx()).unwrap(), 0xffff_fffe);
        assert_eq!(d.extents.len(), 1);
        assert_eq!(d.extents[0].file.as_deref(), Some("my disk-flat.vmdk"));
        assert_eq!(d.extents[0].kind, ExtentType::Flat);
        assert_eq!(d.ddb("ddb.adapterType"), Some("lsilogic"));
    }

    #[test]
    fn parse_zero_and_offset_extents() {
        let text = "version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW  100\tFLAT \"a.raw\" 7\nRDONLY 50 ZERO\n";
        let d = Descriptor::parse(text.as_bytes(), &ctx(), 0).unwrap();
        assert_eq!(d.extents[0].offset, 7);
        assert_eq!(d.extents[1].kind, ExtentType::Zero);
        assert_eq!(d.extents[1].access, Access::ReadOnly);
    }

    #[test]
    fn parse_stops_at_nul_and_decodes_windows_1252() {
        let mut bytes = b"version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 100 FLAT \"caf\xe9.raw\" 0\n".to_vec();
        bytes.extend_from_slice(&[0u8; 100]);
        let d = Descriptor::parse(&bytes, &ctx(), 0).unwrap();
        assert_eq!(d.extents[0].file.as_deref(), Some("café.raw"));
    }

    #[test]
    fn parse_rejects_garbage_and_unknown_types() {
        assert!(Descriptor::parse(b"version=1\nRW 10 WEIRD \"x\"\n", &ctx(), 0).is_err());
        assert!(Descriptor::parse(b"version=1\nRW ten FLAT \"x\" 0\n", &ctx(), 0).is_err());
        assert!(Descriptor::parse(b"version=1\nthis is not a descriptor\n", &ctx(), 0).is_err());
        assert!(Descriptor::parse(b"version=1\n", &ctx(), 0).is_err());
    }
}
