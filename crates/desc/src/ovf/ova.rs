//! OVA archives: an OVF package as one tar, read in place.
//!
//! Opening lists the members (name, data offset, size) without extracting
//! anything, finds the descriptor (the first member by the OVF spec) and
//! reads the manifest. [`OvaArchive::verify`] then streams every member
//! the manifest names through its digest, a chunk at a time.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use sha1::Sha1;
use sha2::{Digest, Sha256, Sha512};
use vmshift_model::{Finding, Severity};

use super::tar::{self, Kind, ReadAt};
use super::OvfDocument;
use crate::{DescError, Result, MAX_DESCRIPTOR_BYTES};

/// Bytes hashed per read during verification.
const CHUNK: usize = 1 << 20;

/// A regular file inside an OVA: where its bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvaMember {
    /// Its name, normalized (relative, `/`-separated, no `.` or `..`).
    pub name: String,
    /// The offset of its first byte in the archive.
    pub data_offset: u64,
    /// Its size in bytes.
    pub size: u64,
}

/// A digest algorithm a manifest may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestAlgorithm {
    /// SHA-1 (OVF 1.x packages).
    Sha1,
    /// SHA-256 (OVF 2.x and ovftool's default).
    Sha256,
    /// SHA-512 (`ovftool --shaAlgorithm=SHA512`).
    Sha512,
}

impl DigestAlgorithm {
    fn hex_len(self) -> usize {
        match self {
            DigestAlgorithm::Sha1 => 40,
            DigestAlgorithm::Sha256 => 64,
            DigestAlgorithm::Sha512 => 128,
        }
    }
}

impl fmt::Display for DigestAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DigestAlgorithm::Sha1 => "SHA1",
            DigestAlgorithm::Sha256 => "SHA256",
            DigestAlgorithm::Sha512 => "SHA512",
        })
    }
}

/// One `ALGO(name)= digest` line of a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    /// The digest algorithm.
    pub algorithm: DigestAlgorithm,
    /// The file it covers, normalized like member names.
    pub name: String,
    /// The expected digest, lower-case hex.
    pub digest: String,
}

/// A `.mf` manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The manifest's own member name.
    pub name: String,
    /// Its lines, in order.
    pub entries: Vec<ManifestEntry>,
}

impl Manifest {
    /// Parses manifest text: `SHA1(file)= hex`, `SHA256(file)= hex` or
    /// `SHA512(file)= hex` lines (spaces around `=` optional, CRLF and
    /// blank lines accepted). Errors name the line.
    pub fn parse(name: &str, text: &str) -> Result<Manifest> {
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let bad = |m: String| DescError::at_line(i + 1, m).field(name.to_string());
            let (algo, rest) = line
                .split_once('(')
                .ok_or_else(|| bad(format!("expected 'SHA256(file)= digest', found '{line}'")))?;
            let (file, digest) = rest
                .rsplit_once(')')
                .and_then(|(f, d)| Some((f, d.trim_start().strip_prefix('=')?.trim())))
                .ok_or_else(|| bad(format!("expected 'SHA256(file)= digest', found '{line}'")))?;
            let algorithm = match algo.trim().to_ascii_uppercase().as_str() {
                "SHA1" | "SHA-1" => DigestAlgorithm::Sha1,
                "SHA256" | "SHA-256" => DigestAlgorithm::Sha256,
                "SHA512" | "SHA-512" => DigestAlgorithm::Sha512,
                other => {
                    return Err(bad(format!(
                        "digest '{other}' is not supported (SHA1, SHA256 and SHA512 are)"
                    )))
                }
            };
            let digest = digest.to_ascii_lowercase();
            if digest.len() != algorithm.hex_len() || !digest.chars().all(|c| c.is_ascii_hexdigit())
            {
                return Err(bad(format!(
                    "'{digest}' is not a {algorithm} digest ({} hex digits)",
                    algorithm.hex_len()
                )));
            }
            let file =
                tar::normalize_name(file).map_err(|m| bad(format!("file name '{file}' {m}")))?;
            entries.push(ManifestEntry {
                algorithm,
                name: file,
                digest,
            });
        }
        Ok(Manifest {
            name: name.to_string(),
            entries,
        })
    }
}

/// Where the archive's bytes come from.
enum Source {
    File(File),
    #[cfg(test)]
    Bytes(Vec<u8>),
}

