//! LVM2, read-only: the physical volume label, the metadata area and its
//! text (checksums checked), volume groups that span several physical
//! volumes or disks, and linear and striped logical volumes as devices the
//! file-system readers read like partitions. Thin pools, RAID, mirrors,
//! caches, snapshots and VDO are named with their type and not read: read
//! as plain extents they would be misread.
//!
//! Written here from LVM2's on-disk description (lib/format_text/layout.h
//! and the metadata text it writes).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::vfs::{Device, FsKind};
use crate::{Error, Result};

/// The longest metadata text read (LVM's default area is 1 MiB).
const MAX_METADATA: u64 = vmshift_model::limits::LVM_METADATA_BYTES;
/// The deepest nesting of sections in the metadata text.
const MAX_DEPTH: usize = 16;
/// The most segments one logical volume may have.
const MAX_SEGMENTS: usize = vmshift_model::limits::LVM_SEGMENTS;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// LVM's CRC: CRC-32 (reflected, 0xedb88320) from 0xf597a6cf, with no
/// final inversion.
pub fn lvm_crc(data: &[u8]) -> u32 {
    let mut crc = 0xf597_a6cfu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// A value in LVM's metadata text.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// An integer.
    Int(i64),
    /// A string.
    Str(String),
    /// A list of integers and strings.
    List(Vec<Value>),
    /// A section: its keys and values, in order.
    Section(Vec<(String, Value)>),
}

impl Value {
    fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Section(items) => items.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    fn int(&self, key: &str) -> Option<i64> {
        match self.get(key) {
            Some(Value::Int(i)) => Some(*i),
            _ => None,
        }
    }
    fn str(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }
    fn sections(&self) -> Vec<(&str, &Value)> {
        match self {
            Value::Section(items) => items
                .iter()
                .filter(|(_, v)| matches!(v, Value::Section(_)))
                .map(|(k, v)| (k.as_str(), v))
                .collect(),
            _ => Vec::new(),
        }
    }
    fn has_flag(&self, key: &str, flag: &str) -> bool {
        matches!(self.get(key), Some(Value::List(l)) if l.iter().any(|v| *v == Value::Str(flag.into())))
    }
}

/// Parses LVM's metadata text (`key = value`, `name { … }`, lists in
/// `[ … ]`, strings with `\"` escapes, `#` comments) into one section.
pub fn parse_metadata(text: &str) -> std::result::Result<Value, String> {
    let mut p = Parser {
        b: text.as_bytes(),
        at: 0,
    };
    let items = p.items(0)?;
    p.skip();
    if p.at < p.b.len() {
        return Err(format!(
            "unexpected '{}' at byte {}",
            p.b[p.at] as char, p.at
        ));
    }
    Ok(Value::Section(items))
}

