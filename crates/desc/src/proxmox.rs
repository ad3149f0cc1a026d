//! Proxmox VE `qemu-server` `.conf`: read and write.
//!
//! A VM's configuration lives in `/etc/pve/qemu-server/<vmid>.conf`:
//!
//! ```text
//! #Web server%3A nginx + PHP        <- the description, one `#` line per line
//! boot: order=scsi0;ide2;net0
//! cores: 2
//! memory: 4096
//! name: web01
//! net0: virtio=BC:24:11:5E:3C:0A,bridge=vmbr0,firewall=1
//! scsi0: local-lvm:vm-100-disk-0,discard=on,size=32G
//! scsihw: virtio-scsi-single
//!
//! [PENDING]                          <- changes not applied yet
//! memory: 8192
//!
//! [before-upgrade]                   <- a snapshot: the config it was taken with
//! ...
//! ```
//!
//! The main section is the VM's current state. `[PENDING]` holds changes
//! waiting for a restart, `[special:cloudinit]` (and `[special:fleecing]`)
//! state Proxmox keeps for itself, and every other `[name]` a snapshot.
//! Values of drives, NICs and most devices are property strings:
//! `default,key=value,…` (`local-lvm:vm-100-disk-0,size=32G`).
//!
//! [`ConfDocument`] keeps every line as written, so parse → render gives back
//! the same bytes; [`ConfDocument::lower`] maps the main section to the
//! [`Vm`] model; [`raise`] writes a `.conf` the way Proxmox writes one
//! (the description first, then the keys sorted by name, drive and NIC
//! options sorted after their volume or MAC). An `args:` line (raw QEMU
//! arguments) is reported on input and never written.
//!
//! The grammar follows `PVE::QemuServer::parse_vm_config`: blank lines are
//! skipped, `#` lines are the (percent-encoded) description of their
//! section, a key (letters, digits, `_`, `-`) is followed by `:`, values are
//! trimmed. Proxmox's own keys are lower case; any other key is kept and
//! reported when lowering (Proxmox skips it with a warning). Proxmox writes
//! LF line ends; CRLF is accepted and kept.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

use vmshift_model::{
    mac_is_valid, parse_size, uuid_is_valid, Bus, Controller, Cpu, DeviceKind, Disk, DiskFormat,
    DiskRef, Finding, FirmwareKind, Graphics, Guest, Nic, OsFamily, Serial, SerialKind, Severity,
    Vm,
};

use crate::{DescError, Lowered, Result, MAX_DESCRIPTOR_BYTES};

// ---------------------------------------------------------------------------
// The lossless document
// ---------------------------------------------------------------------------

/// How a line ended in the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Eol {
    Lf,
    CrLf,
    /// The last line, with no line break after it.
    None,
}

impl Eol {
    fn as_str(self) -> &'static str {
        match self {
            Eol::Lf => "\n",
            Eol::CrLf => "\r\n",
            Eol::None => "",
        }
    }
}

/// What a line inside a section is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LineKind {
    Blank,
    /// A `#` line: part of the section's description.
    Comment,
    /// `key: value` (the value trimmed, as Proxmox reads it).
    Entry {
        key: String,
        value: String,
    },
}

/// One line, exactly as written (without its line break).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    text: String,
    eol: Eol,
    kind: LineKind,
}

impl Line {
    fn entry(key: &str, value: &str, eol: Eol) -> Line {
        Line {
            text: format!("{key}: {value}"),
            eol,
            kind: LineKind::Entry {
                key: key.to_string(),
                value: value.to_string(),
            },
        }
    }

    fn pair(&self) -> Option<(&str, &str)> {
        match &self.kind {
            LineKind::Entry { key, value } => Some((key, value)),
            _ => None,
        }
    }

    fn key(&self) -> Option<&str> {
        self.pair().map(|(k, _)| k)
    }
}

/// What a bracketed section of a `.conf` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionKind {
    /// `[PENDING]`: changes not yet applied to the running VM.
    Pending,
    /// `[special:cloudinit]` or `[special:fleecing]`: state Proxmox keeps
    /// for itself.
    Special,
    /// `[name]`: a snapshot, with the configuration it was taken with.
    Snapshot,
    /// Any other header; Proxmox skips such a section.
    Unknown,
}

impl SectionKind {
    fn of(name: &str) -> SectionKind {
        if name.eq_ignore_ascii_case("PENDING") {
            return SectionKind::Pending;
        }
        if let Some(rest) = strip_prefix_ignore_case(name, "special:") {
            return if rest.eq_ignore_ascii_case("cloudinit")
                || rest.eq_ignore_ascii_case("fleecing")
            {
                SectionKind::Special
            } else {
                SectionKind::Unknown
            };
        }
        // Proxmox: `[a-z][a-z0-9_\-]+`, case-insensitive.
        let mut chars = name.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
        if first_ok
            && name.len() >= 2
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            SectionKind::Snapshot
        } else {
            SectionKind::Unknown
        }
    }

    /// What makes two headers the same section for Proxmox (`None` for
    /// sections it skips).
    fn identity(self, name: &str) -> Option<String> {
        match self {
            SectionKind::Pending => Some("pending".into()),
            SectionKind::Special => Some(name.to_ascii_lowercase()),
            SectionKind::Snapshot => Some(format!("snapshot:{name}")),
            SectionKind::Unknown => None,
        }
    }
}

/// A `[name]` section: its header line and the lines under it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Section {
    name: String,
    kind: SectionKind,
    header: String,
    header_eol: Eol,
    lines: Vec<Line>,
}

/// A Proxmox VE `qemu-server` `.conf`, line for line: the description
/// (`#` lines), the main section's `key: value` lines, and the
/// `[PENDING]`, `[special:…]` and snapshot sections, in file order, with
/// unknown keys and sections kept.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfDocument {
    main: Vec<Line>,
    sections: Vec<Section>,
}

/// A line as the parser sees it.
enum Parsed {
    Header(String),
    Line(LineKind),
}

impl ConfDocument {
    /// Parses a `.conf`. It must be UTF-8 and at most
    /// [`MAX_DESCRIPTOR_BYTES`]; every line must be blank, a `#` line, a
    /// `key: value` line or a `[section]` header; a key may appear once per
    /// section and a section once per file. Unknown keys and sections are
    /// kept (lowering reports them). Errors name the 1-based line.
    pub fn parse(bytes: &[u8]) -> Result<ConfDocument> {
        if bytes.len() as u64 > MAX_DESCRIPTOR_BYTES {
            return Err(DescError::new(format!(
                "{} bytes, more than {} MiB: not a Proxmox VM config",
                bytes.len(),
                MAX_DESCRIPTOR_BYTES >> 20
            )));
        }
        let text = std::str::from_utf8(bytes).map_err(|e| {
            let at = e.valid_up_to();
            let line = 1 + bytes.iter().take(at).filter(|&&b| b == b'\n').count();
            DescError::at_line(
                line,
                format!(
                    "not UTF-8 (invalid byte at offset {at}); Proxmox writes its configs in UTF-8"
                ),
            )
        })?;
        let mut doc = ConfDocument::default();
        let mut keys: HashMap<String, usize> = HashMap::new();
        let mut seen_sections: HashMap<String, usize> = HashMap::new();
        for (i, (body, eol)) in split_lines(text).enumerate() {
            let number = i + 1;
            match classify(body).map_err(|m| DescError::at_line(number, m))? {
                Parsed::Header(name) => {
                    let kind = SectionKind::of(&name);
                    if let Some(id) = kind.identity(&name) {
                        if let Some(first) = seen_sections.get(&id) {
                            return Err(DescError::at_line(
                                number,
                                format!("section [{name}] appears twice (first on line {first})"),
                            ));
                        }
                        seen_sections.insert(id, number);
                    }
                    keys.clear();
                    doc.sections.push(Section {
                        name,
                        kind,
                        header: body.to_string(),
                        header_eol: eol,
                        lines: Vec::new(),
                    });
                }
                Parsed::Line(kind) => {
                    if let LineKind::Entry { key, .. } = &kind {
                        if let Some(first) = keys.get(key) {
                            let place = doc.sections.last().map_or_else(
                                || "the main section".to_string(),
                                |s| format!("section [{}]", s.name),
                            );
                            return Err(DescError::at_line(
                                number,
                                format!("set twice in {place} (first on line {first})"),
                            )
                            .field(key.clone()));
                        }
                        keys.insert(key.clone(), number);
                    }
                    let line = Line {
                        text: body.to_string(),
                        eol,
                        kind,
                    };
                    match doc.sections.last_mut() {
                        Some(s) => s.lines.push(line),
                        None => doc.main.push(line),
                    }
                }
            }
        }
        Ok(doc)
    }

    /// The document as text: for a parsed document, exactly the bytes it
    /// was parsed from.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for l in &self.main {
            out.push_str(&l.text);
            out.push_str(l.eol.as_str());
        }
        for s in &self.sections {
            out.push_str(&s.header);
            out.push_str(s.header_eol.as_str());
            for l in &s.lines {
                out.push_str(&l.text);
                out.push_str(l.eol.as_str());
            }
        }
        out
    }

    /// The value of `key` in the main section (the current state).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.main
            .iter()
            .filter_map(Line::pair)
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    /// The main section's `key: value` pairs, in file order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.main.iter().filter_map(Line::pair)
    }

    /// Sets `key` in the main section: in place when it exists, else at its
    /// place in key order (Proxmox sorts keys). The value is stored trimmed,
    /// as Proxmox reads it. A key must be a lower-case letter followed by
    /// letters, digits, `_` or `-`; a value cannot hold a line break.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        if !is_key(key) {
            return Err(DescError::new(
                "not a config key (a lower-case letter, then lower-case letters, digits, '_' or '-')",
            )
            .field(key));
        }
        if value.contains(['\n', '\r']) {
            return Err(DescError::new("a value cannot contain a line break").field(key));
        }
        let value = value.trim_matches(is_space);
        if let Some(line) = self.main.iter_mut().find(|l| l.key() == Some(key)) {
            *line = Line::entry(key, value, line.eol);
            return Ok(());
        }
        let eol = self.newline();
        let at = self.insertion_point(key);
        if let Some(prev) = at.checked_sub(1).and_then(|i| self.main.get_mut(i)) {
            if prev.eol == Eol::None {
                prev.eol = eol;
            }
        }
        self.main.insert(at, Line::entry(key, value, eol));
        Ok(())
    }

    /// Removes `key` from the main section; its value, if it was set.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        let i = self.main.iter().position(|l| l.key() == Some(key))?;
        match self.main.remove(i).kind {
            LineKind::Entry { value, .. } => Some(value),
            _ => None,
        }
    }

    /// The VM's description: the main section's `#` lines, percent-decoded
    /// (and an old-style `description:` value), trailing white space
    /// removed, as Proxmox reads it.
    pub fn description(&self) -> Option<String> {
        let mut text = String::new();
        for l in &self.main {
            match &l.kind {
                LineKind::Comment => {
                    text.push_str(&decode_text(l.text.strip_prefix('#').unwrap_or(&l.text)));
                    text.push('\n');
                }
                LineKind::Entry { key, value } if key == "description" => {
                    text.push_str(&decode_text(value));
                }
                _ => {}
            }
        }
        let text = text.trim_end_matches(is_space);
        (!text.is_empty()).then(|| text.to_string())
    }

    /// Replaces the description: one `#` line per line at the top of the
    /// file, percent-encoded like Proxmox does (control characters, `:`,
    /// `%` and everything outside ASCII).
    pub fn set_description(&mut self, text: Option<&str>) {
        let eol = self.newline();
        self.main
            .retain(|l| l.kind != LineKind::Comment && l.key() != Some("description"));
        let lines = text.map(|t| description_lines(t, eol)).unwrap_or_default();
        self.main.splice(0..0, lines);
    }

    /// The section names, in file order, as written (`PENDING`,
    /// `special:cloudinit`, snapshot names, unknown names).
    pub fn sections(&self) -> Vec<&str> {
        self.sections.iter().map(|s| s.name.as_str()).collect()
    }

    /// What the section `name` holds, if the document has it.
    pub fn section_kind(&self, name: &str) -> Option<SectionKind> {
        self.sections
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.kind)
    }

    /// The `key: value` pairs of the section `name`, in file order.
    pub fn section_entries(&self, name: &str) -> Option<Vec<(&str, &str)>> {
        self.sections
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.lines.iter().filter_map(Line::pair).collect())
    }

    /// The snapshot names, in file order.
    pub fn snapshots(&self) -> Vec<&str> {
        self.sections
            .iter()
            .filter(|s| s.kind == SectionKind::Snapshot)
            .map(|s| s.name.as_str())
            .collect()
    }

    /// The line break new lines get: the document's own, LF when it has
    /// none.
    fn newline(&self) -> Eol {
        self.main
            .iter()
            .map(|l| l.eol)
            .chain(self.sections.iter().map(|s| s.header_eol))
            .find(|e| *e != Eol::None)
            .unwrap_or(Eol::Lf)
    }

    /// Where a new main-section key goes: before the first greater key,
    /// else after the last key, else after the description.
    fn insertion_point(&self, key: &str) -> usize {
        let mut last_entry = None;
        for (i, l) in self.main.iter().enumerate() {
            if let Some(k) = l.key() {
                if k > key {
                    return i;
                }
                last_entry = Some(i);
            }
        }
        match last_entry {
            Some(i) => i + 1,
            None => self
                .main
                .iter()
                .take_while(|l| l.kind == LineKind::Comment)
                .count(),
        }
    }
}

impl fmt::Display for ConfDocument {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

/// Lines and how each ended (`\r\n` is one line break).
fn split_lines(text: &str) -> impl Iterator<Item = (&str, Eol)> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        match rest.split_once('\n') {
            Some((line, tail)) => {
                rest = tail;
                Some(match line.strip_suffix('\r') {
                    Some(l) => (l, Eol::CrLf),
                    None => (line, Eol::Lf),
                })
            }
            None => {
                let line = rest;
                rest = "";
                Some((line, Eol::None))
            }
        }
    })
}

fn classify(body: &str) -> std::result::Result<Parsed, String> {
    if body.chars().all(is_space) {
        return Ok(Parsed::Line(LineKind::Blank));
    }
    if body.starts_with('#') {
        return Ok(Parsed::Line(LineKind::Comment));
    }
    if let Some(inner) = body.strip_prefix('[') {
        let (name, after) = inner
            .split_once(']')
            .ok_or_else(|| format!("a section header needs a closing ']': '{}'", excerpt(body)))?;
        if !after.chars().all(is_space) {
            return Err(format!(
                "text after the section header [{name}]: '{}'",
                excerpt(after)
            ));
        }
        return Ok(Parsed::Header(name.to_string()));
    }
    // Proxmox's own keys are lower case; others are kept (and reported
    // when lowering), as Proxmox skips them with a warning.
    let key_len = body
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        .unwrap_or(body.len());
    let (key, rest) = body.split_at(key_len);
    match rest.strip_prefix(':') {
        Some(value) if key.starts_with(|c: char| c.is_ascii_alphabetic()) => {
            Ok(Parsed::Line(LineKind::Entry {
                key: key.to_string(),
                value: value.trim_matches(is_space).to_string(),
            }))
        }
        _ => Err(format!(
            "expected 'key: value', a '#' description line, a '[section]' header or a blank line, found '{}'",
            excerpt(body)
        )),
    }
}