impl Source {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        match self {
            Source::File(f) => f.read_exact_at(buf, offset),
            #[cfg(test)]
            Source::Bytes(b) => b.as_slice().read_exact_at(buf, offset),
        }
    }
}

/// An OVA opened for reading: its members listed in place, its descriptor
/// found, its manifest read (not yet verified: see [`OvaArchive::verify`]).
pub struct OvaArchive {
    path: PathBuf,
    source: Source,
    members: Vec<OvaMember>,
    descriptor: usize,
    manifest: Option<Manifest>,
    findings: Vec<Finding>,
}

impl fmt::Debug for OvaArchive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OvaArchive")
            .field("path", &self.path)
            .field("members", &self.members)
            .field("descriptor", &self.members[self.descriptor].name)
            .field("manifest", &self.manifest)
            .finish_non_exhaustive()
    }
}

impl OvaArchive {
    /// Opens the OVA at `path` read-only and lists it.
    pub fn open(path: &Path) -> Result<OvaArchive> {
        let file = File::open(path).map_err(|e| DescError::io(path, e))?;
        OvaArchive::from_file(&file, path)
    }

    /// Lists the OVA open as `file` (its own handle is kept: reads are
    /// positioned and never move `file`'s offset). `path` names it in
    /// errors.
    pub fn from_file(file: &File, path: &Path) -> Result<OvaArchive> {
        let meta = file.metadata().map_err(|e| DescError::io(path, e))?;
        if !meta.is_file() {
            return Err(DescError::new("not a regular file; an OVA is a tar file").in_file(path));
        }
        let file = file.try_clone().map_err(|e| DescError::io(path, e))?;
        OvaArchive::build(path, Source::File(file), meta.len())
    }

    #[cfg(test)]
    fn from_bytes(bytes: Vec<u8>) -> Result<OvaArchive> {
        let len = bytes.len() as u64;
        OvaArchive::build(Path::new("test.ova"), Source::Bytes(bytes), len)
    }

    fn build(path: &Path, source: Source, len: u64) -> Result<OvaArchive> {
        let err = |m: String| DescError::new(m).in_file(path);
        let listing = match &source {
            Source::File(f) => tar::list(f, len),
            #[cfg(test)]
            Source::Bytes(b) => tar::list(b.as_slice(), len),
        }
        .map_err(|e| err(e.to_string()))?;

        let mut findings = Vec::new();
        let mut members: Vec<OvaMember> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for e in listing.entries {
            if e.kind != Kind::File {
                if e.kind != Kind::Directory {
                    findings.push(Finding::new(
                        Severity::Warning,
                        "ova-member-skipped",
                        format!("ova:{}", e.name),
                        format!(
                            "'{}' is {}, not a file; it is ignored",
                            e.name,
                            e.kind.describe()
                        ),
                    ));
                }
                continue;
            }
            if !seen.insert(e.name.clone()) {
                return Err(err(format!(
                    "tar header at offset {}: '{}' appears twice; which copy counts is ambiguous",
                    e.header_offset, e.name
                )));
            }
            members.push(OvaMember {
                name: e.name,
                data_offset: e.data_offset,
                size: e.size,
            });
        }
        if !listing.end_marker {
            findings.push(Finding::new(
                Severity::Info,
                "ova-tar-no-end",
                "ova",
                "the archive ends without tar's end-of-archive blocks",
            ));
        }

        let is_ext = |m: &OvaMember, ext: &str| {
            Path::new(&m.name)
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case(ext))
        };
        let ovfs: Vec<usize> = (0..members.len())
            .filter(|&i| is_ext(&members[i], "ovf"))
            .collect();
        let Some(&descriptor) = ovfs.first() else {
            return Err(err(
                "the archive holds no .ovf descriptor; not an OVA".into()
            ));
        };
        let d = &members[descriptor];
        if descriptor != 0 {
            findings.push(Finding::new(
                Severity::Warning,
                "ova-ovf-not-first",
                format!("ova:{}", d.name),
                format!(
                    "the descriptor '{}' is not the archive's first member ('{}' is), as the OVF specification requires",
                    d.name, members[0].name
                ),
            ));
        }
        if ovfs.len() > 1 {
            let names: Vec<&str> = ovfs.iter().map(|&i| members[i].name.as_str()).collect();
            findings.push(Finding::new(
                Severity::Warning,
                "ova-multiple-ovf",
                format!("ova:{}", d.name),
                format!(
                    "the archive holds {} descriptors ({}); '{}' is used",
                    names.len(),
                    names.join(", "),
                    d.name
                ),
            ));
        }
        if d.size > MAX_DESCRIPTOR_BYTES {
            return Err(err(format!(
                "the descriptor '{}' is {} bytes, more than the {} MiB a descriptor may have",
                d.name,
                d.size,
                MAX_DESCRIPTOR_BYTES >> 20
            ))
            .field(d.name.clone()));
        }