struct Parser<'a> {
    b: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn skip(&mut self) {
        while self.at < self.b.len() {
            match self.b[self.at] {
                b' ' | b'\t' | b'\n' | b'\r' | 0 => self.at += 1,
                b'#' => {
                    while self.at < self.b.len() && self.b[self.at] != b'\n' {
                        self.at += 1;
                    }
                }
                _ => break,
            }
        }
    }

    fn ident(&mut self) -> Option<String> {
        let s = self.at;
        while self.at < self.b.len()
            && (self.b[self.at].is_ascii_alphanumeric() || b"_-+.".contains(&self.b[self.at]))
        {
            self.at += 1;
        }
        (self.at > s).then(|| String::from_utf8_lossy(&self.b[s..self.at]).into_owned())
    }

    fn items(&mut self, depth: usize) -> std::result::Result<Vec<(String, Value)>, String> {
        if depth > MAX_DEPTH {
            return Err(format!("sections nested deeper than {MAX_DEPTH}"));
        }
        let mut out = Vec::new();
        loop {
            self.skip();
            if self.at >= self.b.len() || self.b[self.at] == b'}' {
                return Ok(out);
            }
            let at = self.at;
            let key = self
                .ident()
                .ok_or_else(|| format!("a name expected at byte {at}"))?;
            self.skip();
            match self.b.get(self.at) {
                Some(b'{') => {
                    self.at += 1;
                    let inner = self.items(depth + 1)?;
                    self.skip();
                    if self.b.get(self.at) != Some(&b'}') {
                        return Err(format!("section '{key}' is not closed"));
                    }
                    self.at += 1;
                    out.push((key, Value::Section(inner)));
                }
                Some(b'=') => {
                    self.at += 1;
                    self.skip();
                    let v = self.value(true)?;
                    out.push((key, v));
                }
                _ => {
                    return Err(format!(
                        "'=' or '{{' expected after '{key}' at byte {}",
                        self.at
                    ))
                }
            }
        }
    }

    fn value(&mut self, list_ok: bool) -> std::result::Result<Value, String> {
        match self.b.get(self.at) {
            Some(b'"') => {
                self.at += 1;
                let mut s = Vec::new();
                loop {
                    match self.b.get(self.at) {
                        None => return Err("a string is not closed".into()),
                        Some(b'"') => {
                            self.at += 1;
                            break;
                        }
                        Some(b'\\') if self.at + 1 < self.b.len() => {
                            s.push(self.b[self.at + 1]);
                            self.at += 2;
                        }
                        Some(&c) => {
                            s.push(c);
                            self.at += 1;
                        }
                    }
                }
                Ok(Value::Str(String::from_utf8_lossy(&s).into_owned()))
            }
            Some(b'[') if list_ok => {
                self.at += 1;
                let mut l = Vec::new();
                loop {
                    self.skip();
                    match self.b.get(self.at) {
                        Some(b']') => {
                            self.at += 1;
                            return Ok(Value::List(l));
                        }
                        Some(b',') => self.at += 1,
                        None => return Err("a list is not closed".into()),
                        _ => {
                            if l.len() >= 1 << 20 {
                                return Err("a list of more than 2^20 values".into());
                            }
                            l.push(self.value(false)?)
                        }
                    }
                }
            }
            Some(c) if c.is_ascii_digit() || *c == b'-' => {
                let s = self.at;
                self.at += 1;
                while self.at < self.b.len()
                    && (self.b[self.at].is_ascii_digit() || self.b[self.at] == b'.')
                {
                    self.at += 1;
                }
                let t = std::str::from_utf8(&self.b[s..self.at]).unwrap_or("");
                // Floats (rare: none in VG metadata) read as their integer part.
                t.split('.')
                    .next()
                    .and_then(|i| i.parse().ok())
                    .map(Value::Int)
                    .ok_or_else(|| format!("a number expected at byte {s}"))
            }
            _ => Err(format!("a value expected at byte {}", self.at)),
        }
    }
}

/// A physical volume found by its label.
#[derive(Debug, Clone)]
struct Pv {
    /// Its UUID without dashes.
    uuid: String,
    /// Where: the device name of the partition or disk.
    place: String,
    dev: Arc<dyn Device>,
    start: u64,
    len: u64,
    /// The newest metadata text its areas hold, with its checksum checked.
    metadata: Option<String>,
    /// Metadata areas that could not be read (another PV's copy of the
    /// VG's metadata may still serve).
    problems: Vec<String>,
}