/// White space as Perl's `\s` sees it in these files.
fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n' | '\x0b' | '\x0c')
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-'
}

fn is_key(key: &str) -> bool {
    key.starts_with(|c: char| c.is_ascii_lowercase()) && key.chars().all(is_key_char)
}

/// The start of `s`, for error messages.
fn excerpt(s: &str) -> String {
    const MAX: usize = 60;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(MAX).collect::<String>())
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| s.get(prefix.len()..))
        .flatten()
}

/// `PVE::Tools::decode_text`: `%XX` escapes to bytes, then UTF-8.
fn decode_text(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let escaped = (b[i] == b'%')
            .then(|| b.get(i + 1..i + 3))
            .flatten()
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `PVE::Tools::encode_text`, plus `%` itself so that a literal `%41`
/// survives (Proxmox decodes `%25` like any escape).
fn encode_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b':' && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A description as `#` lines (Perl's `split /\n/` drops trailing empty
/// lines).
fn description_lines(text: &str, eol: Eol) -> Vec<Line> {
    let mut parts: Vec<&str> = text.split('\n').collect();
    while parts.last() == Some(&"") {
        parts.pop();
    }
    parts
        .into_iter()
        .map(|p| Line {
            text: format!("#{}", encode_text(p)),
            eol,
            kind: LineKind::Comment,
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Values: property strings, sizes, booleans
// ---------------------------------------------------------------------------

/// A property string: `default,key=value,…`.
#[derive(Debug, Default)]
struct Props<'a> {
    default: Option<&'a str>,
    pairs: Vec<(&'a str, &'a str)>,
    /// Keys given twice (Proxmox refuses the value).
    duplicates: Vec<&'a str>,
}

impl<'a> Props<'a> {
    fn parse(value: &'a str) -> Props<'a> {
        let mut p = Props::default();
        for part in value.split(',') {
            if part.chars().all(is_space) {
                continue;
            }
            match part.split_once('=') {
                Some((k, v)) => {
                    if p.pairs.iter().any(|(pk, _)| *pk == k) {
                        p.duplicates.push(k);
                    }
                    p.pairs.push((k, v));
                }
                None if p.default.is_none() => p.default = Some(part),
                None => p.duplicates.push(part),
            }
        }
        p
    }

    /// The last value given for `key`.
    fn get(&self, key: &str) -> Option<&'a str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
    }

    /// The default-key value, or `key=…` spelled out.
    fn first(&self, key: &str) -> Option<&'a str> {
        self.default.or_else(|| self.get(key))
    }
}

/// A JSONSchema boolean as Proxmox accepts it.
fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "on" | "yes" | "true" => Some(true),
        "0" | "off" | "no" | "false" => Some(false),
        _ => None,
    }
}

/// A `disk-size`: `\d+(\.\d+)?[KMGT]?`, binary units, a fraction of a byte
/// dropped (`PVE::JSONSchema::parse_size`).
fn parse_pve_size(s: &str) -> Option<u64> {
    let number = s.strip_suffix(['K', 'M', 'G', 'T']).unwrap_or(s);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || (number.contains('.') && !digits(frac)) {
        return None;
    }
    if number.len() == s.len() {
        // Bytes: Perl's int() drops a fraction.
        return int.parse().ok();
    }
    parse_size(s).ok()
}

/// A size the way Proxmox writes one: the largest unit that divides it
/// (`32G`, `1536M`, `4M`), plain bytes otherwise.
fn pve_size(bytes: u64) -> String {
    for (shift, unit) in [(40u32, 'T'), (30, 'G'), (20, 'M'), (10, 'K')] {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// A numbered key: `net3` → (`net`, 3). Only the canonical spelling.
fn split_index(key: &str) -> Option<(&str, u32)> {
    let pos = key.find(|c: char| c.is_ascii_digit())?;
    let (prefix, digits) = key.split_at(pos);
    if prefix.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    digits.parse().ok().map(|n| (prefix, n))
}

// ---------------------------------------------------------------------------
// What Proxmox calls things
// ---------------------------------------------------------------------------

/// Drive buses in Proxmox's own order (`valid_drive_names`: the order it
/// picks a default boot disk in), with how many drives each has.
const DRIVE_BUSES: [(&str, Bus, u32); 4] = [
    ("ide", Bus::Ide, 4),
    ("scsi", Bus::Scsi, 31),
    ("virtio", Bus::Virtio, 16),
    ("sata", Bus::Sata, 6),
];

/// `scsihw` values.
const SCSI_HW: &[&str] = &[
    "lsi",
    "lsi53c810",
    "virtio-scsi-pci",
    "virtio-scsi-single",
    "megasas",
    "pvscsi",
];

/// NIC models (`PVE::QemuServer::Network`).
const NIC_MODELS: &[&str] = &[
    "e1000",
    "e1000-82540em",
    "e1000-82544gc",
    "e1000-82545em",
    "e1000e",
    "i82551",
    "i82557b",
    "i82559er",
    "ne2k_isa",
    "ne2k_pci",
    "pcnet",
    "rtl8139",
    "virtio",
    "vmxnet3",
];

/// `ostype` values.
const OSTYPES: &[&str] = &[
    "other", "wxp", "w2k", "w2k3", "w2k8", "wvista", "win7", "win8", "win10", "win11", "l24",
    "l26", "solaris",
];

/// Keys [`ConfDocument::lower`] reads (numbered drives, NICs and serial
/// ports are matched apart).
const MODELLED_KEYS: &[&str] = &[
    "name",
    "memory",
    "sockets",
    "cores",
    "vcpus",
    "smp",
    "bios",
    "efidisk0",
    "tpmstate0",
    "machine",
    "ostype",
    "localtime",
    "smbios1",
    "vmgenid",
    "description",
    "scsihw",
    "boot",
    "bootdisk",
    "vga",
    "cdrom",
];

/// Known keys that only concern Proxmox itself (scheduling, limits,
/// bookkeeping): not converted, not worth a finding.
const QUIET_KEYS: &[&str] = &[
    "onboot",
    "autostart",
    "hotplug",
    "reboot",
    "cpulimit",
    "cpuunits",
    "shares",
    "balloon",
    "keyboard",
    "kvm",
    "acpi",
    "tdf",
    "freeze",
    "startdate",
    "startup",
    "tablet",
    "migrate_speed",
    "migrate_downtime",
    "parent",
    "snaptime",
    "snapstate",
    "vmstate",
    "vmstatestorage",
    "runningmachine",
    "runningcpu",
    "protection",
    "hookscript",
    "tags",
    "meta",
    "affinity",
    "spice_enhancements",
    "keephugepages",
    "allow-ksm",
];

/// Cloud-init settings (besides `ipconfigN`).
const CLOUD_INIT_KEYS: &[&str] = &[
    "citype",
    "ciuser",
    "cipassword",
    "ciupgrade",
    "cicustom",
    "searchdomain",
    "nameserver",
    "sshkeys",
];

/// Known keys the guest sees that the model has no place for.
const GUEST_KEYS: &[(&str, Severity, &str)] = &[
    ("cpu", Severity::Info, "the CPU model"),
    ("agent", Severity::Info, "the QEMU guest agent channel"),
    ("numa", Severity::Info, "NUMA"),
    ("hugepages", Severity::Info, "huge pages"),
    ("watchdog", Severity::Info, "the watchdog device"),
    ("ivshmem", Severity::Info, "inter-VM shared memory"),
    ("audio0", Severity::Info, "the audio device"),
    ("rng0", Severity::Info, "the VirtIO random number generator"),
    ("amd-sev", Severity::Warning, "AMD SEV memory encryption"),
    ("intel-tdx", Severity::Warning, "Intel TDX"),
    ("arch", Severity::Warning, "the CPU architecture"),
];

/// How lowering treats a main-section key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyClass {
    Modelled,
    Quiet,
    Args,
    Lock,
    Template,
    Unused,
    CloudInit,
    Guest(Severity, &'static str),
    Unknown,
}

fn key_class(key: &str) -> KeyClass {
    if MODELLED_KEYS.contains(&key) {
        return KeyClass::Modelled;
    }
    if QUIET_KEYS.contains(&key) {
        return KeyClass::Quiet;
    }
    if CLOUD_INIT_KEYS.contains(&key) {
        return KeyClass::CloudInit;
    }
    if let Some((_, sev, what)) = GUEST_KEYS.iter().find(|(k, ..)| *k == key) {
        return KeyClass::Guest(*sev, what);
    }
    match key {
        "args" => return KeyClass::Args,
        "lock" => return KeyClass::Lock,
        "template" => return KeyClass::Template,
        _ => {}
    }
    let Some((prefix, n)) = split_index(key) else {
        return KeyClass::Unknown;
    };
    match prefix {
        "net" if n < 32 => KeyClass::Modelled,
        "serial" if n < 4 => KeyClass::Modelled,
        "unused" if n < 256 => KeyClass::Unused,
        "ipconfig" if n < 32 => KeyClass::CloudInit,
        "hostpci" if n < 16 => KeyClass::Guest(Severity::Warning, "PCI passthrough"),
        "usb" if n < 14 => KeyClass::Guest(Severity::Warning, "USB passthrough"),
        "parallel" if n < 3 => KeyClass::Guest(Severity::Info, "a host parallel port"),
        "numa" if n < 8 => KeyClass::Guest(Severity::Info, "the NUMA node layout"),
        "virtiofs" if n < 10 => KeyClass::Guest(Severity::Warning, "a virtiofs shared directory"),
        _ if DRIVE_BUSES
            .iter()
            .any(|(p, _, max)| *p == prefix && n < *max) =>
        {
            KeyClass::Modelled
        }
        _ => KeyClass::Unknown,
    }
}

/// The Windows version an `ostype` stands for, in the model's vocabulary.
fn windows_version(ostype: &str) -> Option<&'static str> {
    Some(match ostype {
        "wxp" => "xp",
        "w2k" => "2000",
        "w2k3" => "2003",
        "w2k8" => "2008",
        "wvista" => "vista",
        "win7" => "7",
        "win8" => "8",
        "win10" => "10",
        "win11" => "11",
        _ => return None,
    })
}

/// The `ostype` for a Windows version as any source names it (`2019`,
/// `2008r2`, `11`, VMware's `windows9srv-64`).
fn windows_ostype(version: &str) -> Option<&'static str> {
    const NAMED: &[(&str, &str)] = &[
        ("2019srvnext", "win11"),
        ("2022srvnext", "win11"),
        ("2025", "win11"),
        ("2022", "win11"),
        ("2019", "win10"),
        ("2016", "win10"),
        ("2012", "win8"),
        ("2008r2", "win7"),
        ("2008-r2", "win7"),
        ("2008", "w2k8"),
        ("longhorn", "w2k8"),
        ("2003", "w2k3"),
        ("winnet", "w2k3"),
        ("2000", "w2k"),
        ("vista", "wvista"),
        ("xp", "wxp"),
    ];
    let v = version.to_ascii_lowercase();
    if let Some((_, os)) = NAMED.iter().find(|(pat, _)| v.contains(pat)) {
        return Some(os);
    }
    let number: String = v
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(char::is_ascii_digit)
        .collect();
    match number.as_str() {
        "12" | "11" => Some("win11"),
        // VMware's "windows9" is Windows 10 / Server 2016.
        "10" | "9" => Some("win10"),
        "8" | "81" => Some("win8"),
        "7" => Some("win7"),
        _ => None,
    }
}

/// Whether Proxmox accepts `m` as a machine type: `pc`, `q35`,
/// `pc-i440fx-X.Y`, `pc-X.Y`, `pc-q35-X.Y`, each with an optional `+pveN`
/// and `.pxe`.
fn machine_is_valid(m: &str) -> bool {
    let m = m.strip_suffix(".pxe").unwrap_or(m);
    let m = match m.split_once("+pve") {
        Some((base, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => base,
        Some(_) => return false,
        None => m,
    };
    if m == "pc" || m == "q35" {
        return true;
    }
    let version = ["pc-i440fx-", "pc-q35-", "pc-"]
        .iter()
        .find_map(|p| m.strip_prefix(p));
    version.is_some_and(|v| {
        let parts: Vec<&str> = v.split('.').collect();
        parts.len() >= 2
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// A drive's volume as a reference: `storage:volume`, an absolute path, a
/// host device; `None` for `none` and `cdrom` (the host's drive).
fn disk_ref(file: &str, cdrom: bool) -> Option<DiskRef> {
    if file == "none" || file == "cdrom" {
        return None;
    }
    if file.starts_with("/dev/") {
        return Some(DiskRef::Device {
            path: file.to_string(),
        });
    }
    if file.starts_with('/') {
        return Some(DiskRef::File {
            path: file.to_string(),
        });
    }
    match file.split_once(':') {
        Some((storage, volume)) if !storage.is_empty() && !volume.is_empty() => {
            Some(DiskRef::Volume {
                storage: storage.to_string(),
                volume: volume.to_string(),
            })
        }
        // An old-style bare file name: Proxmox reads an ISO as
        // `local:iso/<name>` (a disk as `local:<vmid>/<name>`).
        _ if cdrom => Some(DiskRef::Volume {
            storage: "local".into(),
            volume: format!("iso/{file}"),
        }),
        _ => Some(DiskRef::File {
            path: file.to_string(),
        }),
    }
}

/// The format a volume name implies: its extension on directory storages,
/// raw on block storages (no extension); `None` for other extensions.
fn volume_format(volume: &str) -> Option<DiskFormat> {
    let name = volume.rsplit('/').next().unwrap_or(volume);
    match name.rsplit_once('.') {
        None => Some(DiskFormat::Raw),
        Some((_, ext)) => extension_format(ext),
    }
}

fn extension_format(ext: &str) -> Option<DiskFormat> {
    match ext.to_ascii_lowercase().as_str() {
        "raw" => Some(DiskFormat::Raw),
        "qcow2" => Some(DiskFormat::Qcow2),
        "vmdk" => Some(DiskFormat::Vmdk),
        _ => None,
    }
}

/// Whether a drive is the cloud-init drive Proxmox generates
/// (`[:/](vm-\d+-)?cloudinit(\.<qemu format>)?$`).
fn is_cloudinit(file: &str) -> bool {
    let Some(name) = file.rfind([':', '/']).and_then(|i| file.get(i + 1..)) else {
        return false;
    };
    let stem = match name.split_once('.') {
        None => name,
        Some((s, "raw" | "cow" | "qcow" | "qcow2" | "qed" | "vmdk" | "cloop")) => s,
        Some(_) => return false,
    };
    stem == "cloudinit"
        || stem
            .strip_prefix("vm-")
            .and_then(|s| s.split_once('-'))
            .is_some_and(|(id, rest)| {
                !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) && rest == "cloudinit"
            })
}

// ---------------------------------------------------------------------------
// Lowering
// ---------------------------------------------------------------------------

/// Finding code: an `args:` line (raw QEMU arguments).
const ARGS: &str = "proxmox-args";
/// Finding code: `[PENDING]` changes, not applied.
const PENDING: &str = "proxmox-pending";
/// Finding code: a section Proxmox does not know.
const UNKNOWN_SECTION: &str = "proxmox-unknown-section";
/// Finding code: a key Proxmox does not know.
const UNKNOWN_KEY: &str = "proxmox-unknown-key";
/// Finding code: a known setting the model has no place for.
const NOT_CONVERTED: &str = "proxmox-not-converted";
/// Finding code: a value Proxmox would not accept, or that had to be
/// guessed around.
const INVALID: &str = "proxmox-invalid-value";
/// Finding code: `vcpus` below sockets × cores.
const VCPUS: &str = "proxmox-vcpus-hotplug";
/// Finding code: no boot order; the first disk is assumed.
const BOOT_ASSUMED: &str = "proxmox-boot-assumed";
/// Finding code: no `name`.
const NO_NAME: &str = "proxmox-no-name";
/// Finding code: a `lock` (backup, migration, snapshot under way).
const LOCKED: &str = "proxmox-locked";
/// Finding code: the VM is a template.
const TEMPLATE: &str = "proxmox-template";
/// Finding code (raise): written differently from the model.
const RAISE_MAPPED: &str = "proxmox-raise-mapped";
/// Finding code (raise): not written at all.
const RAISE_DROPPED: &str = "proxmox-raise-dropped";

impl ConfDocument {
    /// The main section (the VM's current state) as a [`Vm`], and what did
    /// not map: `[PENDING]` changes, `args:`, settings the model has no
    /// place for, unknown keys and sections, values Proxmox would refuse.
    /// Proxmox's defaults apply to what the file leaves out (512 MiB, one
    /// socket of one core, SeaBIOS, local time for Windows guests, an LSI
    /// controller for SCSI disks). Snapshot sections give
    /// [`Vm::snapshots`].
    pub fn lower(&self) -> Lowered {
        let mut l = Lowerer {
            doc: self,
            vm: Vm::default(),
            findings: Vec::new(),
            disk_keys: Vec::new(),
            disk_cloudinit: Vec::new(),
            nic_keys: Vec::new(),
        };
        l.identity();
        l.cpu_memory();
        l.guest_and_clock();
        l.firmware();
        l.drives();
        l.nics();
        l.serials();
        l.graphics();
        l.boot();
        l.other_keys();
        l.sections();
        Lowered {
            vm: l.vm,
            findings: l.findings,
        }
    }
}

struct Lowerer<'a> {
    doc: &'a ConfDocument,
    vm: Vm,
    findings: Vec<Finding>,
    /// The Proxmox key of each of `vm.disks`.
    disk_keys: Vec<String>,
    /// Whether each of `vm.disks` is the cloud-init drive.
    disk_cloudinit: Vec<bool>,
    /// The Proxmox key of each of `vm.nics`.
    nic_keys: Vec<String>,
}

impl<'a> Lowerer<'a> {
    /// A main-section value; an empty one counts as unset.
    fn get(&self, key: &str) -> Option<&'a str> {
        self.doc.get(key).filter(|v| !v.is_empty())
    }

    fn note(
        &mut self,
        severity: Severity,
        code: &str,
        path: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.findings
            .push(Finding::new(severity, code, path, message));
    }

    fn invalid(&mut self, key: &str, message: impl Into<String>) {
        self.note(Severity::Warning, INVALID, format!("conf:{key}"), message);
    }

    fn not_converted(&mut self, key: &str, message: impl Into<String>) {
        self.note(
            Severity::Info,
            NOT_CONVERTED,
            format!("conf:{key}"),
            message,
        );
    }

    /// A positive integer key; `None` (and a finding) when it is not one.
    fn count(&mut self, key: &str) -> Option<u32> {
        let v = self.get(key)?;
        match v.parse::<u32>() {
            Ok(n) if n > 0 => Some(n),
            _ => {
                self.invalid(
                    key,
                    format!("'{v}' is not a positive number; Proxmox's default is used"),
                );
                None
            }
        }
    }

    /// A boolean property of a property string; `None` when absent.
    fn flag(&mut self, key: &str, props: &Props<'_>, name: &str) -> Option<bool> {
        let v = props.get(name)?;
        let b = parse_bool(v);
        if b.is_none() {
            self.invalid(
                key,
                format!("{name}={v} is not a boolean (1/0, on/off, yes/no, true/false)"),
            );
        }
        b
    }

    fn report_duplicates(&mut self, key: &str, props: &Props<'_>) {
        if !props.duplicates.is_empty() {
            let list = props.duplicates.join(", ");
            self.invalid(
                key,
                format!(
                    "{list} given twice; Proxmox refuses the value (the last one is used here)"
                ),
            );
        }
    }

    fn identity(&mut self) {
        match self.get("name") {
            Some(n) => self.vm.name = n.to_string(),
            None => self.note(
                Severity::Warning,
                NO_NAME,
                "name",
                "the config has no name (Proxmox shows it as 'VM <vmid>'); name the VM after its file",
            ),
        }
        if let Some(s) = self.get("smbios1") {
            let p = Props::parse(s);
            self.report_duplicates("smbios1", &p);
            // The uuid is never base64-encoded, even with base64=1 (the
            // schema requires the UUID form); only the strings are.
            match p.get("uuid") {
                Some(u) if uuid_is_valid(u) => self.vm.uuid = Some(u.to_ascii_lowercase()),
                Some(u) => self.invalid(
                    "smbios1",
                    format!("uuid={u} is not a UUID; not carried over"),
                ),
                None => {}
            }
        }
        match self.get("vmgenid") {
            None | Some("0") => {}
            Some("1") => self.not_converted(
                "vmgenid",
                "vmgenid: 1 asks Proxmox to generate a generation id through its API; none has been generated",
            ),
            Some(g) if uuid_is_valid(g) => self.vm.genid = Some(g.to_ascii_lowercase()),
            Some(g) => self.invalid("vmgenid", format!("'{g}' is not a UUID; not carried over")),
        }
        self.vm.description = self.doc.description();
    }

    fn cpu_memory(&mut self) {
        let sockets = match self.count("sockets") {
            Some(s) => s,
            None => self.count("smp").unwrap_or(1),
        };
        let cores = self.count("cores").unwrap_or(1);
        let total = match sockets.checked_mul(cores) {
            Some(t) => {
                self.vm.cpu = Cpu {
                    vcpus: t,
                    sockets,
                    cores,
                    threads: 1,
                };
                t
            }
            None => {
                self.invalid(
                    "cores",
                    format!("{sockets} sockets × {cores} cores is out of range; one vCPU is used"),
                );
                1
            }
        };
        if let Some(v) = self.count("vcpus") {
            if v < total {
                self.note(
                    Severity::Info,
                    VCPUS,
                    "cpu.vcpus",
                    format!("{v} of the {total} vCPUs are online at boot (Proxmox 'vcpus', CPU hotplug); the model keeps all {total}"),
                );
            } else if v > total {
                self.invalid("vcpus", format!("vcpus {v} is more than sockets × cores = {total}; Proxmox refuses to start the VM"));
            }
        }
        let memory = match self.get("memory") {
            None => 512,
            Some(v) => {
                let p = Props::parse(v);
                match p.first("current").and_then(|c| c.parse::<u64>().ok()) {
                    Some(m) if m > 0 => m,
                    _ => {
                        self.invalid(
                            "memory",
                            format!(
                                "'{v}' is not a memory size in MiB; Proxmox's default 512 is used"
                            ),
                        );
                        512
                    }
                }
            }
        };
        self.vm.memory_mib = memory;
    }

    fn guest_and_clock(&mut self) {
        let ostype = self.get("ostype");
        let (family, version) = match ostype {
            None | Some("other") => (OsFamily::Other, None),
            Some("l26") => (OsFamily::Linux, None),
            Some("l24") => (OsFamily::Linux, Some("2.4")),
            Some("solaris") => (OsFamily::Solaris, None),
            Some(o) => match windows_version(o) {
                Some(v) => (OsFamily::Windows, Some(v)),
                None => {
                    self.invalid(
                        "ostype",
                        format!("'{o}' is not a Proxmox ostype; the guest is taken as 'other'"),
                    );
                    (OsFamily::Other, None)
                }
            },
        };
        self.vm.guest = Guest {
            family,
            version: version.map(str::to_string),
            source_id: ostype.map(str::to_string),
            x86_64: true,
        };
        // Proxmox turns local time on for Windows unless the key says no.
        let windows = family == OsFamily::Windows;
        let localtime = match self.get("localtime") {
            None => windows,
            Some(v) => parse_bool(v).unwrap_or_else(|| {
                self.invalid("localtime", format!("'{v}' is not a boolean"));
                windows
            }),
        };
        self.vm.clock_localtime = localtime;
    }

    fn firmware(&mut self) {
        let ovmf = match self.get("bios") {
            None | Some("seabios") => false,
            Some("ovmf") => true,
            Some(b) => {
                self.invalid(
                    "bios",
                    format!("'{b}' is not seabios or ovmf; SeaBIOS is assumed"),
                );
                false
            }
        };
        if ovmf {
            self.vm.firmware.kind = FirmwareKind::Uefi;
        }
        if let Some(v) = self.get("efidisk0") {
            let p = Props::parse(v);
            self.report_duplicates("efidisk0", &p);
            if !ovmf {
                self.not_converted(
                    "efidisk0",
                    "an EFI disk on a SeaBIOS VM is unused; not carried over",
                );
            } else {
                match p.first("file").or_else(|| p.get("volume")) {
                    Some(file) => self.vm.firmware.efi_vars = disk_ref(file, false),
                    None => self.invalid("efidisk0", "no volume"),
                }
                let keys = self
                    .flag("efidisk0", &p, "pre-enrolled-keys")
                    .unwrap_or(false);
                let four_m = p.get("efitype") == Some("4m");
                self.vm.firmware.secure_boot = keys && four_m;
                if keys && !four_m {
                    self.not_converted(
                        "efidisk0",
                        "pre-enrolled-keys=1 needs efitype=4m: Proxmox starts this VM without the keys, so Secure Boot is off",
                    );
                }
            }
        }
        self.vm.machine = self.get("machine").and_then(|m| {
            let p = Props::parse(m);
            p.first("type").map(str::to_string)
        });
        self.vm.tpm = self.get("tpmstate0").is_some();
    }

    fn drives(&mut self) {
        for (prefix, bus, count) in DRIVE_BUSES {
            for i in 0..count {
                let key = format!("{prefix}{i}");
                let value = match self.get(&key) {
                    // `cdrom:` is Proxmox's old alias of ide2.
                    None if key == "ide2" => self.get("cdrom"),
                    v => v,
                };
                if let Some(v) = value {
                    self.drive(&key, bus, i, v);
                }
            }
        }
        let scsihw = self.get("scsihw");
        if scsihw.is_some() || self.vm.disks.iter().any(|d| d.bus == Bus::Scsi) {
            let hw = scsihw.unwrap_or("lsi");
            if !SCSI_HW.contains(&hw) {
                self.invalid(
                    "scsihw",
                    format!("'{hw}' is not a Proxmox SCSI controller model; kept as written"),
                );
            }
            // The one virtio-scsi model the rest of vmshift names; the
            // -pci variant (one controller for all disks) keeps its name.
            let model = if hw == "virtio-scsi-single" {
                "virtio-scsi"
            } else {
                hw
            };
            self.vm.controllers.push(Controller {
                bus: Bus::Scsi,
                index: 0,
                model: Some(model.to_string()),
            });
        }
        if self.vm.disks.iter().any(|d| d.bus == Bus::Sata) {
            self.vm.controllers.push(Controller {
                bus: Bus::Sata,
                index: 0,
                model: Some("ahci".into()),
            });
        }
    }

    fn drive(&mut self, key: &str, bus: Bus, index: u32, value: &str) {
        let p = Props::parse(value);
        self.report_duplicates(key, &p);
        let Some(file) = p.first("file").or_else(|| p.get("volume")) else {
            self.invalid(key, "the drive names no volume; not carried over");
            return;
        };
        let device = match p.get("media") {
            None | Some("disk") => DeviceKind::Disk,
            Some("cdrom") => DeviceKind::Cdrom,
            Some(m) => {
                self.invalid(
                    key,
                    format!("media={m} is not disk or cdrom; taken as a disk"),
                );
                DeviceKind::Disk
            }
        };
        let cdrom = device == DeviceKind::Cdrom;
        if cdrom && bus == Bus::Virtio {
            self.invalid(key, "Proxmox has no virtio CD-ROM and refuses this drive");
        }
        if file == "cdrom" {
            self.not_converted(
                key,
                "the drive passes the host's CD-ROM through; it becomes an empty drive",
            );
        }
        let source = disk_ref(file, cdrom);
        if !cdrom && matches!(&source, Some(DiskRef::File { path }) if !path.starts_with('/')) {
            self.invalid(
                key,
                format!(
                    "'{file}' is an old-style file name; Proxmox reads it as local:<vmid>/{file}"
                ),
            );
        }
        let cloudinit = is_cloudinit(file);
        if cloudinit {
            self.not_converted(key, "the cloud-init drive is generated by Proxmox from the ci* settings; it is kept as a CD-ROM");
        }
        let format = self.drive_format(key, &p, source.as_ref(), cdrom);
        let size = p.get("size").and_then(|s| {
            let b = parse_pve_size(s);
            if b.is_none() {
                self.invalid(
                    key,
                    format!("size={s} is not a size (like 32G, 512M or 4096)"),
                );
            }
            b
        });
        let read_only = self.flag(key, &p, "ro").unwrap_or(false) || cdrom;
        let discard = p.get("discard") == Some("on");
        self.report_drive_options(key, &p);
        let (controller, unit) = if bus == Bus::Ide {
            (index / 2, index % 2)
        } else {
            (0, index)
        };
        self.vm.disks.push(Disk {
            device,
            bus,
            controller,
            unit,
            source,
            format,
            size,
            read_only,
            boot_order: None,
            mode: None,
            shared: false,
            thin: false,
            discard,
            passthrough: false,
        });
        self.disk_keys.push(key.to_string());
        self.disk_cloudinit.push(cloudinit);
    }

    /// `format=`, else what the volume name implies. Proxmox opens an
    /// absolute path as raw unless `format=` says otherwise.
    fn drive_format(
        &mut self,
        key: &str,
        p: &Props<'_>,
        source: Option<&DiskRef>,
        cdrom: bool,
    ) -> Option<DiskFormat> {
        let named = match source {
            Some(DiskRef::Volume { volume, .. }) => volume_format(volume),
            Some(DiskRef::File { path }) => {
                path.rsplit_once('.').and_then(|(_, e)| extension_format(e))
            }
            _ => None,
        };
        if let Some(f) = p.get("format") {
            let parsed = f.parse::<DiskFormat>().ok();
            match (parsed, source) {
                (None, _) => self.not_converted(key, format!("format={f}: vmshift reads raw, qcow2 and vmdk only")),
                (Some(g), Some(DiskRef::Volume { .. })) if named.is_some_and(|n| n != g) => self.invalid(
                    key,
                    format!("format={f} differs from the volume's own format; Proxmox refuses to start the VM"),
                ),
                _ => {}
            }
            return parsed;
        }
        match source? {
            _ if cdrom => Some(DiskFormat::Raw),
            DiskRef::Volume { volume, .. } => {
                if named.is_none() {
                    self.not_converted(
                        key,
                        format!("'{volume}' is not in a format vmshift reads (raw, qcow2, vmdk)"),
                    );
                }
                named
            }
            DiskRef::File { path } => match named {
                Some(f) if f != DiskFormat::Raw => {
                    self.invalid(
                        key,
                        format!("{path} has no format=; current Proxmox opens such a path as raw, taken here as {f} from its extension"),
                    );
                    Some(f)
                }
                _ => Some(DiskFormat::Raw),
            },
            DiskRef::Device { .. } | DiskRef::Datastore { .. } => Some(DiskFormat::Raw),
        }
    }

    /// Reports drive options that change what the guest sees and that the
    /// model does not keep (serial numbers, geometry, throttling, …).
    fn report_drive_options(&mut self, key: &str, p: &Props<'_>) {
        const KEPT_OR_HARMLESS: &[&str] = &[
            "file",
            "volume",
            "media",
            "size",
            "format",
            "discard",
            "ro",
            "cache",
            "aio",
            "iothread",
            "ssd",
            "backup",
            "replicate",
            "detect_zeroes",
            "queues",
            "rerror",
            "werror",
            "shared",
        ];
        let dropped: Vec<String> = p
            .pairs
            .iter()
            .filter(|(k, _)| !KEPT_OR_HARMLESS.contains(k))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if !dropped.is_empty() {
            self.not_converted(
                key,
                format!("drive options not carried over: {}", dropped.join(", ")),
            );
        }
    }

    fn nics(&mut self) {
        for i in 0..32 {
            let key = format!("net{i}");
            if let Some(v) = self.get(&key) {
                self.nic(&key, v);
            }
        }
    }

    fn nic(&mut self, key: &str, value: &str) {
        let p = Props::parse(value);
        self.report_duplicates(key, &p);
        // `virtio=MAC`, `virtio` alone, or `model=virtio,macaddr=MAC`.
        let mut model = p.default;
        let mut mac = None;
        for (k, v) in &p.pairs {
            if NIC_MODELS.contains(k) {
                model = Some(*k);
                mac = Some(*v);
            }
        }
        model = p.get("model").or(model);
        mac = p.get("macaddr").or(mac);
        let Some(model) = model else {
            self.invalid(key, "the NIC has no model; not carried over");
            return;
        };
        if !NIC_MODELS.contains(&model) {
            self.invalid(
                key,
                format!("'{model}' is not a Proxmox NIC model; kept as written"),
            );
        }
        let link_down = self.flag(key, &p, "link_down").unwrap_or(false);
        let vlan = match p.get("tag") {
            None => None,
            Some(t) => match t.trim().parse::<u16>() {
                Ok(v) if (1..=4094).contains(&v) => Some(v),
                _ => {
                    self.invalid(key, format!("tag={t}: a VLAN tag is 1 to 4094; left out"));
                    None
                }
            },
        };
        const KEPT_OR_HARMLESS: &[&str] =
            &["model", "macaddr", "bridge", "link_down", "firewall", "tag"];
        let dropped: Vec<String> = p
            .pairs
            .iter()
            .filter(|(k, _)| !KEPT_OR_HARMLESS.contains(k) && !NIC_MODELS.contains(k))
            .map(|(k, v)| match *k {
                "trunks" => format!("VLAN trunks {v}"),
                _ => format!("{k}={v}"),
            })
            .collect();
        if !dropped.is_empty() {
            self.not_converted(
                key,
                format!("NIC settings not carried over: {}", dropped.join(", ")),
            );
        }
        self.vm.nics.push(Nic {
            model: model.to_string(),
            mac: mac.map(str::to_ascii_lowercase),
            network: None,
            bridge: p.get("bridge").map(str::to_string),
            connected: !link_down,
            boot_order: None,
            vlan,
        });
        self.nic_keys.push(key.to_string());
    }

    fn serials(&mut self) {
        for port in 0..4 {
            let key = format!("serial{port}");
            let Some(v) = self.get(&key) else { continue };
            // `socket` is the VM's console on the host (`qm terminal`).
            let serial = match v {
                "socket" => Serial {
                    port,
                    kind: SerialKind::Pty,
                    target: None,
                },
                d if d.starts_with("/dev/") => Serial {
                    port,
                    kind: SerialKind::Device,
                    target: Some(d.to_string()),
                },
                other => {
                    self.invalid(
                        &key,
                        format!("'{other}' is not 'socket' or a /dev path; not carried over"),
                    );
                    continue;
                }
            };
            self.vm.serials.push(serial);
        }
    }

    /// The display; without `vga`, Proxmox's default (standard VGA, Cirrus
    /// for Windows XP/2000/2003) with its VNC console.
    fn graphics(&mut self) {
        let p = self.get("vga").map(Props::parse).unwrap_or_default();
        self.report_duplicates("vga", &p);
        let old_windows = matches!(self.get("ostype"), Some("wxp" | "w2k" | "w2k3"));
        let default = if old_windows { "cirrus" } else { "std" };
        let ty = p.first("type").unwrap_or(default);
        let (video, protocol) = match ty {
            "std" => ("vga", Some("vnc")),
            "cirrus" => ("cirrus", Some("vnc")),
            "vmware" => ("vmvga", Some("vnc")),
            "virtio" => ("virtio", Some("vnc")),
            "qxl" => ("qxl", Some("spice")),
            "none" => ("none", None),
            "virtio-gl" => {
                self.not_converted(
                    "vga",
                    "virtio-gl: the 3D acceleration is not carried over (plain virtio)",
                );
                ("virtio", Some("vnc"))
            }
            "qxl2" | "qxl3" | "qxl4" => {
                self.not_converted(
                    "vga",
                    format!("{ty}: the extra monitors are not carried over (one qxl display)"),
                );
                ("qxl", Some("spice"))
            }
            s if s
                .strip_prefix("serial")
                .is_some_and(|n| matches!(n, "0" | "1" | "2" | "3")) =>
            {
                self.not_converted(
                    "vga",
                    format!("the display is the serial console {s}: no video device"),
                );
                ("none", None)
            }
            other => {
                self.invalid(
                    "vga",
                    format!("'{other}' is not a Proxmox display type; standard VGA is assumed"),
                );
                ("vga", Some("vnc"))
            }
        };
        let vram_kib = p.get("memory").and_then(|m| {
            let kib = m.parse::<u64>().ok().and_then(|mib| mib.checked_mul(1024));
            if kib.is_none() {
                self.invalid("vga", format!("memory={m} is not a number of MiB"));
            }
            kib
        });
        self.vm.graphics = Some(Graphics {
            protocol: protocol.map(str::to_string),
            video: Some(video.to_string()),
            vram_kib: vram_kib.filter(|_| video != "none"),
        });
    }

    /// `boot: order=a;b;c`, or the legacy `boot: cdn` + `bootdisk:`.
    /// Without either, no device gets a boot order (the model then boots
    /// the first disk).
    fn boot(&mut self) {
        let order: Vec<String> = match self.get("boot") {
            Some(b) => {
                let p = Props::parse(b);
                match p.get("order") {
                    Some(o) => o
                        .split([';', ' '])
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect(),
                    None => {
                        let legacy = p.first("legacy").unwrap_or("cdn");
                        let ok = (1..=4).contains(&legacy.len())
                            && legacy.chars().all(|c| matches!(c, 'a' | 'c' | 'd' | 'n'));
                        if ok {
                            self.legacy_order(legacy)
                        } else {
                            self.invalid(
                                "boot",
                                format!("'{}' is neither order=… nor legacy [acdn]{{1,4}}; Proxmox's default 'cdn' applies", excerpt(legacy)),
                            );
                            self.legacy_order("cdn")
                        }
                    }
                }
            }
            None if self.get("bootdisk").is_some() => self.legacy_order("cdn"),
            None => {
                if self.vm.disks.iter().any(|d| d.device == DeviceKind::Disk) {
                    self.note(
                        Severity::Info,
                        BOOT_ASSUMED,
                        "conf:boot",
                        "no boot order (neither boot nor bootdisk): the first disk is taken as the boot disk",
                    );
                }
                return;
            }
        };
        let mut n = 0u32;
        let mut seen = HashSet::new();
        for dev in &order {
            if !seen.insert(dev.as_str()) {
                continue;
            }
            if let Some(i) = self.disk_keys.iter().position(|k| k == dev) {
                if let Some(d) = self.vm.disks.get_mut(i) {
                    n += 1;
                    d.boot_order = Some(n);
                }
            } else if let Some(i) = self.nic_keys.iter().position(|k| k == dev) {
                if let Some(nic) = self.vm.nics.get_mut(i) {
                    n += 1;
                    nic.boot_order = Some(n);
                }
            } else if dev.starts_with("hostpci") || dev.starts_with("usb") {
                self.not_converted("boot", format!("the boot order names {dev}, a passed-through device, which is not converted"));
            } else {
                self.invalid(
                    "boot",
                    format!("the boot order names {dev}, which the config does not define"),
                );
            }
        }
    }

    /// `bootorder_from_legacy`: `c` is the `bootdisk`, `d` every CD-ROM (the
    /// cloud-init drive aside), `n` every NIC, in the order of the letters.
    fn legacy_order(&self, letters: &str) -> Vec<String> {
        // At most four letters (checked by the caller).
        let mut index: HashMap<char, u32> = HashMap::new();
        for (i, c) in (1u32..).zip(letters.chars().take(4)) {
            index.insert(c, i * 100);
        }
        let bootdisk = self.get("bootdisk");
        let mut out: Vec<(u32, &str)> = Vec::new();
        for ((d, key), cloudinit) in self
            .vm
            .disks
            .iter()
            .zip(&self.disk_keys)
            .zip(&self.disk_cloudinit)
        {
            if d.device == DeviceKind::Cdrom && !cloudinit {
                if let Some(n) = index.get_mut(&'d') {
                    out.push((*n, key.as_str()));
                    *n += 1;
                }
            } else if let Some(n) = index.get_mut(&'c') {
                if bootdisk == Some(key.as_str()) {
                    out.push((*n, key.as_str()));
                }
                *n += 1;
            }
        }
        if let Some(n) = index.get_mut(&'n') {
            for key in &self.nic_keys {
                out.push((*n, key.as_str()));
                *n += 1;
            }
        }
        out.sort_by_key(|(n, _)| *n);
        out.into_iter().map(|(_, k)| k.to_string()).collect()
    }

    /// `args:`, known settings the model has no place for, unknown keys.
    fn other_keys(&mut self) {
        let doc = self.doc;
        let mut cloud_init = Vec::new();
        let mut unused = Vec::new();
        for (key, value) in doc.entries() {
            match key_class(key) {
                KeyClass::Modelled | KeyClass::Quiet => {}
                KeyClass::Args => self.note(
                    Severity::Warning,
                    ARGS,
                    "conf:args",
                    format!("raw QEMU arguments are not converted (and vmshift never writes them): {}", excerpt(value)),
                ),
                KeyClass::Lock => self.note(
                    Severity::Warning,
                    LOCKED,
                    "conf:lock",
                    format!("the VM is locked ({value}): a backup, migration or snapshot may be under way and the config mid-change"),
                ),
                KeyClass::Template => {
                    if parse_bool(value) == Some(true) {
                        self.note(
                            Severity::Info,
                            TEMPLATE,
                            "conf:template",
                            "the VM is a Proxmox template (its disks are base volumes of linked clones)",
                        );
                    }
                }
                KeyClass::Unused => unused.push(format!("{key} ({value})")),
                KeyClass::CloudInit => cloud_init.push(key),
                KeyClass::Guest(severity, what) => {
                    let off = match key {
                        "agent" => Props::parse(value)
                            .first("enabled")
                            .and_then(parse_bool)
                            == Some(false),
                        "numa" => parse_bool(value) == Some(false),
                        "arch" => value == "x86_64",
                        _ => false,
                    };
                    if !off {
                        self.note(
                            severity,
                            NOT_CONVERTED,
                            format!("conf:{key}"),
                            format!("{what} ({key}: {}) is not converted", excerpt(value)),
                        );
                    }
                }
                KeyClass::Unknown => self.note(
                    Severity::Info,
                    UNKNOWN_KEY,
                    format!("conf:{key}"),
                    format!("'{key}' is not a Proxmox VE setting vmshift knows; ignored"),
                ),
            }
        }
        if let Some(first) = cloud_init.first() {
            let path = format!("conf:{first}");
            self.note(
                Severity::Info,
                NOT_CONVERTED,
                path,
                format!(
                    "cloud-init settings are not converted: {}",
                    cloud_init.join(", ")
                ),
            );
        }
        if !unused.is_empty() {
            self.not_converted(
                "unused0",
                format!("detached volumes are not converted: {}", unused.join(", ")),
            );
        }
    }

    fn sections(&mut self) {
        for s in &self.doc.sections {
            match s.kind {
                SectionKind::Snapshot => self.vm.snapshots.push(s.name.clone()),
                SectionKind::Special => {}
                SectionKind::Pending => {
                    let mut changes = Vec::new();
                    for (k, v) in s.lines.iter().filter_map(Line::pair) {
                        if k == "delete" {
                            changes.push(format!("delete {v}"));
                        } else {
                            changes.push(k.to_string());
                        }
                    }
                    if !changes.is_empty() {
                        self.findings.push(Finding::new(
                            Severity::Warning,
                            PENDING,
                            format!("conf:[{}]", s.name),
                            format!(
                                "changes waiting for a restart are not applied ({}); the current state is converted",
                                changes.join(", ")
                            ),
                        ));
                    }
                }
                SectionKind::Unknown => self.findings.push(Finding::new(
                    Severity::Warning,
                    UNKNOWN_SECTION,
                    format!("conf:[{}]", s.name),
                    format!(
                        "Proxmox skips the unknown section [{}]; so does vmshift",
                        s.name
                    ),
                )),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Raising
// ---------------------------------------------------------------------------

/// How [`raise`] writes a `.conf`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RaiseOptions {
    /// The VMID the config is written for
    /// (`/etc/pve/qemu-server/<vmid>.conf`): it names a VM that has no
    /// usable name (`vm<vmid>`) and fills in the `qm` commands findings
    /// suggest.
    pub vmid: Option<u32>,
    /// The bridge for NICs the model attaches to none; `vmbr0` when unset.
    pub bridge: Option<String>,
}

/// A `.conf` raised from the model, and what could not be written as the
/// model says.
#[derive(Debug, Clone, PartialEq)]
pub struct Raised {
    /// The config.
    pub doc: ConfDocument,
    /// Every place the config differs from the model (codes
    /// `proxmox-raise-mapped` and `proxmox-raise-dropped`).
    pub findings: Vec<Finding>,
}

/// A `.conf` for `vm`, as Proxmox writes one; see [`raise_with_findings`]
/// for what did not fit.
pub fn raise(vm: &Vm, opts: &RaiseOptions) -> ConfDocument {
    raise_with_findings(vm, opts).doc
}

/// A `.conf` for `vm`: the description as `#` lines, then the keys in
/// Proxmox's (sorted) order; drives as `storage:volume` or a path with
/// `size=32G`-style sizes, NICs as `model=MAC,bridge=…`, `bios: ovmf` with
/// an `efidisk0` when the model names the variable store. Never an
/// `args:` line. What Proxmox cannot express (a floppy, an NVMe disk, a
/// VMware datastore path, a TPM without a state volume) is reported.
pub fn raise_with_findings(vm: &Vm, opts: &RaiseOptions) -> Raised {
    let mut r = Raiser {
        vm,
        opts,
        keys: BTreeMap::new(),
        findings: Vec::new(),
    };
    r.name();
    r.cpu_memory();
    r.guest();
    r.firmware();
    r.identity();
    let disk_keys = r.disks();
    r.scsihw(&disk_keys);
    let nic_keys = r.nics();
    r.serials();
    r.graphics();
    r.boot(&disk_keys, &nic_keys);
    r.tpm();
    let mut doc = ConfDocument {
        main: vm
            .description
            .as_deref()
            .map(|d| description_lines(d, Eol::Lf))
            .unwrap_or_default(),
        sections: Vec::new(),
    };
    for (k, v) in &r.keys {
        doc.main.push(Line::entry(k, v, Eol::Lf));
    }
    Raised {
        doc,
        findings: r.findings,
    }
}

/// Where a disk goes: the Proxmox bus, its number of drives, and whether
/// the model's own bus is kept (so its unit can be too).
#[derive(Debug, Clone, Copy)]
struct Slot {
    prefix: &'static str,
    max: u32,
    kept: bool,
}

struct Raiser<'a> {
    vm: &'a Vm,
    opts: &'a RaiseOptions,
    keys: BTreeMap<String, String>,
    findings: Vec<Finding>,
}

impl Raiser<'_> {
    fn put(&mut self, key: &str, value: impl Into<String>) {
        let value = value.into();
        if value.contains(['\n', '\r']) {
            self.dropped(
                Severity::Error,
                format!("conf:{key}"),
                "the value spans lines, which a .conf cannot hold",
            );
            return;
        }
        self.keys.insert(key.to_string(), value);
    }

    fn mapped(&mut self, severity: Severity, path: impl Into<String>, message: impl Into<String>) {
        self.findings
            .push(Finding::new(severity, RAISE_MAPPED, path, message));
    }

    fn dropped(&mut self, severity: Severity, path: impl Into<String>, message: impl Into<String>) {
        self.findings
            .push(Finding::new(severity, RAISE_DROPPED, path, message));
    }

    /// The VMID for `qm` commands in messages.
    fn vmid(&self) -> String {
        self.opts
            .vmid
            .map_or_else(|| "<vmid>".to_string(), |v| v.to_string())
    }

    fn name(&mut self) {
        let vm = self.vm;
        let clean = dns_name(&vm.name);
        let name = if clean.is_empty() {
            self.opts.vmid.map(|id| format!("vm{id}"))
        } else {
            Some(clean)
        };
        match name {
            Some(n) => {
                if n != vm.name {
                    self.mapped(
                        Severity::Info,
                        "name",
                        format!(
                            "Proxmox wants a DNS name: '{}' is written as '{n}'",
                            vm.name
                        ),
                    );
                }
                self.put("name", n);
            }
            None => self.dropped(
                Severity::Info,
                "name",
                "the VM has no name Proxmox can take; Proxmox shows it as 'VM <vmid>'",
            ),
        }
    }

    fn cpu_memory(&mut self) {
        let c = self.vm.cpu;
        let product = u64::from(c.sockets) * u64::from(c.cores) * u64::from(c.threads);
        let consistent = c.vcpus > 0 && product == u64::from(c.vcpus);
        let (sockets, cores) = if consistent {
            (c.sockets, c.cores * c.threads)
        } else {
            (1, c.vcpus.max(1))
        };
        if !consistent {
            self.mapped(
                Severity::Warning,
                "cpu",
                format!("{} sockets × {} cores × {} threads is not {} vCPUs: written as one socket of {cores} cores", c.sockets, c.cores, c.threads, c.vcpus),
            );
        } else if c.threads > 1 {
            self.mapped(
                Severity::Info,
                "cpu.threads",
                format!("Proxmox has no threads per core: {} cores × {} threads become {cores} cores per socket", c.cores, c.threads),
            );
        }
        self.put("sockets", sockets.to_string());
        self.put("cores", cores.to_string());
        self.put("memory", self.vm.memory_mib.to_string());
    }

    fn guest(&mut self) {
        let vm = self.vm;
        let g = &vm.guest;
        let family_of = |os: &str| match os {
            "l24" | "l26" => OsFamily::Linux,
            "solaris" => OsFamily::Solaris,
            "other" => OsFamily::Other,
            _ => OsFamily::Windows,
        };
        let same_family =
            |os: &str| family_of(os) == g.family || (os == "other" && g.family == OsFamily::Bsd);
        let kept = g
            .source_id
            .as_deref()
            .and_then(|id| OSTYPES.iter().find(|o| **o == id))
            .copied()
            .filter(|os| same_family(os));
        let ostype = match (kept, g.family) {
            (Some(os), _) => os,
            (None, OsFamily::Linux) => "l26",
            (None, OsFamily::Solaris) => "solaris",
            (None, OsFamily::Bsd | OsFamily::Other) => "other",
            (None, OsFamily::Windows) => {
                let guess = g
                    .version
                    .as_deref()
                    .and_then(windows_ostype)
                    .or_else(|| g.source_id.as_deref().and_then(windows_ostype));
                match guess {
                    Some(os) => os,
                    None => {
                        let version = g.version.as_deref().unwrap_or("unknown");
                        self.mapped(
                            Severity::Info,
                            "guest.version",
                            format!("Windows version '{version}' has no Proxmox ostype of its own: win10"),
                        );
                        "win10"
                    }
                }
            }
        };
        self.put("ostype", ostype);
        // Proxmox turns local time on for Windows ostypes by itself: say
        // so either way.
        if vm.clock_localtime {
            self.put("localtime", "1");
        } else if ostype.starts_with('w') {
            self.put("localtime", "0");
        }
    }

    fn firmware(&mut self) {
        let vm = self.vm;
        let uefi = vm.firmware.kind == FirmwareKind::Uefi;
        if uefi {
            self.put("bios", "ovmf");
        }
        match vm.machine.as_deref() {
            Some(m) if machine_is_valid(m) => self.put("machine", m),
            Some(m) => {
                let to = (m.contains("q35") || uefi).then_some("q35");
                self.mapped(
                    Severity::Warning,
                    "machine",
                    format!(
                        "Proxmox has no machine type '{m}': {}",
                        to.unwrap_or("its default (i440fx) is used")
                    ),
                );
                if let Some(t) = to {
                    self.put("machine", t);
                }
            }
            None if uefi => self.put("machine", "q35"),
            None => {}
        }
        let sb = vm.firmware.secure_boot;
        match (&vm.firmware.efi_vars, uefi) {
            (Some(r), true) => match efidisk_value(r, sb) {
                Ok(v) => self.put("efidisk0", v),
                Err(msg) => self.dropped(Severity::Warning, "firmware.efi-vars", msg),
            },
            (None, true) => {
                let keys = if sb { ",pre-enrolled-keys=1" } else { "" };
                self.mapped(
                    Severity::Info,
                    "firmware.efi-vars",
                    format!(
                        "no EFI variable store: create one with `qm set {} --efidisk0 <storage>:1,efitype=4m{keys}`",
                        self.vmid()
                    ),
                );
            }
            (Some(_), false) => self.dropped(
                Severity::Info,
                "firmware.efi-vars",
                "an EFI variable store on a BIOS VM is not written",
            ),
            (None, false) => {}
        }
        if sb && !uefi {
            self.dropped(
                Severity::Warning,
                "firmware.secure-boot",
                "Secure Boot needs UEFI; not written",
            );
        }
    }

    fn identity(&mut self) {
        let vm = self.vm;
        if let Some(u) = &vm.uuid {
            if uuid_is_valid(u) {
                self.put("smbios1", format!("uuid={}", u.to_ascii_lowercase()));
            } else {
                self.dropped(
                    Severity::Warning,
                    "uuid",
                    format!("'{u}' is not a UUID; Proxmox would refuse it"),
                );
            }
        }
        if let Some(g) = &vm.genid {
            if uuid_is_valid(g) {
                self.put("vmgenid", g.to_ascii_lowercase());
            } else {
                self.dropped(
                    Severity::Warning,
                    "genid",
                    format!("'{g}' is not a UUID; Proxmox would refuse it"),
                );
            }
        }
    }

    /// Writes the drives; the Proxmox key of each of `vm.disks` (`None`
    /// for one not written).
    fn disks(&mut self) -> Vec<Option<String>> {
        let vm = self.vm;
        let mut drives: Vec<Option<(Slot, String)>> = Vec::with_capacity(vm.disks.len());
        for (i, d) in vm.disks.iter().enumerate() {
            let path = format!("disks[{i}]");
            let Some(slot) = self.slot(&path, d) else {
                drives.push(None);
                continue;
            };
            match self.drive_value(&path, d, slot.prefix) {
                Ok(v) => drives.push(Some((slot, v))),
                Err(msg) => {
                    self.dropped(Severity::Error, path, msg);
                    drives.push(None);
                }
            }
        }
        // Keep each disk's own number where it is free, then fill gaps.
        let mut used: HashMap<&str, BTreeSet<u32>> = HashMap::new();
        let mut keys: Vec<Option<String>> = vec![None; vm.disks.len()];
        for ((d, drive), key) in vm.disks.iter().zip(&drives).zip(keys.iter_mut()) {
            let Some((slot, _)) = drive else { continue };
            if let Some(n) = preferred_index(d, *slot) {
                if used.entry(slot.prefix).or_default().insert(n) {
                    *key = Some(format!("{}{n}", slot.prefix));
                }
            }
        }
        for (i, ((d, drive), key)) in vm
            .disks
            .iter()
            .zip(&drives)
            .zip(keys.iter_mut())
            .enumerate()
        {
            let Some((slot, _)) = drive else { continue };
            if key.is_some() {
                continue;
            }
            let taken = used.entry(slot.prefix).or_default();
            match (0..slot.max).find(|n| !taken.contains(n)) {
                Some(n) => {
                    taken.insert(n);
                    let k = format!("{}{n}", slot.prefix);
                    self.mapped(
                        Severity::Info,
                        format!("disks[{i}]"),
                        format!(
                            "{} becomes {k}: Proxmox numbers drives per bus",
                            d.address()
                        ),
                    );
                    *key = Some(k);
                }
                None => self.dropped(
                    Severity::Error,
                    format!("disks[{i}]"),
                    format!(
                        "no free {} slot for {} (Proxmox has {})",
                        slot.prefix,
                        d.address(),
                        slot.max
                    ),
                ),
            }
        }
        for (drive, key) in drives.into_iter().zip(&keys) {
            if let (Some((_, value)), Some(k)) = (drive, key) {
                self.put(k, value);
            }
        }
        keys
    }

    /// The Proxmox bus for a disk (reporting a move), `None` for one
    /// Proxmox cannot hold.
    fn slot(&mut self, path: &str, d: &Disk) -> Option<Slot> {
        let slot = |prefix, max, kept| Some(Slot { prefix, max, kept });
        match (d.device, d.bus) {
            (DeviceKind::Floppy, _) | (_, Bus::Fdc) => {
                self.dropped(Severity::Warning, path, "Proxmox VE has no floppy drive");
                None
            }
            (DeviceKind::Cdrom, Bus::Virtio | Bus::Nvme | Bus::Usb) => {
                self.mapped(
                    Severity::Info,
                    format!("{path}.bus"),
                    format!("Proxmox has no {} CD-ROM: it goes on IDE", d.bus),
                );
                slot("ide", 4, false)
            }
            (_, Bus::Ide) => slot("ide", 4, true),
            (_, Bus::Sata) => slot("sata", 6, true),
            (_, Bus::Scsi) => slot("scsi", 31, true),
            (_, Bus::Virtio) => slot("virtio", 16, true),
            (_, Bus::Nvme) => {
                self.mapped(
                    Severity::Warning,
                    format!("{path}.bus"),
                    "Proxmox VE has no NVMe drive: the disk becomes a virtio disk",
                );
                slot("virtio", 16, false)
            }
            (_, Bus::Usb) => {
                self.mapped(
                    Severity::Warning,
                    format!("{path}.bus"),
                    "Proxmox VE has no USB disk: the disk goes on SATA",
                );
                slot("sata", 6, false)
            }
        }
    }

    /// `volume,discard=on,format=…,media=cdrom,ro=1,size=…` (options in
    /// Proxmox's order).
    fn drive_value(
        &mut self,
        path: &str,
        d: &Disk,
        prefix: &str,
    ) -> std::result::Result<String, String> {
        let mut out = match (&d.source, d.device) {
            (Some(r), _) => source_text(r)?,
            (None, DeviceKind::Cdrom) => "none".to_string(),
            (None, _) => return Err(format!("the disk at {} has no image", d.address())),
        };
        let disk = d.device == DeviceKind::Disk;
        if disk && d.discard {
            out.push_str(",discard=on");
        }
        if let (true, Some(f), Some(r)) = (disk, d.format, &d.source) {
            if format_option_needed(r, f) {
                out.push_str(&format!(",format={f}"));
            }
        }
        if d.device == DeviceKind::Cdrom {
            out.push_str(",media=cdrom");
        }
        if disk && d.read_only {
            if matches!(prefix, "scsi" | "virtio") {
                out.push_str(",ro=1");
            } else {
                self.dropped(
                    Severity::Warning,
                    format!("{path}.read-only"),
                    "Proxmox cannot make an IDE or SATA disk read-only: it is writable",
                );
            }
        }
        if disk && d.shared {
            self.mapped(
                Severity::Warning,
                format!("{path}.shared"),
                "Proxmox has no multi-writer flag: attach the same volume to each VM (with cache=none) by hand",
            );
        }
        if let Some(size) = d.size {
            out.push_str(&format!(",size={}", pve_size(size)));
        }
        Ok(out)
    }

    fn scsihw(&mut self, disk_keys: &[Option<String>]) {
        let vm = self.vm;
        let has_scsi = disk_keys.iter().flatten().any(|k| k.starts_with("scsi"));
        let scsi: Vec<&Controller> = vm
            .controllers
            .iter()
            .filter(|c| c.bus == Bus::Scsi)
            .collect();
        if !has_scsi && scsi.is_empty() {
            return;
        }
        let models: BTreeSet<&str> = scsi.iter().filter_map(|c| c.model.as_deref()).collect();
        let model = scsi
            .iter()
            .find(|c| c.index == 0)
            .or(scsi.first())
            .and_then(|c| c.model.as_deref());
        let (hw, note) = scsihw_for(model);
        if models.len() > 1 {
            let all: Vec<&str> = models.into_iter().collect();
            self.mapped(
                Severity::Warning,
                "controllers",
                format!(
                    "Proxmox has one SCSI controller model per VM: {} become {hw}",
                    all.join(", ")
                ),
            );
        }
        if let Some(n) = note {
            self.mapped(Severity::Warning, "controllers", n);
        }
        self.put("scsihw", hw);
    }

    fn nics(&mut self) -> Vec<Option<String>> {
        let vm = self.vm;
        let opts = self.opts;
        let mut keys = Vec::with_capacity(vm.nics.len());
        for (i, n) in vm.nics.iter().enumerate() {
            let path = format!("nics[{i}]");
            if i >= 32 {
                self.dropped(
                    Severity::Error,
                    path,
                    "Proxmox has 32 NICs at most (net0 to net31)",
                );
                keys.push(None);
                continue;
            }
            let model = self.nic_model(&path, &n.model);
            let mut value = match n.mac.as_deref() {
                Some(m) if mac_is_valid(m) => format!("{model}={}", m.to_ascii_uppercase()),
                Some(m) => {
                    self.dropped(
                        Severity::Error,
                        format!("{path}.mac"),
                        format!("'{m}' is not a MAC address, which Proxmox refuses: left out, Proxmox generates one"),
                    );
                    model.to_string()
                }
                None => model.to_string(),
            };
            let default_bridge = opts.bridge.as_deref().unwrap_or("vmbr0");
            let bridge = match n.bridge.as_deref() {
                Some(b) if is_bridge_name(b) => b.to_string(),
                Some(b) => {
                    self.mapped(
                        Severity::Warning,
                        format!("{path}.bridge"),
                        format!("'{b}' is not a bridge name: {default_bridge}"),
                    );
                    default_bridge.to_string()
                }
                None => {
                    if let Some(net) = &n.network {
                        self.mapped(
                            Severity::Info,
                            format!("{path}.network"),
                            format!("network '{net}' has no Proxmox equivalent: the NIC is on bridge {default_bridge}"),
                        );
                    }
                    default_bridge.to_string()
                }
            };
            value.push_str(&format!(",bridge={bridge}"));
            if let Some(tag) = n.vlan {
                value.push_str(&format!(",tag={tag}"));
            }
            if !n.connected {
                value.push_str(",link_down=1");
            }
            let key = format!("net{i}");
            self.put(&key, value);
            keys.push(Some(key));
        }
        keys
    }

    fn nic_model(&mut self, path: &str, model: &str) -> &'static str {
        let m = model.to_ascii_lowercase();
        if let Some(known) = NIC_MODELS.iter().find(|k| **k == m) {
            return known;
        }
        let (to, why) = match m.as_str() {
            "virtio-net" | "virtio-net-pci" => ("virtio", None),
            "vlance" => ("pcnet", Some("VMware's vlance is an AMD PCnet")),
            "vmxnet" | "vmxnet2" => ("vmxnet3", Some("Proxmox emulates vmxnet3 only")),
            _ => ("e1000", Some("an NIC model Proxmox does not emulate")),
        };
        if let Some(why) = why {
            self.mapped(
                Severity::Warning,
                format!("{path}.model"),
                format!("{model} becomes {to}: {why}"),
            );
        }
        to
    }

    fn serials(&mut self) {
        let vm = self.vm;
        for (i, s) in vm.serials.iter().enumerate() {
            let path = format!("serials[{i}]");
            if s.port > 3 {
                self.dropped(
                    Severity::Warning,
                    path,
                    format!("Proxmox has serial0 to serial3 only, not port {}", s.port),
                );
                continue;
            }
            let key = format!("serial{}", s.port);
            if self.keys.contains_key(&key) {
                self.dropped(
                    Severity::Warning,
                    path,
                    format!("port {} is already taken", s.port),
                );
                continue;
            }
            let value = match (s.kind, s.target.as_deref()) {
                (SerialKind::Pty, _) => "socket".to_string(),
                (SerialKind::Device, Some(t))
                    if t.starts_with("/dev/") && !t.contains([',', ' ']) =>
                {
                    t.to_string()
                }
                (kind, target) => {
                    let to = target.map(|t| format!(" ({t})")).unwrap_or_default();
                    self.mapped(
                        Severity::Info,
                        path,
                        format!("Proxmox serial ports are a socket (qm terminal) or a host device: the {} port{to} becomes a socket", serial_kind_name(kind)),
                    );
                    "socket".to_string()
                }
            };
            self.put(&key, value);
        }
    }

    fn graphics(&mut self) {
        let vm = self.vm;
        let Some(g) = &vm.graphics else { return };
        let ty = match g.video.as_deref() {
            Some("vga" | "std") => "std",
            Some("cirrus") => "cirrus",
            Some("vmvga" | "vmware" | "svga") => "vmware",
            Some("qxl") => "qxl",
            Some("virtio" | "virtio-gpu") => "virtio",
            Some("none") => "none",
            None if g.protocol.as_deref() == Some("spice") => "qxl",
            None => return,
            Some(other) => {
                self.mapped(
                    Severity::Info,
                    "graphics.video",
                    format!("Proxmox has no '{other}' display: standard VGA"),
                );
                "std"
            }
        };
        let mut value = ty.to_string();
        if let (Some(kib), false) = (g.vram_kib, ty == "none") {
            let mib = kib.div_ceil(1024);
            if (4..=512).contains(&mib) {
                value.push_str(&format!(",memory={mib}"));
            } else {
                self.mapped(
                    Severity::Info,
                    "graphics.vram-kib",
                    format!("Proxmox takes 4 to 512 MiB of video memory, not {kib} KiB: left at its default"),
                );
            }
        }
        self.put("vga", value);
    }

    fn boot(&mut self, disk_keys: &[Option<String>], nic_keys: &[Option<String>]) {
        let vm = self.vm;
        let mut order: Vec<(u32, &str)> = Vec::new();
        let disks = vm.disks.iter().map(|d| d.boot_order).zip(disk_keys);
        let nics = vm.nics.iter().map(|n| n.boot_order).zip(nic_keys);
        for (o, key) in disks.chain(nics) {
            if let (Some(o), Some(k)) = (o, key) {
                order.push((o, k.as_str()));
            }
        }
        order.sort();
        // Proxmox always writes a boot order (and boots only what it
        // names): without one in the model, the disk the model boots.
        if order.is_empty() {
            let boot_disk = vm
                .boot_disk()
                .and_then(|(i, _)| disk_keys.get(i))
                .and_then(Option::as_deref);
            order.extend(boot_disk.map(|k| (1, k)));
        }
        if !order.is_empty() {
            let list: Vec<&str> = order.iter().map(|(_, k)| *k).collect();
            self.put("boot", format!("order={}", list.join(";")));
        }
    }

    fn tpm(&mut self) {
        if self.vm.tpm {
            let msg = format!(
                "a vTPM needs a state volume the model does not name: add one with `qm set {} --tpmstate0 <storage>:1,version=v2.0` (the source TPM's secrets do not move)",
                self.vmid()
            );
            self.dropped(Severity::Warning, "tpm", msg);
        }
    }
}

/// The drive number a disk keeps when its bus is kept: IDE `c:u` is
/// `ide(2c+u)`, others `unit` on controller 0.
fn preferred_index(d: &Disk, slot: Slot) -> Option<u32> {
    if !slot.kept {
        return None;
    }
    let n = if d.bus == Bus::Ide {
        (d.controller < 2 && d.unit < 2).then(|| d.controller * 2 + d.unit)?
    } else {
        (d.controller == 0).then_some(d.unit)?
    };
    (n < slot.max).then_some(n)
}

/// A reference as a drive's volume; an error for what Proxmox cannot
/// read back as the same reference.
fn source_text(r: &DiskRef) -> std::result::Result<String, String> {
    let text = match r {
        DiskRef::Volume { storage, volume } => {
            if storage.is_empty() || volume.is_empty() || storage.contains(['/', ':']) {
                return Err(format!("'{storage}:{volume}' is not a Proxmox volume id"));
            }
            format!("{storage}:{volume}")
        }
        DiskRef::File { path } | DiskRef::Device { path } => {
            if !path.starts_with('/') && path.contains(':') {
                return Err(format!("'{path}' would read as a Proxmox storage volume; use an absolute path"));
            }
            path.clone()
        }
        DiskRef::Datastore { datastore, path } => {
            return Err(format!(
                "[{datastore}] {path} is on a VMware datastore; copy or convert the disk to a Proxmox storage first"
            ))
        }
    };
    if text.is_empty()
        || text.contains(',')
        || text.chars().any(char::is_control)
        || text == "none"
        || text == "cdrom"
    {
        return Err(format!(
            "'{text}' cannot be a Proxmox drive volume (no commas or control characters, not none or cdrom)"
        ));
    }
    Ok(text)
}

/// Whether `format=` must be spelled out: a volume's name implies its
/// format; Proxmox opens any path as raw unless told.
fn format_option_needed(r: &DiskRef, f: DiskFormat) -> bool {
    match r {
        DiskRef::Volume { volume, .. } => volume_format(volume) != Some(f),
        DiskRef::File { .. } | DiskRef::Device { .. } => f != DiskFormat::Raw,
        DiskRef::Datastore { .. } => false,
    }
}

fn efidisk_value(r: &DiskRef, secure_boot: bool) -> std::result::Result<String, String> {
    if r.file_name().to_ascii_lowercase().ends_with(".nvram") {
        return Err(format!(
            "{r} is a VMware NVRAM file, not an OVMF variable store: Proxmox needs a new efidisk0"
        ));
    }
    let mut v = source_text(r)?;
    v.push_str(",efitype=4m");
    if secure_boot {
        v.push_str(",pre-enrolled-keys=1");
    }
    Ok(v)
}

/// The `scsihw` for a controller model, and why when it is not the same
/// device.
fn scsihw_for(model: Option<&str>) -> (&'static str, Option<String>) {
    let Some(m) = model else {
        return (
            "virtio-scsi-single",
            Some("the SCSI controller has no model: virtio-scsi-single, Proxmox's default for new VMs".into()),
        );
    };
    let hw = match m.to_ascii_lowercase().as_str() {
        "virtio-scsi" | "virtio-scsi-single" | "virtio" => "virtio-scsi-single",
        "virtio-scsi-pci" => "virtio-scsi-pci",
        "pvscsi" | "vmpvscsi" => "pvscsi",
        "lsi" | "lsilogic" | "lsi53c895a" => "lsi",
        "lsi53c810" => "lsi53c810",
        "megasas" | "lsisas1078" => "megasas",
        "lsisas1068" | "mptsas1068" => {
            return (
                "megasas",
                Some("Proxmox has no LSI SAS1068: megasas, the nearest SAS controller, needs the guest's megaraid_sas driver".into()),
            )
        }
        "buslogic" => {
            return (
                "lsi",
                Some("Proxmox has no BusLogic controller: lsi, which needs the guest's sym53c8xx driver".into()),
            )
        }
        _ => {
            return (
                "virtio-scsi-single",
                Some(format!("Proxmox has no SCSI controller '{m}': virtio-scsi-single")),
            )
        }
    };
    (hw, None)
}

/// A name Proxmox's `dns-name` format accepts: labels of letters, digits
/// and inner `-`, joined by `.`.
fn dns_name(name: &str) -> String {
    let valid = name.split('.').all(|label| {
        !label.is_empty()
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    });
    if valid {
        return name.to_string();
    }
    // Anything else becomes one '-' per run.
    let mut mapped = String::with_capacity(name.len());
    for c in name.chars() {
        let c = if c.is_ascii_alphanumeric() || c == '.' {
            c
        } else {
            '-'
        };
        if !(c == '-' && mapped.ends_with('-')) {
            mapped.push(c);
        }
    }
    mapped
        .split('.')
        .map(|label| label.trim_matches('-'))
        .filter(|label| !label.is_empty())
        .collect::<Vec<_>>()
        .join(".")
}

/// Proxmox's `pve-bridge-id`: `[-_.\w\d]+`.
fn is_bridge_name(b: &str) -> bool {
    !b.is_empty()
        && b.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn serial_kind_name(kind: SerialKind) -> &'static str {
    match kind {
        SerialKind::Pty => "pty",
        SerialKind::File => "file",
        SerialKind::Pipe => "pipe",
        SerialKind::Device => "device",
        SerialKind::Network => "network",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINSRV: &str = include_str!("../../../fixtures/vms/proxmox/101.conf");

    /// A Linux VM with cloud-init, the legacy boot keys, `args:`, an
    /// unknown key and an unknown section.
    const LINUX: &str = "\
boot: cdn
bootdisk: virtio0
cores: 2
ide2: local-lvm:vm-102-cloudinit,media=cdrom
ipconfig0: ip=dhcp
memory: 2048
name: web02
net0: virtio=52:54:00:12:34:56,bridge=vmbr0
net1: model=e1000,macaddr=52:54:00:AB:CD:EF,bridge=vmbr1
ostype: l26
sshkeys: ssh-ed25519%20AAAAC3NzaC1lZDI1NTE5AAAAIB%20admin%40host
args: -cpu host,+vmx
frobnicate: yes
serial0: socket
vga: serial0
virtio0: local:102/vm-102-disk-0.qcow2,size=10G

[special:cloudinit]
ipconfig0: ip=dhcp
name: web02

[weird section!]
foo: bar
";

    fn parse(text: &str) -> ConfDocument {
        ConfDocument::parse(text.as_bytes()).expect("parses")
    }

    fn has(findings: &[Finding], code: &str, path: &str) -> bool {
        findings.iter().any(|f| f.code == code && f.path == path)
    }

    fn volume(storage: &str, volume: &str) -> Option<DiskRef> {
        Some(DiskRef::Volume {
            storage: storage.into(),
            volume: volume.into(),
        })
    }

    // --- parse and render -------------------------------------------------

    #[test]
    fn parse_render_realistic_samples_are_byte_identical() {
        for text in [WINSRV, LINUX] {
            assert_eq!(parse(text).render(), text);
        }
    }

    #[test]
    fn parse_render_odd_spacing_and_no_final_newline_are_byte_identical() {
        let text = "#desc\n\n   \t\nname:   web   \nmemory:1024\n\n\n[snap1]  \n#d\nmemory: 512";
        let doc = parse(text);
        assert_eq!(doc.render(), text);
        assert_eq!(doc.get("name"), Some("web"));
        assert_eq!(doc.get("memory"), Some("1024"));
    }

    #[test]
    fn parse_crlf_is_kept_and_read_like_lf() {
        let crlf = WINSRV.replace('\n', "\r\n");
        let doc = ConfDocument::parse(crlf.as_bytes()).unwrap();
        assert_eq!(doc.render(), crlf);
        assert_eq!(doc.get("name"), Some("fs01"));
        assert_eq!(doc.lower(), parse(WINSRV).lower());
    }

    #[test]
    fn parse_keeps_sections_in_order_with_their_kinds() {
        let doc = parse(WINSRV);
        assert_eq!(
            doc.sections(),
            ["PENDING", "before-kb5034439", "initial-setup"]
        );
        assert_eq!(doc.section_kind("PENDING"), Some(SectionKind::Pending));
        assert_eq!(doc.snapshots(), ["before-kb5034439", "initial-setup"]);
        let snap = doc.section_entries("before-kb5034439").unwrap();
        assert!(snap.contains(&("vmstate", "local-lvm:vm-101-state-before-kb5034439")));
        assert!(snap.contains(&("snaptime", "1706526133")));
        let linux = parse(LINUX);
        assert_eq!(
            linux.section_kind("special:cloudinit"),
            Some(SectionKind::Special)
        );
        assert_eq!(
            linux.section_kind("weird section!"),
            Some(SectionKind::Unknown)
        );
        assert_eq!(
            linux.get("frobnicate"),
            Some("yes"),
            "unknown keys are kept"
        );
    }

    #[test]
    fn parse_non_utf8_names_the_line() {
        let err = ConfDocument::parse(b"name: a\nmemory: 1\n#caf\xe9\n").unwrap_err();
        assert_eq!(err.line, Some(3));
        assert!(err.message.contains("UTF-8"), "{err}");
    }

    #[test]
    fn parse_garbage_line_names_the_line() {
        let err = ConfDocument::parse(b"name: a\nthis is not a setting\n").unwrap_err();
        assert_eq!(err.line, Some(2));
        assert!(
            err.to_string().starts_with("line 2: expected 'key: value'"),
            "{err}"
        );
        for bad in [
            "na me: a\n",
            "name : a\n",
            " name: a\n",
            "[snap\n",
            "[snap] x\n",
        ] {
            let err = ConfDocument::parse(bad.as_bytes()).unwrap_err();
            assert_eq!(err.line, Some(1), "{bad:?}: {err}");
        }
    }

    #[test]
    fn parse_duplicate_key_names_line_and_key() {
        let err = ConfDocument::parse(b"name: a\ncores: 2\nname: b\n").unwrap_err();
        assert_eq!(err.line, Some(3));
        assert_eq!(err.field.as_deref(), Some("name"));
        assert!(err.message.contains("first on line 1"), "{err}");
    }

    #[test]
    fn parse_same_key_in_two_sections_is_fine_but_a_section_twice_is_not() {
        assert!(ConfDocument::parse(b"memory: 1\n[a1]\nmemory: 2\n[PENDING]\nmemory: 3\n").is_ok());
        let err = ConfDocument::parse(b"memory: 1\n[snap]\n[pending]\n[PENDING]\n").unwrap_err();
        assert_eq!(err.line, Some(4));
    }

    #[test]
    fn parse_arbitrary_bytes_never_panics() {
        // Every prefix of the sample, and the sample with bytes replaced by
        // a fixed pseudo-random sequence: errors are fine, panics are not.
        let base = WINSRV.as_bytes();
        for n in 0..base.len() {
            if let Ok(doc) = ConfDocument::parse(&base[..n]) {
                assert_eq!(doc.render().as_bytes(), &base[..n]);
                let _ = doc.lower();
            }
        }
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let alphabet = b":,=#[]\n\r %;/0aZ\xff";
        for _ in 0..2000 {
            let mut bytes = base.to_vec();
            for _ in 0..8 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let at = (state % bytes.len() as u64) as usize;
                bytes[at] = alphabet[(state >> 32) as usize % alphabet.len()];
            }
            if let Ok(doc) = ConfDocument::parse(&bytes) {
                assert_eq!(doc.render().as_bytes(), &bytes[..]);
                let lowered = doc.lower();
                let _ = raise_with_findings(&lowered.vm, &RaiseOptions::default());
            }
        }
    }

    // --- editing ------------------------------------------------------------

    #[test]
    fn set_replaces_in_place_and_inserts_in_key_order() {
        let mut doc = parse("#d\ncores: 2\nname: a\n\n[snap]\nname: a\n");
        doc.set("name", "b").unwrap();
        doc.set("memory", "  4096 ").unwrap();
        doc.set("vga", "std").unwrap();
        doc.set("agent", "1").unwrap();
        assert_eq!(
            doc.render(),
            "#d\nagent: 1\ncores: 2\nmemory: 4096\nname: b\nvga: std\n\n[snap]\nname: a\n"
        );
        assert!(doc.set("Bad", "x").is_err());
        assert!(doc.set("name", "a\nb").is_err());
        assert_eq!(doc.remove("agent").as_deref(), Some("1"));
        assert_eq!(doc.get("agent"), None);
    }

    #[test]
    fn set_on_crlf_document_without_final_newline_keeps_crlf() {
        let mut doc = parse("name: a\r\ncores: 1");
        doc.set("sockets", "1").unwrap();
        assert_eq!(doc.render(), "name: a\r\ncores: 1\r\nsockets: 1\r\n");
    }

    #[test]
    fn description_round_trips_through_percent_encoding() {
        let mut doc = parse("name: a\n");
        let text = "Owner: Jörg 100%\n\n\ttabbed";
        doc.set_description(Some(text));
        assert_eq!(
            doc.render(),
            "#Owner%3A J%C3%B6rg 100%25\n#\n#%09tabbed\nname: a\n"
        );
        assert_eq!(doc.description().as_deref(), Some(text));
        doc.set_description(None);
        assert_eq!(doc.render(), "name: a\n");
    }

    // --- lower ----------------------------------------------------------------

    #[test]
    fn lower_windows_server_sample_gives_the_model() {
        let Lowered { vm, findings } = parse(WINSRV).lower();
        assert_eq!(vm.name, "fs01");
        assert_eq!(
            vm.description.as_deref(),
            Some("Windows Server 2022 – file server fs01\n\nMigrated from VMware (datastore1) on 2024-03-14.\nOwner: Infrastructure, Jörg Müller")
        );
        assert_eq!(vm.memory_mib, 16384, "the current value, not [PENDING]'s");
        assert_eq!(
            vm.cpu,
            Cpu {
                vcpus: 4,
                sockets: 1,
                cores: 4,
                threads: 1
            }
        );
        assert_eq!(vm.firmware.kind, FirmwareKind::Uefi);
        assert!(vm.firmware.secure_boot);
        assert_eq!(vm.firmware.efi_vars, volume("local-lvm", "vm-101-disk-0"));
        assert_eq!(vm.machine.as_deref(), Some("pc-q35-8.1"));
        assert_eq!(vm.guest.family, OsFamily::Windows);
        assert_eq!(vm.guest.version.as_deref(), Some("11"));
        assert_eq!(vm.guest.source_id.as_deref(), Some("win11"));
        assert!(vm.clock_localtime, "Proxmox's default for Windows");
        assert_eq!(
            vm.uuid.as_deref(),
            Some("6f1c2b0e-8a4d-4c3e-9b7a-2d5e8f0a1c3b")
        );
        assert_eq!(
            vm.genid.as_deref(),
            Some("0c9d9f5e-3b1a-4e27-8f4c-6a2b7d1e9f03")
        );
        assert!(vm.tpm);
        assert_eq!(vm.snapshots, ["before-kb5034439", "initial-setup"]);

        let addr: Vec<String> = vm.disks.iter().map(Disk::address).collect();
        assert_eq!(addr, ["ide0:0", "ide1:0", "scsi0:0", "scsi0:1"]);
        let virtio_iso = &vm.disks[0];
        assert_eq!(virtio_iso.device, DeviceKind::Cdrom);
        assert_eq!(
            virtio_iso.source,
            volume("local", "iso/virtio-win-0.1.248.iso")
        );
        assert_eq!(virtio_iso.size, Some(715188 << 10));
        assert_eq!(vm.disks[1].device, DeviceKind::Cdrom);
        assert_eq!(vm.disks[1].source, None, "ide2: none");
        let system = &vm.disks[2];
        assert_eq!(system.device, DeviceKind::Disk);
        assert_eq!(system.source, volume("local-lvm", "vm-101-disk-1"));
        assert_eq!(system.format, Some(DiskFormat::Raw));
        assert_eq!(system.size, Some(80 << 30));
        assert!(system.discard);
        assert_eq!(vm.disks[3].size, Some(500 << 30));
        assert!(!vm.disks[3].discard);
        assert_eq!(
            vm.controllers,
            [Controller {
                bus: Bus::Scsi,
                index: 0,
                model: Some("virtio-scsi".into())
            }]
        );
        let boot: Vec<Option<u32>> = vm.disks.iter().map(|d| d.boot_order).collect();
        assert_eq!(boot, [None, Some(2), Some(1), None]);

        assert_eq!(vm.nics.len(), 2);
        assert_eq!(vm.nics[0].model, "virtio");
        assert_eq!(vm.nics[0].mac.as_deref(), Some("bc:24:11:3a:5f:c2"));
        assert_eq!(vm.nics[0].bridge.as_deref(), Some("vmbr0"));
        assert!(vm.nics[0].connected);
        assert_eq!(vm.nics[0].boot_order, Some(3));
        assert_eq!(vm.nics[1].model, "e1000");
        assert!(!vm.nics[1].connected, "link_down=1");
        assert_eq!(
            vm.serials,
            [Serial {
                port: 0,
                kind: SerialKind::Pty,
                target: None
            }]
        );
        assert_eq!(
            vm.graphics,
            Some(Graphics {
                protocol: Some("vnc".into()),
                video: Some("vga".into()),
                vram_kib: Some(32 << 10)
            })
        );

        assert!(has(&findings, PENDING, "conf:[PENDING]"), "{findings:#?}");
        assert!(
            !has(&findings, NOT_CONVERTED, "conf:net1"),
            "VLAN tag is kept"
        );
        assert_eq!(vm.nics[1].vlan, Some(20));
        assert_eq!(vm.nics[0].vlan, None);
        assert!(has(&findings, NOT_CONVERTED, "conf:cpu"));
        assert!(
            !findings.iter().any(|f| f.code == UNKNOWN_KEY),
            "{findings:#?}"
        );
        assert!(!findings.iter().any(|f| f.code == INVALID), "{findings:#?}");
    }

    #[test]
    fn lower_linux_sample_reports_args_unknowns_and_cloud_init() {
        let Lowered { vm, findings } = parse(LINUX).lower();
        assert_eq!(vm.guest.family, OsFamily::Linux);
        assert!(!vm.clock_localtime);
        assert_eq!(vm.firmware.kind, FirmwareKind::Bios);
        assert_eq!(
            vm.disks[1].source,
            volume("local", "102/vm-102-disk-0.qcow2")
        );
        assert_eq!(vm.disks[1].format, Some(DiskFormat::Qcow2));
        assert_eq!(vm.disks[1].bus, Bus::Virtio);
        // Legacy `cdn` + bootdisk: the disk, then the NICs; the cloud-init
        // drive is not a bootable CD-ROM.
        assert_eq!(vm.disks[1].boot_order, Some(1));
        assert_eq!(vm.disks[0].boot_order, None);
        assert_eq!(vm.nics[0].boot_order, Some(2));
        assert_eq!(vm.nics[1].boot_order, Some(3));
        assert_eq!(vm.nics[1].mac.as_deref(), Some("52:54:00:ab:cd:ef"));
        assert_eq!(
            vm.graphics.as_ref().and_then(|g| g.video.as_deref()),
            Some("none")
        );
        assert!(
            vm.snapshots.is_empty(),
            "special and unknown sections are not snapshots"
        );

        assert!(has(&findings, ARGS, "conf:args"));
        let args = findings.iter().find(|f| f.code == ARGS).unwrap();
        assert_eq!(args.severity, Severity::Warning);
        assert!(has(&findings, UNKNOWN_KEY, "conf:frobnicate"));
        assert!(has(&findings, UNKNOWN_SECTION, "conf:[weird section!]"));
        assert!(
            has(&findings, NOT_CONVERTED, "conf:ipconfig0"),
            "{findings:#?}"
        );
        assert!(
            has(&findings, NOT_CONVERTED, "conf:ide2"),
            "cloud-init drive"
        );
    }

    #[test]
    fn lower_defaults_apply_to_an_almost_empty_config() {
        let Lowered { vm, findings } = parse("scsi0: local-lvm:vm-9-disk-0,size=8G\n").lower();
        assert_eq!(vm.memory_mib, 512);
        assert_eq!(vm.cpu, Cpu::default());
        assert_eq!(
            vm.controllers[0].model.as_deref(),
            Some("lsi"),
            "Proxmox's default scsihw"
        );
        assert_eq!(vm.disks[0].boot_order, None);
        assert!(has(&findings, BOOT_ASSUMED, "conf:boot"));
        assert!(has(&findings, NO_NAME, "name"));
        let video = vm.graphics.and_then(|g| g.video);
        assert_eq!(video.as_deref(), Some("vga"), "Proxmox's default display");
    }

    #[test]
    fn parse_upper_case_key_is_kept_and_lowered_as_unknown() {
        let doc = parse("Name: a\nname: b\n");
        assert_eq!(doc.get("Name"), Some("a"));
        let Lowered { vm, findings } = doc.lower();
        assert_eq!(vm.name, "b");
        assert!(has(&findings, UNKNOWN_KEY, "conf:Name"));
    }

    #[test]
    fn cloud_init_drives_are_recognised_by_proxmox_pattern() {
        for yes in [
            "local-lvm:vm-102-cloudinit",
            "local:102/vm-102-cloudinit.qcow2",
            "ceph:cloudinit",
        ] {
            assert!(is_cloudinit(yes), "{yes}");
        }
        for no in [
            "cloudinit",
            "local:iso/cloudinit.iso",
            "local-lvm:vm-102-disk-0",
            "local:vm-x-cloudinit",
        ] {
            assert!(!is_cloudinit(no), "{no}");
        }
    }

    #[test]
    fn lower_vcpus_below_topology_keeps_topology_and_reports() {
        let Lowered { vm, findings } = parse("name: a\nsockets: 2\ncores: 4\nvcpus: 3\n").lower();
        assert_eq!(vm.cpu.vcpus, 8);
        assert_eq!(vm.cpu.sockets * vm.cpu.cores * vm.cpu.threads, vm.cpu.vcpus);
        assert!(has(&findings, VCPUS, "cpu.vcpus"));
    }

    #[test]
    fn lower_localtime_zero_overrides_the_windows_default() {
        let vm = parse("name: a\nostype: win10\nlocaltime: 0\n").lower().vm;
        assert!(!vm.clock_localtime);
        assert_eq!(vm.guest.version.as_deref(), Some("10"));
    }

    #[test]
    fn lower_smbios_base64_variant_reads_the_plain_uuid() {
        let vm = parse("name: a\nsmbios1: base64=1,manufacturer=UHJveG1veA==,uuid=6F1C2B0E-8A4D-4C3E-9B7A-2D5E8F0A1C3B\n")
            .lower()
            .vm;
        assert_eq!(
            vm.uuid.as_deref(),
            Some("6f1c2b0e-8a4d-4c3e-9b7a-2d5e8f0a1c3b")
        );
    }

    #[test]
    fn lower_bad_values_are_findings_not_errors() {
        let text = "name: a\nmemory: lots\nscsi0: local-lvm:vm-1-disk-0,size=huge,size=1G\nnet0: bridge=vmbr0\nboot: order=scsi0;sata3\nbios: uefi\n";
        let Lowered { vm, findings } = parse(text).lower();
        assert_eq!(vm.memory_mib, 512);
        assert_eq!(vm.disks[0].size, Some(1 << 30), "the last size wins");
        assert!(vm.nics.is_empty());
        for key in ["memory", "scsi0", "net0", "boot", "bios"] {
            assert!(
                has(&findings, INVALID, &format!("conf:{key}")),
                "{key}: {findings:#?}"
            );
        }
    }

    #[test]
    fn pve_sizes_parse_and_format_like_proxmox() {
        assert_eq!(parse_pve_size("32G"), Some(32 << 30));
        assert_eq!(parse_pve_size("512M"), Some(512 << 20));
        assert_eq!(parse_pve_size("1T"), Some(1 << 40));
        assert_eq!(parse_pve_size("100K"), Some(100 << 10));
        assert_eq!(parse_pve_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_pve_size("4096"), Some(4096));
        for bad in ["", "G", "32g", "1.G", ".5G", "32GB", "-1"] {
            assert_eq!(parse_pve_size(bad), None, "{bad}");
        }
        assert_eq!(pve_size(32 << 30), "32G");
        assert_eq!(pve_size(1536 << 20), "1536M");
        assert_eq!(pve_size(2 << 40), "2T");
        assert_eq!(pve_size(4 << 20), "4M");
        assert_eq!(pve_size(1000), "1000");
    }

    // --- raise ----------------------------------------------------------------

    /// UEFI with Secure Boot and a variable store, two disks and a CD-ROM,
    /// two NICs, a serial port, a boot order, uuid, genid, local time; in
    /// the order lowering produces.
    fn rich_vm() -> Vm {
        Vm {
            name: "app01".into(),
            uuid: Some("2f0c4d6e-1a3b-4c5d-8e9f-0a1b2c3d4e5f".into()),
            genid: Some("9d8c7b6a-5f4e-4d3c-b2a1-0f1e2d3c4b5a".into()),
            description: Some("Line one\nCafé: second\n\n100% done".into()),
            firmware: vmshift_model::Firmware {
                kind: FirmwareKind::Uefi,
                secure_boot: true,
                efi_vars: volume("local-lvm", "vm-100-disk-0"),
            },
            machine: Some("q35".into()),
            cpu: Cpu {
                vcpus: 4,
                sockets: 2,
                cores: 2,
                threads: 1,
            },
            memory_mib: 8192,
            guest: Guest {
                family: OsFamily::Windows,
                version: Some("11".into()),
                source_id: Some("win11".into()),
                x86_64: true,
            },
            clock_localtime: true,
            controllers: vec![Controller {
                bus: Bus::Scsi,
                index: 0,
                model: Some("virtio-scsi".into()),
            }],
            disks: vec![
                Disk {
                    device: DeviceKind::Cdrom,
                    bus: Bus::Ide,
                    controller: 1,
                    unit: 0,
                    source: volume("local", "iso/virtio-win.iso"),
                    format: Some(DiskFormat::Raw),
                    read_only: true,
                    boot_order: Some(2),
                    ..Disk::default()
                },
                Disk {
                    bus: Bus::Scsi,
                    source: volume("local-lvm", "vm-100-disk-1"),
                    format: Some(DiskFormat::Raw),
                    size: Some(64 << 30),
                    boot_order: Some(1),
                    discard: true,
                    ..Disk::default()
                },
                Disk {
                    bus: Bus::Scsi,
                    unit: 1,
                    source: volume("local", "100/vm-100-disk-2.qcow2"),
                    format: Some(DiskFormat::Qcow2),
                    size: Some(1536 << 20),
                    read_only: true,
                    ..Disk::default()
                },
            ],
            nics: vec![
                Nic {
                    model: "virtio".into(),
                    mac: Some("bc:24:11:00:00:01".into()),
                    bridge: Some("vmbr0".into()),
                    connected: true,
                    boot_order: Some(3),
                    ..Nic::default()
                },
                Nic {
                    model: "e1000".into(),
                    mac: Some("bc:24:11:00:00:02".into()),
                    bridge: Some("vmbr1".into()),
                    connected: false,
                    ..Nic::default()
                },
            ],
            serials: vec![Serial {
                port: 0,
                kind: SerialKind::Pty,
                target: None,
            }],
            graphics: Some(Graphics {
                protocol: Some("vnc".into()),
                video: Some("vga".into()),
                vram_kib: Some(16 << 10),
            }),
            ..Vm::default()
        }
    }

    #[test]
    fn raise_writes_a_conf_the_way_proxmox_does() {
        let Raised { doc, findings } = raise_with_findings(&rich_vm(), &RaiseOptions::default());
        assert_eq!(
            doc.render(),
            "\
#Line one
#Caf%C3%A9%3A second
#
#100%25 done
bios: ovmf
boot: order=scsi0;ide2;net0
cores: 2
efidisk0: local-lvm:vm-100-disk-0,efitype=4m,pre-enrolled-keys=1
ide2: local:iso/virtio-win.iso,media=cdrom
localtime: 1
machine: q35
memory: 8192
name: app01
net0: virtio=BC:24:11:00:00:01,bridge=vmbr0
net1: e1000=BC:24:11:00:00:02,bridge=vmbr1,link_down=1
ostype: win11
scsi0: local-lvm:vm-100-disk-1,discard=on,size=64G
scsi1: local:100/vm-100-disk-2.qcow2,ro=1,size=1536M
scsihw: virtio-scsi-single
serial0: socket
smbios1: uuid=2f0c4d6e-1a3b-4c5d-8e9f-0a1b2c3d4e5f
sockets: 2
vga: std,memory=16
vmgenid: 9d8c7b6a-5f4e-4d3c-b2a1-0f1e2d3c4b5a
"
        );
        assert!(findings.is_empty(), "{findings:#?}");
    }

    #[test]
    fn raise_then_lower_keeps_every_modelled_field() {
        let vm = rich_vm();
        let text = raise(&vm, &RaiseOptions::default()).render();
        let Lowered { vm: back, findings } = parse(&text).lower();
        assert_eq!(back, vm);
        assert!(findings.is_empty(), "{findings:#?}");
    }

    #[test]
    fn sample_conf_lowers_raises_and_lowers_to_the_same_model() {
        let text = include_str!("../../../fixtures/vms/proxmox/101.conf");
        let first = parse(text).lower().vm;
        let again = parse(&raise(&first, &RaiseOptions::default()).render())
            .lower()
            .vm;
        let mut want = first.clone();
        // Snapshots are history, not configuration: a new VM has none.
        want.snapshots.clear();
        // The model does not say where TPM state lives, so raise cannot
        // write tpmstate0 (it reports proxmox-raise-dropped instead).
        want.tpm = false;
        assert_eq!(again, want);
    }

    #[test]
    fn raise_never_writes_args() {
        let from_args = parse(LINUX).lower().vm;
        for vm in [from_args, rich_vm(), Vm::default()] {
            let doc = raise(&vm, &RaiseOptions::default());
            assert_eq!(doc.get("args"), None);
            assert!(!doc.render().lines().any(|l| l.starts_with("args")));
        }
    }

    #[test]
    fn raise_output_parses_back_byte_identical() {
        let doc = raise(&rich_vm(), &RaiseOptions::default());
        assert_eq!(parse(&doc.render()), doc);
    }

    #[test]
    fn raise_windows_without_localtime_says_so_explicitly() {
        let mut vm = rich_vm();
        vm.clock_localtime = false;
        let doc = raise(&vm, &RaiseOptions::default());
        assert_eq!(doc.get("localtime"), Some("0"));
        assert!(!parse(&doc.render()).lower().vm.clock_localtime);
    }

    #[test]
    fn raise_vmware_shaped_vm_maps_and_reports_what_does_not_fit() {
        let vm = Vm {
            name: "Windows Server 2019 (prod)".into(),
            firmware: vmshift_model::Firmware {
                kind: FirmwareKind::Uefi,
                secure_boot: false,
                efi_vars: Some(DiskRef::File {
                    path: "win.nvram".into(),
                }),
            },
            cpu: Cpu {
                vcpus: 4,
                sockets: 1,
                cores: 2,
                threads: 2,
            },
            memory_mib: 4096,
            guest: Guest {
                family: OsFamily::Windows,
                version: Some("2019".into()),
                source_id: Some("windows2019srv-64".into()),
                x86_64: true,
            },
            controllers: vec![Controller {
                bus: Bus::Scsi,
                index: 0,
                model: Some("lsisas1068".into()),
            }],
            disks: vec![
                Disk {
                    bus: Bus::Scsi,
                    source: Some(DiskRef::File {
                        path: "win-disk1.qcow2".into(),
                    }),
                    format: Some(DiskFormat::Qcow2),
                    ..Disk::default()
                },
                Disk {
                    bus: Bus::Scsi,
                    controller: 1,
                    source: Some(DiskRef::Datastore {
                        datastore: "datastore1".into(),
                        path: "win/win_1.vmdk".into(),
                    }),
                    ..Disk::default()
                },
                Disk {
                    bus: Bus::Nvme,
                    source: Some(DiskRef::File {
                        path: "/images/fast.raw".into(),
                    }),
                    ..Disk::default()
                },
                Disk {
                    device: DeviceKind::Floppy,
                    bus: Bus::Fdc,
                    ..Disk::default()
                },
            ],
            nics: vec![Nic {
                model: "vmxnet3".into(),
                mac: Some("00:50:56:aa:bb:cc".into()),
                network: Some("VM Network".into()),
                connected: true,
                ..Nic::default()
            }],
            tpm: true,
            ..Vm::default()
        };
        let opts = RaiseOptions {
            vmid: Some(120),
            bridge: Some("vmbr2".into()),
        };
        let Raised { doc, findings } = raise_with_findings(&vm, &opts);
        assert_eq!(doc.get("name"), Some("Windows-Server-2019-prod"));
        assert_eq!(doc.get("ostype"), Some("win10"));
        assert_eq!(doc.get("cores"), Some("4"));
        assert_eq!(doc.get("sockets"), Some("1"));
        assert_eq!(doc.get("scsihw"), Some("megasas"));
        assert_eq!(doc.get("scsi0"), Some("win-disk1.qcow2,format=qcow2"));
        assert_eq!(
            doc.get("scsi1"),
            None,
            "a datastore path is not a Proxmox volume"
        );
        assert_eq!(doc.get("virtio0"), Some("/images/fast.raw"));
        assert_eq!(
            doc.get("net0"),
            Some("vmxnet3=00:50:56:AA:BB:CC,bridge=vmbr2")
        );
        assert_eq!(
            doc.get("efidisk0"),
            None,
            "a VMware .nvram is no OVMF store"
        );
        assert_eq!(doc.get("machine"), Some("q35"));
        assert_eq!(doc.get("localtime"), Some("0"));
        let raised = |code: &str, path: &str| has(&findings, code, path);
        assert!(raised(RAISE_MAPPED, "name"));
        assert!(raised(RAISE_MAPPED, "cpu.threads"));
        assert!(raised(RAISE_MAPPED, "controllers"));
        assert!(raised(RAISE_DROPPED, "disks[1]"));
        assert!(raised(RAISE_MAPPED, "disks[2].bus"));
        assert!(raised(RAISE_DROPPED, "disks[3]"));
        assert!(raised(RAISE_MAPPED, "nics[0].network"));
        assert!(raised(RAISE_DROPPED, "firmware.efi-vars"));
        let tpm = findings.iter().find(|f| f.path == "tpm").unwrap();
        assert!(tpm.message.contains("qm set 120 --tpmstate0"), "{tpm}");
    }

    #[test]
    fn raise_renumbers_disks_that_do_not_fit_their_own_slot() {
        let disk = |bus, controller, unit| Disk {
            bus,
            controller,
            unit,
            source: volume("local-lvm", &format!("vm-1-disk-{controller}{unit}")),
            ..Disk::default()
        };
        let vm = Vm {
            name: "a".into(),
            memory_mib: 1024,
            disks: vec![
                disk(Bus::Scsi, 1, 0),
                disk(Bus::Scsi, 0, 0),
                disk(Bus::Ide, 0, 1),
                disk(Bus::Sata, 0, 7),
            ],
            ..Vm::default()
        };
        let Raised { doc, findings } = raise_with_findings(&vm, &RaiseOptions::default());
        assert_eq!(
            doc.get("scsi0"),
            Some("local-lvm:vm-1-disk-00"),
            "its own slot"
        );
        assert_eq!(
            doc.get("scsi1"),
            Some("local-lvm:vm-1-disk-10"),
            "the next free one"
        );
        assert_eq!(
            doc.get("ide1"),
            Some("local-lvm:vm-1-disk-01"),
            "ide0:1 is ide1"
        );
        assert_eq!(doc.get("sata0"), Some("local-lvm:vm-1-disk-07"));
        assert!(has(&findings, RAISE_MAPPED, "disks[0]"));
        assert!(has(&findings, RAISE_MAPPED, "disks[3]"));
        assert!(!has(&findings, RAISE_MAPPED, "disks[1]"));
        assert_eq!(
            doc.get("boot"),
            Some("order=scsi1"),
            "no boot order: the model's boot disk"
        );
    }

    #[test]
    fn windows_versions_map_to_proxmox_ostypes() {
        let cases = [
            ("2022", "win11"),
            ("2019", "win10"),
            ("2016", "win10"),
            ("10", "win10"),
            ("11", "win11"),
            ("2012", "win8"),
            ("8", "win8"),
            ("2008r2", "win7"),
            ("2008", "w2k8"),
            ("7", "win7"),
            ("vista", "wvista"),
            ("2003", "w2k3"),
            ("xp", "wxp"),
            ("2000", "w2k"),
            ("windows9srv-64", "win10"),
            ("windows2019srvNext-64", "win11"),
        ];
        for (version, ostype) in cases {
            assert_eq!(windows_ostype(version), Some(ostype), "{version}");
        }
        assert_eq!(windows_ostype("windows-64"), None);
    }

    #[test]
    fn machine_types_proxmox_accepts() {
        for ok in [
            "pc",
            "q35",
            "pc-q35-8.1",
            "pc-i440fx-9.0+pve1",
            "pc-8.1",
            "pc-q35-6.2.pxe",
        ] {
            assert!(machine_is_valid(ok), "{ok}");
        }
        for bad in [
            "pc-q35-rhel9.2.0",
            "q35-8.1",
            "pc-q35-8",
            "virt",
            "pc-q35-8.1+pve",
        ] {
            assert!(!machine_is_valid(bad), "{bad}");
        }
    }
}