        for m in members.iter().filter(|m| is_ext(m, "cert")) {
            findings.push(Finding::new(
                Severity::Info,
                "ova-certificate-ignored",
                format!("ova:{}", m.name),
                format!(
                    "'{}' signs the manifest; the signature is not checked (the digests are)",
                    m.name
                ),
            ));
        }

        let mut ova = OvaArchive {
            path: path.to_path_buf(),
            source,
            members,
            descriptor,
            manifest: None,
            findings,
        };
        let stem = ova.members[descriptor]
            .name
            .rsplit_once('.')
            .map_or(String::new(), |(s, _)| s.to_string());
        let mf = ova
            .members
            .iter()
            .position(|m| m.name.eq_ignore_ascii_case(&format!("{stem}.mf")))
            .or_else(|| ova.members.iter().position(|m| is_ext(m, "mf")));
        match mf {
            Some(i) => {
                let m = ova.members[i].clone();
                let text = ova.read_text(&m)?;
                ova.manifest =
                    Some(Manifest::parse(&m.name, &text).map_err(|e| e.in_file(&ova.path))?);
            }
            None => ova.findings.push(Finding::new(
                Severity::Warning,
                "ova-no-manifest",
                "ova",
                "the archive has no .mf manifest: its content cannot be verified",
            )),
        }
        Ok(ova)
    }

    /// The archive's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every regular file, in archive order.
    pub fn members(&self) -> &[OvaMember] {
        &self.members
    }

    /// The member named `name` (as an OVF `href` or manifest writes it:
    /// `./disk.vmdk` finds `disk.vmdk`); `None` for a name that is not
    /// there or could not be (absolute, `..`).
    pub fn member(&self, name: &str) -> Option<&OvaMember> {
        let n = tar::normalize_name(name).ok()?;
        self.members.iter().find(|m| m.name == n)
    }

    /// The descriptor's member.
    pub fn descriptor_member(&self) -> &OvaMember {
        &self.members[self.descriptor]
    }

    /// The manifest, when the archive has one.
    pub fn manifest(&self) -> Option<&Manifest> {
        self.manifest.as_ref()
    }

    /// What listing noticed: the descriptor not first, skipped links and
    /// devices, no manifest, an unchecked certificate.
    pub fn findings(&self) -> &[Finding] {
        &self.findings
    }

    /// Reads and parses the descriptor. Errors name the descriptor as
    /// `<archive>/<member>`.
    pub fn descriptor(&self) -> Result<OvfDocument> {
        let m = self.descriptor_member();
        let bytes = self.read_bytes(m)?;
        OvfDocument::parse(&bytes).map_err(|e| e.in_file(&self.path.join(&m.name)))
    }

    /// Reads up to `buf.len()` bytes of `member` from `offset` within it;
    /// returns how many (0 at or past its end).
    pub fn read_member_at(&self, member: &OvaMember, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let n = member.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        let at = member.data_offset.checked_add(offset).ok_or_else(|| {
            DescError::new(format!("offset {offset} of '{}' is past 2^64", member.name))
                .in_file(&self.path)
        })?;
        self.source
            .read_exact_at(&mut buf[..n], at)
            .map_err(|e| self.read_error(member, at, e))?;
        Ok(n)
    }

    fn read_error(&self, m: &OvaMember, at: u64, e: std::io::Error) -> DescError {
        DescError::new(format!("reading '{}' at archive offset {at}: {e}", m.name))
            .in_file(&self.path)
            .field(m.name.clone())
    }

    /// A small member (descriptor, manifest) whole, capped at
    /// [`MAX_DESCRIPTOR_BYTES`].
    fn read_bytes(&self, m: &OvaMember) -> Result<Vec<u8>> {
        if m.size > MAX_DESCRIPTOR_BYTES {
            return Err(DescError::new(format!(
                "'{}' is {} bytes; more than the {} MiB accepted",
                m.name,
                m.size,
                MAX_DESCRIPTOR_BYTES >> 20
            ))
            .in_file(&self.path)
            .field(m.name.clone()));
        }
        let mut buf = vec![0u8; m.size as usize];
        self.source
            .read_exact_at(&mut buf, m.data_offset)
            .map_err(|e| self.read_error(m, m.data_offset, e))?;
        Ok(buf)
    }

    fn read_text(&self, m: &OvaMember) -> Result<String> {
        String::from_utf8(self.read_bytes(m)?).map_err(|_| {
            DescError::new(format!("'{}' is not UTF-8 text", m.name))
                .in_file(&self.path)
                .field(m.name.clone())
        })
    }

    /// Verifies every member the manifest names against its digest. A
    /// digest mismatch, or a name the archive does not hold, is an error
    /// naming the member (and both digests). Returns findings for members
    /// no digest covers. Without a manifest there is nothing to verify
    /// (listing already reported `ova-no-manifest`).
    pub fn verify(&self) -> Result<Vec<Finding>> {
        self.verify_with_progress(|_, _| {})
    }

    /// [`verify`](OvaArchive::verify), calling `progress(member, bytes)`
    /// after each chunk hashed.
    pub fn verify_with_progress(
        &self,
        mut progress: impl FnMut(&OvaMember, u64),
    ) -> Result<Vec<Finding>> {
        let Some(mf) = &self.manifest else {
            return Ok(Vec::new());
        };
        let largest = self.members.iter().map(|m| m.size).max().unwrap_or(0);
        let mut buf = vec![0u8; (largest.min(CHUNK as u64)) as usize];
        for e in &mf.entries {
            let m = self.member(&e.name).ok_or_else(|| {
                DescError::new(format!(
                    "the manifest '{}' lists '{}', which the archive does not hold",
                    mf.name, e.name
                ))
                .in_file(&self.path)
                .field(e.name.clone())
            })?;
            let actual = self.digest(m, e.algorithm, &mut buf, &mut progress)?;
            if actual != e.digest {
                return Err(DescError::new(format!(
                    "{} of '{}' is {actual}, but the manifest '{}' says {}: the file is corrupt or was changed",
                    e.algorithm, e.name, mf.name, e.digest
                ))
                .in_file(&self.path)
                .field(e.name.clone()));
            }
        }
        let mut findings = Vec::new();
        for m in &self.members {
            let covered = mf.entries.iter().any(|e| e.name == m.name);
            let exempt = m.name == mf.name
                || Path::new(&m.name)
                    .extension()
                    .is_some_and(|x| x.eq_ignore_ascii_case("cert"));
            if !covered && !exempt {
                findings.push(Finding::new(
                    Severity::Warning,
                    "ova-member-unverified",
                    format!("ova:{}", m.name),
                    format!(
                        "the manifest has no digest for '{}'; it is not verified",
                        m.name
                    ),
                ));
            }
        }
        Ok(findings)
    }

    /// Streams `m` through `algorithm`; lower-case hex.
    fn digest(
        &self,
        m: &OvaMember,
        algorithm: DigestAlgorithm,
        buf: &mut [u8],
        progress: &mut impl FnMut(&OvaMember, u64),
    ) -> Result<String> {
        let mut h = Hasher::new(algorithm);
        let mut done = 0u64;
        while done < m.size {
            let n = self.read_member_at(m, done, buf)?;
            h.update(&buf[..n]);
            done += n as u64;
            progress(m, n as u64);
        }
        Ok(h.finish_hex())
    }

    /// Checks the descriptor's `References` against the members: each
    /// file must be there (`ova-file-missing`) with the size the
    /// descriptor states (`ova-file-size-mismatch`). URLs are left to the
    /// lowering's `ovf-file-remote`.
    pub fn check_references(&self, doc: &OvfDocument) -> Vec<Finding> {
        let mut out = Vec::new();
        for f in doc.files() {
            if f.href.contains("://") {
                continue;
            }
            let path = format!("ovf:References/File[{}]", f.id);
            match self.member(&f.href) {
                None => out.push(Finding::new(
                    Severity::Error,
                    "ova-file-missing",
                    path,
                    format!(
                        "the descriptor names '{}', which the archive does not hold",
                        f.href
                    ),
                )),
                Some(m) if f.size.is_some_and(|s| s != m.size) => out.push(Finding::new(
                    Severity::Error,
                    "ova-file-size-mismatch",
                    path,
                    format!(
                        "the descriptor says '{}' is {} bytes; the archive holds {}",
                        f.href,
                        f.size.unwrap_or(0),
                        m.size
                    ),
                )),
                Some(_) => {}
            }
        }
        out
    }
}