/// Reads the label, PV header and metadata of the PV at `[start, start +
/// len)` of `dev`.
fn read_pv(
    dev: &Arc<dyn Device>,
    start: u64,
    len: u64,
    place: &str,
) -> std::result::Result<Pv, String> {
    let mut head = vec![0u8; 4 * 512];
    if len < head.len() as u64 {
        return Err("too small for an LVM label".into());
    }
    dev.read_at(&mut head, start).map_err(|e| e.to_string())?;
    let sector = (0..4)
        .find(|s| {
            let at = s * 512;
            &head[at..at + 8] == b"LABELONE" && &head[at + 24..at + 32] == b"LVM2 001"
        })
        .ok_or("no LABELONE label in the first four sectors")?;
    let label = &head[sector * 512..sector * 512 + 512];
    if lvm_crc(&label[20..]) != le32(label, 16) {
        return Err(format!("label in sector {sector}: checksum mismatch"));
    }
    let off = le32(label, 20) as usize;
    if !(32..=512 - 48).contains(&off) {
        return Err(format!("label in sector {sector}: PV header at {off}"));
    }
    let pvh = &label[off..];
    let uuid = String::from_utf8_lossy(&pvh[..32]).into_owned();
    // Data areas then metadata areas, each list ended by a zero pair.
    let mut at = 40;
    let mut lists: [Vec<(u64, u64)>; 2] = [Vec::new(), Vec::new()];
    for list in &mut lists {
        loop {
            if at + 16 > pvh.len() {
                return Err("PV header: its area lists run past the label sector".into());
            }
            let (o, s) = (le64(pvh, at), le64(pvh, at + 8));
            at += 16;
            if o == 0 && s == 0 {
                break;
            }
            list.push((o, s));
        }
    }
    let mut best: Option<(i64, String)> = None;
    let mut errors = Vec::new();
    for &(mda, size) in &lists[1] {
        match read_mda(dev, start, len, mda, size) {
            Ok(Some(text)) => {
                let seq = parse_metadata(&text)
                    .ok()
                    .and_then(|v| v.sections().first().and_then(|(_, vg)| vg.int("seqno")))
                    .unwrap_or(-1);
                if best.as_ref().is_none_or(|(s, _)| seq > *s) {
                    best = Some((seq, text));
                }
            }
            Ok(None) => {}
            Err(e) => errors.push(format!("metadata area at {mda}: {e}")),
        }
    }
    Ok(Pv {
        problems: errors,
        uuid,
        place: place.to_string(),
        dev: dev.clone(),
        start,
        len,
        metadata: best.map(|(_, t)| t),
    })
}

/// The current metadata text of one metadata area; `None` when it holds
/// none (a PV not in a VG, or an ignored area).
fn read_mda(
    dev: &Arc<dyn Device>,
    start: u64,
    len: u64,
    mda: u64,
    size: u64,
) -> std::result::Result<Option<String>, String> {
    if mda.checked_add(size).is_none_or(|e| e > len) || size < 1024 {
        return Err(format!("{size} bytes do not fit the {len}-byte PV"));
    }
    let mut h = [0u8; 512];
    dev.read_at(&mut h, start + mda)
        .map_err(|e| e.to_string())?;
    if &h[4..20] != b" LVM2 x[5A%r0N*>" {
        return Err("no metadata area magic".into());
    }
    if lvm_crc(&h[4..]) != le32(&h, 0) {
        return Err("metadata area header: checksum mismatch".into());
    }
    let (offset, tsize, csum, flags) = (le64(&h, 40), le64(&h, 48), le32(&h, 56), le32(&h, 60));
    if offset == 0 || flags & 1 != 0 {
        return Ok(None);
    }
    if tsize > MAX_METADATA {
        return Err(format!(
            "metadata text of {tsize} bytes, more than the {MAX_METADATA} vmshift reads"
        ));
    }
    if tsize > size - 512 || offset < 512 || offset >= size {
        return Err(format!(
            "metadata text of {tsize} bytes at {offset} does not fit the {size}-byte area"
        ));
    }
    // A circular buffer after the header: the text may wrap to its start.
    let mut text = vec![0u8; tsize as usize];
    let first = tsize.min(size - offset) as usize;
    dev.read_at(&mut text[..first], start + mda + offset)
        .map_err(|e| e.to_string())?;
    if first < text.len() {
        dev.read_at(&mut text[first..], start + mda + 512)
            .map_err(|e| e.to_string())?;
    }
    if lvm_crc(&text) != csum {
        return Err("metadata text: checksum mismatch".into());
    }
    let end = text.iter().position(|&c| c == 0).unwrap_or(text.len());
    Ok(Some(String::from_utf8_lossy(&text[..end]).into_owned()))
}

/// One run of a logical volume: `len` bytes from LV byte `start`, spread
/// over `stripes` in `stripe` bytes chunks (one stripe: linear).
#[derive(Debug, Clone)]
struct Segment {
    start: u64,
    len: u64,
    stripe: u64,
    stripes: Vec<(Arc<dyn Device>, u64)>,
}

/// A linear or striped logical volume, read as a device.
#[derive(Debug)]
pub struct LogicalVolume {
    size: u64,
    segments: Vec<Segment>,
}

impl Device for LogicalVolume {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let seg = self
                .segments
                .iter()
                .find(|s| s.start <= at && at < s.start + s.len)
                .ok_or_else(|| Error::Fs {
                    place: "LVM".into(),
                    msg: format!(
                        "read at {at} is past the logical volume's {} bytes",
                        self.size
                    ),
                })?;
            let rel = at - seg.start;
            let n_stripes = seg.stripes.len() as u64;
            let chunk = rel / seg.stripe;
            let within = rel % seg.stripe;
            let (dev, base) = &seg.stripes[(chunk % n_stripes) as usize];
            let dev_at = base + (chunk / n_stripes) * seg.stripe + within;
            let n = ((seg.stripe - within).min(seg.start + seg.len - at) as usize)
                .min(buf.len() - done);
            dev.read_at(&mut buf[done..done + n], dev_at)?;
            done += n;
        }
        Ok(())
    }
}

/// A logical volume found: readable, or named with why not.
#[derive(Debug)]
pub struct Lv {
    /// `/dev/VG/LV`, as libguestfs names it.
    pub place: String,
    /// The volume group.
    pub vg: String,
    /// The logical volume.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// The device to read, or why it is not read.
    pub device: std::result::Result<Arc<LogicalVolume>, String>,
}

/// What LVM holds on the physical volumes among `found`: every visible
/// logical volume of every volume group, in VG and metadata order. PVs
/// whose label or metadata is damaged give an error naming them.
pub fn logical_volumes(found: &[crate::vfs::Found]) -> (Vec<Lv>, Vec<String>) {
    let mut pvs = Vec::new();
    let mut problems = Vec::new();
    for f in found.iter().filter(|f| f.info.kind == FsKind::LvmPv) {
        match read_pv(&f.image, f.start, f.len, &f.info.place) {
            Ok(pv) => {
                for p in &pv.problems {
                    problems.push(format!("{}: LVM physical volume: {p}", pv.place));
                }
                pvs.push(pv)
            }
            Err(e) => problems.push(format!("{}: LVM physical volume: {e}", f.info.place)),
        }
    }
    // The newest metadata of each VG (by id), from whichever PV holds it.
    let mut vgs: BTreeMap<String, (i64, String, Value)> = BTreeMap::new();
    for pv in &pvs {
        let Some(text) = &pv.metadata else { continue };
        let meta = match parse_metadata(text) {
            Ok(m) => m,
            Err(e) => {
                problems.push(format!("{}: LVM metadata: {e}", pv.place));
                continue;
            }
        };
        for (name, vg) in meta.sections() {
            let id = vg.str("id").unwrap_or(name).to_string();
            let seq = vg.int("seqno").unwrap_or(0);
            if vgs.get(&id).is_none_or(|(s, _, _)| seq > *s) {
                vgs.insert(id, (seq, name.to_string(), vg.clone()));
            }
        }
    }
    let by_uuid: HashMap<String, &Pv> = pvs.iter().map(|p| (p.uuid.clone(), p)).collect();
    let mut out = Vec::new();
    for (_, (_, vg_name, vg)) in vgs {
        let extent = vg.int("extent_size").unwrap_or(0).max(0) as u64 * 512;
        // The VG's PVs by their metadata name (pv0, pv1…): device, start
        // of the extents, extent count.
        let mut pv_map: PvMap<'_> = HashMap::new();
        if let Some(pvsec) = vg.get("physical_volumes") {
            for (pname, p) in pvsec.sections() {
                let id = p.str("id").unwrap_or("").replace('-', "");
                let r = match by_uuid.get(&id) {
                    None => Err(format!(
                        "its physical volume {pname} ({}) is not on these disks",
                        p.str("device").unwrap_or("?")
                    )),
                    Some(pv) => {
                        let pe_start = p.int("pe_start").unwrap_or(0).max(0) as u64 * 512;
                        let pe_count = p.int("pe_count").unwrap_or(0).max(0) as u64;
                        if extent == 0
                            || pe_count
                                .checked_mul(extent)
                                .and_then(|b| b.checked_add(pe_start))
                                .is_none_or(|e| e > pv.len)
                        {
                            Err(format!(
                                "its physical volume {pname} on {} states {pe_count} extents of {extent} bytes from {pe_start}, more than its {} bytes",
                                pv.place, pv.len
                            ))
                        } else {
                            Ok((pv.dev.clone(), pv.start + pe_start, pe_count))
                        }
                    }
                };
                pv_map.insert(pname, r);
            }
        }
        let Some(lvsec) = vg.get("logical_volumes") else {
            continue;
        };
        for (lv_name, lv) in lvsec.sections() {
            if !lv.has_flag("status", "VISIBLE") {
                continue;
            }
            let (size, device) = assemble(lv, extent, &pv_map);
            out.push(Lv {
                place: format!("/dev/{vg_name}/{lv_name}"),
                vg: vg_name.clone(),
                name: lv_name.to_string(),
                size,
                device,
            });
        }
    }
    (out, problems)
}