enum Hasher {
    Sha1(Sha1),
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Hasher {
    fn new(a: DigestAlgorithm) -> Hasher {
        match a {
            DigestAlgorithm::Sha1 => Hasher::Sha1(Sha1::new()),
            DigestAlgorithm::Sha256 => Hasher::Sha256(Sha256::new()),
            DigestAlgorithm::Sha512 => Hasher::Sha512(Sha512::new()),
        }
    }

    fn update(&mut self, b: &[u8]) {
        match self {
            Hasher::Sha1(h) => h.update(b),
            Hasher::Sha256(h) => h.update(b),
            Hasher::Sha512(h) => h.update(b),
        }
    }

    fn finish_hex(self) -> String {
        let bytes: Vec<u8> = match self {
            Hasher::Sha1(h) => h.finalize().to_vec(),
            Hasher::Sha256(h) => h.finalize().to_vec(),
            Hasher::Sha512(h) => h.finalize().to_vec(),
        };
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINUX_OVF: &str = include_str!("../../../../fixtures/vms/ovf/linux.ovf");

    /// A minimal tar writer: ustar headers, GNU long names, pax paths.
    #[derive(Default)]
    struct Tar(Vec<u8>);

    fn header(name: &[u8], size: u64, typeflag: u8) -> [u8; 512] {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name);
        h[100..108].copy_from_slice(b"0000644\0");
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        h[136..148].copy_from_slice(b"14571335760\0");
        h[156] = typeflag;
        h[257..265].copy_from_slice(b"ustar\x0000");
        seal(&mut h);
        h
    }

    /// Writes the header checksum.
    fn seal(h: &mut [u8]) {
        h[148..156].fill(b' ');
        let sum: u32 = h[..512].iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }

    impl Tar {
        fn entry(&mut self, h: [u8; 512], data: &[u8]) -> &mut Tar {
            self.0.extend_from_slice(&h);
            self.0.extend_from_slice(data);
            self.0.resize(self.0.len().div_ceil(512) * 512, 0);
            self
        }

        fn file(&mut self, name: &str, data: &[u8]) -> &mut Tar {
            self.entry(header(name.as_bytes(), data.len() as u64, b'0'), data)
        }

        fn long_name(&mut self, name: &str, data: &[u8]) -> &mut Tar {
            let mut n = name.as_bytes().to_vec();
            n.push(0);
            self.entry(header(b"././@LongLink", n.len() as u64, b'L'), &n);
            self.entry(
                header(&name.as_bytes()[..100], data.len() as u64, b'0'),
                data,
            )
        }

        fn pax_path(&mut self, name: &str, data: &[u8]) -> &mut Tar {
            let body = format!("path={name}\n");
            let mut len = body.len() + 2;
            if (len + len.to_string().len() - 1).to_string().len() != len.to_string().len() {
                len += 1;
            }
            let rec = format!("{} {body}", len + len.to_string().len() - 1);
            self.entry(
                header(b"PaxHeaders/x", rec.len() as u64, b'x'),
                rec.as_bytes(),
            );
            self.entry(header(b"short-name", data.len() as u64, b'0'), data)
        }

        fn finish(&mut self) -> Vec<u8> {
            let mut v = std::mem::take(&mut self.0);
            v.extend_from_slice(&[0u8; 1024]);
            v
        }
    }

    fn sha256(b: &[u8]) -> String {
        let mut h = Hasher::new(DigestAlgorithm::Sha256);
        h.update(b);
        h.finish_hex()
    }

    fn sha1(b: &[u8]) -> String {
        let mut h = Hasher::new(DigestAlgorithm::Sha1);
        h.update(b);
        h.finish_hex()
    }

    /// Disk-like content over several tar blocks.
    fn disk() -> Vec<u8> {
        (0..5000u32).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn nvram() -> Vec<u8> {
        b"NVRAM\0\x01\x02".repeat(40)
    }

    /// The fixture's descriptor with the sizes of the test's files.
    fn ovf() -> String {
        LINUX_OVF
            .replace("1073883136", &disk().len().to_string())
            .replace("\"270840\"", &format!("\"{}\"", nvram().len()))
    }

    /// An OVA as ovftool lays it out: descriptor, manifest, files.
    fn ova_with_manifest(mf: &str) -> Vec<u8> {
        Tar::default()
            .file("linux.ovf", ovf().as_bytes())
            .file("linux.mf", mf.as_bytes())
            .file("linux-disk1.vmdk", &disk())
            .file("linux-file1.nvram", &nvram())
            .finish()
    }

    fn good_manifest() -> String {
        format!(
            "SHA256(linux.ovf)= {}\nSHA256(linux-disk1.vmdk)= {}\r\nSHA1(linux-file1.nvram)= {}\n",
            sha256(ovf().as_bytes()),
            sha256(&disk()),
            sha1(&nvram())
        )
    }

    fn good_ova() -> Vec<u8> {
        ova_with_manifest(&good_manifest())
    }

    /// The offset of the header after the descriptor's.
    fn second_header() -> usize {
        512 + ovf().len().div_ceil(512) * 512
    }

    #[test]
    fn ova_with_a_correct_manifest_verifies() {
        let ova = OvaArchive::from_bytes(good_ova()).unwrap();
        let names: Vec<&str> = ova.members().iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "linux.ovf",
                "linux.mf",
                "linux-disk1.vmdk",
                "linux-file1.nvram"
            ]
        );
        assert!(ova.findings().is_empty(), "{:?}", ova.findings());
        let disk_member = ova.member("./linux-disk1.vmdk").unwrap();
        let disk_at = second_header() + 512 + 512 + 512;
        assert_eq!(
            (disk_member.data_offset, disk_member.size),
            (disk_at as u64, 5000)
        );
        let mut hashed = 0;
        let unverified = ova.verify_with_progress(|_, n| hashed += n).unwrap();
        assert!(unverified.is_empty(), "{unverified:?}");
        assert_eq!(hashed, (ovf().len() + disk().len() + nvram().len()) as u64);

        let doc = ova.descriptor().unwrap();
        assert!(ova.check_references(&doc).is_empty());
        let vm = doc.lower().vm;
        assert_eq!(
            vm.disks[1].source,
            Some(vmshift_model::DiskRef::File {
                path: "linux-disk1.vmdk".into()
            })
        );
        let mut buf = [0u8; 16];
        assert_eq!(ova.read_member_at(disk_member, 4990, &mut buf).unwrap(), 10);
        assert_eq!(buf[..10], disk()[4990..]);
        assert_eq!(ova.read_member_at(disk_member, 5000, &mut buf).unwrap(), 0);
    }