/// The segments of one LV, checked: types vmshift reads, PVs present,
/// extents inside their PV, no gaps or overlaps.
type PvMap<'a> = HashMap<&'a str, std::result::Result<(Arc<dyn Device>, u64, u64), String>>;

fn assemble(
    lv: &Value,
    extent: u64,
    pvs: &PvMap<'_>,
) -> (u64, std::result::Result<Arc<LogicalVolume>, String>) {
    let mut segs = Vec::new();
    let mut size = 0u64;
    let mut problem = None;
    let mut sections = lv.sections();
    if sections.len() > MAX_SEGMENTS {
        // Not read in part: a volume missing segments would read as zeros
        // where its data is.
        return (
            0,
            Err(format!(
                "{} segments, more than the {MAX_SEGMENTS} vmshift reads",
                sections.len()
            )),
        );
    }
    sections.sort_by_key(|(_, s)| s.int("start_extent").unwrap_or(0));
    for (sname, s) in sections.iter() {
        let start = s.int("start_extent").unwrap_or(-1);
        let count = s.int("extent_count").unwrap_or(-1);
        if start < 0 || count <= 0 {
            problem.get_or_insert(format!("{sname}: no extent range"));
            continue;
        }
        let (start, count) = (start as u64 * extent, count as u64 * extent);
        if start != size {
            problem.get_or_insert(format!(
                "{sname} starts at byte {start}, where the volume's bytes so far end at {size}"
            ));
        }
        size = start.saturating_add(count).max(size);
        let kind = s.str("type").unwrap_or("?");
        if kind != "striped" {
            problem.get_or_insert(format!("a {kind} volume, which vmshift does not read"));
            continue;
        }
        let stripes = match s.get("stripes") {
            Some(Value::List(l)) => l.clone(),
            _ => Vec::new(),
        };
        let n = stripes.len() / 2;
        if s.int("stripe_count").is_some_and(|c| c != n as i64) || stripes.len() % 2 != 0 {
            problem.get_or_insert(format!(
                "{sname}: stripe_count {} but {} stripes listed",
                s.int("stripe_count").unwrap_or(-1),
                stripes.len() as f64 / 2.0
            ));
            continue;
        }
        let stripe = if n > 1 {
            s.int("stripe_size").unwrap_or(0).max(0) as u64 * 512
        } else {
            count.max(1)
        };
        if n == 0 || stripe == 0 || count % (n as u64) != 0 {
            problem.get_or_insert(format!("{sname}: {n} stripes of {stripe} bytes"));
            continue;
        }
        let per = count / n as u64;
        let mut devs = Vec::new();
        for pair in stripes.chunks(2) {
            let (Value::Str(pname), Value::Int(first)) = (&pair[0], &pair[1]) else {
                problem.get_or_insert(format!("{sname}: a stripe is not a PV name and extent"));
                break;
            };
            match pvs.get(pname.as_str()) {
                None => {
                    problem.get_or_insert(format!("{sname}: no physical volume {pname} in the VG"));
                }
                Some(Err(e)) => {
                    problem.get_or_insert(e.clone());
                }
                Some(Ok((dev, base, pe_count))) => {
                    let first = (*first).max(0) as u64;
                    if first * extent + per > pe_count * extent {
                        problem.get_or_insert(format!(
                            "{sname}: extents from {first} run past {pname}'s {pe_count}"
                        ));
                    }
                    devs.push((dev.clone(), base + first * extent));
                }
            }
        }
        if devs.len() == n {
            segs.push(Segment {
                start,
                len: count,
                stripe,
                stripes: devs,
            });
        }
    }
    match problem {
        Some(p) => (size, Err(p)),
        None if segs.is_empty() => (size, Err("no segments".into())),
        None => (
            size,
            Ok(Arc::new(LogicalVolume {
                size,
                segments: segs,
            })),
        ),
    }
}

/// The file systems on the logical volumes of `found`'s physical volumes,
/// as [`crate::vfs::Found`] entries; a volume that is not read, or holds
/// nothing vmshift knows, is named in `unread` (place, why).
pub fn found_on_lvs(
    found: &[crate::vfs::Found],
) -> (Vec<crate::vfs::Found>, Vec<(String, String)>) {
    let (lvs, problems) = logical_volumes(found);
    let mut unread: Vec<(String, String)> = problems
        .into_iter()
        .map(|p| match p.split_once(": ") {
            Some((a, b)) => (a.to_string(), b.to_string()),
            None => (String::new(), p),
        })
        .collect();
    let mut out = Vec::new();
    for lv in lvs {
        match lv.device {
            Ok(dev) => {
                let dev: Arc<dyn Device> = dev;
                match crate::vfs::probe(&dev, 0, lv.size, &lv.place, None) {
                    Some(info) => out.push(crate::vfs::Found {
                        info,
                        image: dev,
                        start: 0,
                        len: lv.size,
                    }),
                    None => unread.push((lv.place, "no file system vmshift knows".into())),
                }
            }
            Err(why) => unread.push((lv.place, why)),
        }
    }
    (out, unread)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_text_parses() {
        let t = r#"vg0 {
id = "abc-def"
seqno = 3
status = ["RESIZEABLE", "READ", "WRITE"]
extent_size = 8192 # 4 MiB
physical_volumes {
pv0 {
id = "x\"y"
pe_start = 2048
}
}
}
contents = "Text Format Volume Group"
version = 1
creation_time = 1700000000	# Tue
"#;
        let v = parse_metadata(t).unwrap();
        let (name, vg) = v.sections()[0];
        assert_eq!(name, "vg0");
        assert_eq!(vg.int("seqno"), Some(3));
        assert!(vg.has_flag("status", "WRITE"));
        let pv = vg.get("physical_volumes").unwrap().get("pv0").unwrap();
        assert_eq!(pv.str("id"), Some("x\"y"));
        assert_eq!(v.int("version"), Some(1));
        for bad in ["a {", "a = ", "a = \"x", "a = [1, 2", "= 1", "a b"] {
            assert!(parse_metadata(bad).is_err(), "{bad}");
        }
        let deep = "a {".repeat(100) + &"}".repeat(100);
        assert!(parse_metadata(&deep).is_err());
    }

    #[test]
    fn a_volume_past_the_segment_limit_is_refused_not_read_in_part() {
        let lv = |n: usize| {
            let mut t = String::from("lv {\n");
            for i in 0..n {
                t.push_str(&format!(
                    "segment{i} {{\nstart_extent = {i}\nextent_count = 1\ntype = \"striped\"\nstripe_count = 1\nstripes = [\"pv0\", {i}]\n}}\n"
                ));
            }
            t.push_str("}\n");
            parse_metadata(&t).unwrap()
        };
        let past = lv(MAX_SEGMENTS + 1);
        let (_, r) = assemble(past.get("lv").unwrap(), 4 << 20, &PvMap::new());
        let e = r.unwrap_err();
        assert!(e.contains("65537 segments, more than the 65536"), "{e}");
        let at = lv(MAX_SEGMENTS);
        let (size, r) = assemble(at.get("lv").unwrap(), 4 << 20, &PvMap::new());
        // Read (its PV is missing here, which is another error).
        assert_eq!(size, MAX_SEGMENTS as u64 * (4 << 20));
        assert!(!r.unwrap_err().contains("segments, more than"));
    }

    #[test]
    fn the_crc_is_lvms() {
        // LVM's CRC of nothing is its initial value; of one zero byte, one
        // table step from it.
        assert_eq!(lvm_crc(&[]), 0xf597_a6cf);
        assert_ne!(lvm_crc(&[0]), lvm_crc(&[1]));
    }

    #[derive(Debug)]
    struct Mem(Vec<u8>);
    impl Device for Mem {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
    }

    #[test]
    fn metadata_text_past_the_limit_is_refused_at_it_read() {
        // A metadata area of the limit and a header: its text at 512.
        let size = MAX_METADATA + 1024;
        let area = |tsize: u64| {
            let mut b = vec![0u8; size as usize];
            b[4..20].copy_from_slice(b" LVM2 x[5A%r0N*>");
            b[40..48].copy_from_slice(&512u64.to_le_bytes());
            b[48..56].copy_from_slice(&tsize.to_le_bytes());
            let text_len = tsize.min(MAX_METADATA) as usize;
            b[512..512 + text_len].fill(b'x');
            let csum = lvm_crc(&b[512..512 + text_len]);
            b[56..60].copy_from_slice(&csum.to_le_bytes());
            let crc = lvm_crc(&b[4..512]);
            b[0..4].copy_from_slice(&crc.to_le_bytes());
            Arc::new(Mem(b)) as Arc<dyn Device>
        };
        let e = read_mda(&area(MAX_METADATA + 1), 0, size, 0, size).unwrap_err();
        assert!(
            e.contains("metadata text of 16777217 bytes, more than the 16777216"),
            "{e}"
        );
        let text = read_mda(&area(MAX_METADATA), 0, size, 0, size)
            .unwrap()
            .unwrap();
        assert_eq!(text.len(), MAX_METADATA as usize);
    }

    #[test]
    fn stripes_interleave_in_chunks() {
        let a: Arc<dyn Device> = Arc::new(Mem((0..64u8).collect()));
        let b: Arc<dyn Device> = Arc::new(Mem((100..164u8).collect()));
        let lv = LogicalVolume {
            size: 32,
            segments: vec![Segment {
                start: 0,
                len: 32,
                stripe: 4,
                stripes: vec![(a, 8), (b, 0)],
            }],
        };
        let mut buf = [0u8; 32];
        lv.read_at(&mut buf, 0).unwrap();
        assert_eq!(
            &buf[..12],
            &[8, 9, 10, 11, 100, 101, 102, 103, 12, 13, 14, 15]
        );
        let mut one = [0u8; 3];
        lv.read_at(&mut one, 5).unwrap();
        assert_eq!(one, [101, 102, 103]);
        assert!(lv.read_at(&mut one, 30).is_err());
    }
}