    #[test]
    fn a_wrong_digest_fails_naming_the_member_and_both_sums() {
        let wrong = "0".repeat(64);
        let mf = good_manifest().replace(&sha256(&disk()), &wrong);
        let ova = OvaArchive::from_bytes(ova_with_manifest(&mf)).unwrap();
        let e = ova.verify().unwrap_err();
        assert_eq!(e.field.as_deref(), Some("linux-disk1.vmdk"), "{e}");
        assert!(e.message.contains(&wrong), "{e}");
        assert!(e.message.contains(&sha256(&disk())), "{e}");
        assert!(e.message.contains("SHA256"), "{e}");
    }

    #[test]
    fn a_manifest_naming_a_missing_member_fails() {
        let mf = format!("{}SHA256(gone.vmdk)= {}\n", good_manifest(), "a".repeat(64));
        let e = OvaArchive::from_bytes(ova_with_manifest(&mf))
            .unwrap()
            .verify()
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("gone.vmdk"), "{e}");
        assert!(e.message.contains("does not hold"), "{e}");
    }

    #[test]
    fn sha512_and_unlisted_members_are_handled() {
        let mut h = Hasher::new(DigestAlgorithm::Sha512);
        h.update(&disk());
        let mf = format!("SHA512 (linux-disk1.vmdk) = {}\n", h.finish_hex());
        let ova = OvaArchive::from_bytes(ova_with_manifest(&mf)).unwrap();
        let f = ova.verify().unwrap();
        let unverified: Vec<&str> = f.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(unverified, ["ova:linux.ovf", "ova:linux-file1.nvram"]);
        assert!(f.iter().all(|f| f.code == "ova-member-unverified"));
    }

    #[test]
    fn malformed_manifests_are_refused_by_line() {
        for (bad, what) in [
            ("SHA256(a)= abc\n", "hex digits"),
            (
                "MD5(a)= d41d8cd98f00b204e9800998ecf8427e\n",
                "not supported",
            ),
            ("\nSHA256 a = b\n", "expected"),
            (&format!("SHA256(../a)= {}\n", "0".repeat(64)), ".."),
        ] {
            let e = Manifest::parse("x.mf", bad).unwrap_err();
            assert!(e.message.contains(what), "{bad:?}: {e}");
        }
        let e = Manifest::parse("x.mf", "\nSHA1(a)=zz\n").unwrap_err();
        assert_eq!(e.line, Some(2));
    }

    #[test]
    fn parent_directory_and_absolute_members_are_refused() {
        for name in ["../evil", "a/../../evil", "/etc/passwd"] {
            let bytes = Tar::default()
                .file("linux.ovf", ovf().as_bytes())
                .file(name, b"x")
                .finish();
            let e = OvaArchive::from_bytes(bytes).unwrap_err();
            assert!(e.message.contains(name), "{name}: {e}");
            let at = format!("offset {}", second_header());
            assert!(e.message.contains(&at), "{name}: {e}");
        }
    }

    #[test]
    fn a_truncated_member_is_an_error() {
        let mut bytes = good_ova();
        let disk_at = second_header() + 3 * 512;
        bytes.truncate(disk_at + 1000);
        let e = OvaArchive::from_bytes(bytes).unwrap_err();
        assert!(e.message.contains("truncated"), "{e}");
        assert!(e.message.contains("5000"), "{e}");
    }

    #[test]
    fn a_garbage_header_checksum_is_an_error() {
        let mut bytes = good_ova();
        bytes[second_header() + 20] ^= 0x55; // the manifest's header, name field
        let e = OvaArchive::from_bytes(bytes).unwrap_err();
        assert!(e.message.contains("checksum"), "{e}");
        let at = format!("offset {}", second_header());
        assert!(e.message.contains(&at), "{e}");
        let e = OvaArchive::from_bytes(b"this is not a tar file".repeat(40)).unwrap_err();
        assert!(e.message.contains("checksum"), "{e}");
    }

    #[test]
    fn long_names_pax_paths_and_base_256_sizes_are_read() {
        let long = format!("{}/disk.vmdk", "d".repeat(120));
        let mut big = header(b"big.bin", 0, b'0');
        big[124..136].fill(0);
        big[124] = 0x80;
        big[135] = 3; // 3 bytes, base-256
        seal(&mut big);
        let bytes = Tar::default()
            .file("vm.ovf", ovf().as_bytes())
            .long_name(&long, b"long")
            .pax_path("pax/named.vmdk", b"pax!")
            .entry(big, b"abc")
            .finish();
        let ova = OvaArchive::from_bytes(bytes).unwrap();
        let m = ova.member(&long).unwrap();
        assert_eq!(m.size, 4);
        assert_eq!(ova.member("pax/named.vmdk").unwrap().size, 4);
        assert!(ova.member("short-name").is_none());
        assert_eq!(ova.member("big.bin").unwrap().size, 3);
        assert_eq!(ova.findings()[0].code, "ova-no-manifest");
    }

    #[test]
    fn links_and_devices_are_skipped_or_refused() {
        let bytes = Tar::default()
            .file("vm.ovf", ovf().as_bytes())
            .entry(header(b"disk.vmdk", 0, b'2'), b"")
            .entry(header(b"null", 0, b'3'), b"")
            .finish();
        let ova = OvaArchive::from_bytes(bytes).unwrap();
        assert!(ova.member("disk.vmdk").is_none());
        let skipped = ova
            .findings()
            .iter()
            .filter(|f| f.code == "ova-member-skipped")
            .count();
        assert_eq!(skipped, 2);
        let doc = ova.descriptor().unwrap();
        assert!(ova
            .check_references(&doc)
            .iter()
            .all(|f| f.code == "ova-file-missing"));

        let bytes = Tar::default()
            .file("vm.ovf", ovf().as_bytes())
            .entry(header(b"link", 3, b'2'), b"abc")
            .finish();
        let e = OvaArchive::from_bytes(bytes).unwrap_err();
        assert!(
            e.message.contains("symbolic link yet claims 3 bytes"),
            "{e}"
        );
    }

    #[test]
    fn descriptor_placement_and_duplicates() {
        let bytes = Tar::default()
            .file("disk.vmdk", b"d")
            .file("vm.ovf", ovf().as_bytes())
            .file("vm.cert", b"-----BEGIN CERTIFICATE-----")
            .finish();
        let ova = OvaArchive::from_bytes(bytes).unwrap();
        let codes: Vec<&str> = ova.findings().iter().map(|f| f.code.as_str()).collect();
        assert_eq!(
            codes,
            [
                "ova-ovf-not-first",
                "ova-certificate-ignored",
                "ova-no-manifest"
            ]
        );
        assert_eq!(ova.descriptor_member().name, "vm.ovf");

        let none = Tar::default().file("disk.vmdk", b"d").finish();
        assert!(OvaArchive::from_bytes(none)
            .unwrap_err()
            .message
            .contains("no .ovf"));
        let twice = Tar::default()
            .file("vm.ovf", ovf().as_bytes())
            .file("a.vmdk", b"1")
            .file("./a.vmdk", b"2")
            .finish();
        assert!(OvaArchive::from_bytes(twice)
            .unwrap_err()
            .message
            .contains("twice"));
    }

    #[test]
    fn a_descriptor_error_names_the_member_inside_the_archive() {
        let bytes = Tar::default().file("vm.ovf", b"<!DOCTYPE x><x/>").finish();
        let e = OvaArchive::from_bytes(bytes)
            .unwrap()
            .descriptor()
            .unwrap_err();
        assert_eq!(e.file.as_deref(), Some(Path::new("test.ova/vm.ovf")));
        assert!(e.message.contains("DOCTYPE"));
    }

    #[test]
    fn every_truncation_of_an_archive_fails_cleanly_or_lists() {
        let bytes = good_ova();
        for n in 0..bytes.len() {
            if let Ok(ova) = OvaArchive::from_bytes(bytes[..n].to_vec()) {
                let _ = ova.verify();
                let _ = ova.descriptor().map(|d| d.lower());
            }
        }
    }

    #[test]
    fn mutated_headers_never_panic() {
        let bytes = good_ova();
        let listing = tar::list(bytes.as_slice(), bytes.len() as u64).unwrap();
        let headers = listing.entries.iter().map(|e| e.header_offset as usize);
        for i in headers.flat_map(|h| h..h + 512) {
            for v in [0u8, b'7', b'L', b'x', 0x80, 0xff] {
                let mut b = bytes.clone();
                b[i] = v;
                let start = i / 512 * 512;
                seal(&mut b[start..start + 512]);
                if let Ok(ova) = OvaArchive::from_bytes(b) {
                    let _ = ova.verify();
                    if i < 512 {
                        // Only the descriptor's own header changes what it reads.
                        let _ = ova.descriptor().map(|d| d.lower());
                    }
                }
            }
        }
    }

    #[test]
    fn fabricated_members_cannot_overflow_reads() {
        let ova = OvaArchive::from_bytes(good_ova()).unwrap();
        let fake = OvaMember {
            name: "x".into(),
            data_offset: u64::MAX,
            size: u64::MAX,
        };
        assert!(ova.read_member_at(&fake, 1, &mut [0u8; 4]).is_err());
        let past = OvaMember {
            data_offset: 1 << 40,
            ..fake
        };
        assert!(ova.read_member_at(&past, 0, &mut [0u8; 4]).is_err());
    }

    #[test]
    fn an_ova_file_on_disk_opens_and_verifies() {
        let path =
            std::env::temp_dir().join(format!("vmshift-ova-test-{}.ova", std::process::id()));
        std::fs::write(&path, good_ova()).unwrap();
        let result = OvaArchive::open(&path).and_then(|ova| ova.verify().map(|f| (ova, f)));
        std::fs::remove_file(&path).unwrap();
        let (ova, unverified) = result.unwrap();
        assert!(unverified.is_empty());
        assert_eq!(ova.path(), path);
        let e = OvaArchive::open(&std::env::temp_dir()).unwrap_err();
        assert!(
            e.message.contains("regular file") || e.file.is_some(),
            "{e}"
        );
    }
}
