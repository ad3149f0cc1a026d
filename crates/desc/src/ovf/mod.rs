//! OVF descriptors and OVA archives: read.
//!
//! An OVF package is an `.ovf` descriptor (XML), the files it names in its
//! `References` (disks as streamOptimized VMDKs, ISO images, an NVRAM
//! file), an optional `.mf` manifest of their SHA digests and an optional
//! `.cert` signing the manifest. An OVA is the same package as one tar
//! archive whose first member is the descriptor.
//!
//! - [`OvfDocument`] parses a descriptor (OVF 1.x and 2.0) into a
//!   namespace-resolved [`Element`] tree, refusing any DOCTYPE and any
//!   entity beyond the predefined five, and lowers it to the model
//!   ([`OvfDocument::lower`]).
//! - [`OvaArchive`] lists an OVA's members in place (offsets and sizes; no
//!   extraction), reads its descriptor and manifest, and verifies every
//!   member the manifest names by streaming it through the digest.
//!
//! Nothing here resolves a file reference: a disk's source stays the
//! `href` the descriptor wrote, for the CLI to resolve below the package's
//! folder or to look up among the OVA's members ([`OvaArchive::member`]).

mod guest;
mod lower;
mod ova;
mod tar;
mod units;

use std::path::Path;

pub use crate::xml::{Attribute, Element, Node};
pub use ova::{DigestAlgorithm, Manifest, ManifestEntry, OvaArchive, OvaMember};

use crate::{DescError, Result};

/// The OVF 1.x envelope namespace.
pub const NS_OVF1: &str = "http://schemas.dmtf.org/ovf/envelope/1";
/// The OVF 2.x envelope namespace.
pub const NS_OVF2: &str = "http://schemas.dmtf.org/ovf/envelope/2";
/// VMware's OVF extensions (`vmw:osType`, `vmw:Config`, …).
pub const NS_VMW: &str = "http://www.vmware.com/schema/ovf";
/// `rasd:`, the CIM resource allocation setting data of hardware items.
pub const NS_RASD: &str =
    "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData";
/// `vssd:`, the CIM virtual system setting data.
pub const NS_VSSD: &str =
    "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData";
/// The common prefix of every CIM schema namespace (`rasd`, `vssd`, and
/// OVF 2.0's `sasd` and `epasd`, whose items share `rasd`'s field names).
pub const CIM_SCHEMA_PREFIX: &str = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/";

/// The OVF major version a descriptor is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OvfVersion {
    /// OVF 1.0 and 1.1 (DSP0243 1.x).
    V1,
    /// OVF 2.x (DSP0243 2.x).
    V2,
}

/// A parsed OVF descriptor: the whole XML tree, namespaces resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvfDocument {
    root: Element,
    version: OvfVersion,
}

/// A `References/File`: a file of the package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvfFile {
    /// `ovf:id`, by which disks and devices name it.
    pub id: String,
    /// `ovf:href`: the file's name in the package (or a URL).
    pub href: String,
    /// `ovf:size` in bytes, when stated and numeric.
    pub size: Option<u64>,
    /// `ovf:compression` (`gzip`), when the file is stored compressed.
    pub compression: Option<String>,
    /// `ovf:chunkSize`, when the file is split into chunks.
    pub chunk_size: Option<u64>,
}

/// A `DiskSection/Disk`: a virtual disk and the file holding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvfDisk {
    /// `ovf:diskId`, by which `ovf:/disk/<id>` host resources name it.
    pub disk_id: String,
    /// `ovf:fileRef`: the [`OvfFile`] holding its content; `None` for a
    /// disk the importer is to create empty.
    pub file_ref: Option<String>,
    /// `ovf:capacity` as written (a number, or a `${property}`).
    pub capacity: String,
    /// `ovf:capacityAllocationUnits` (`byte * 2^30`); bytes when absent.
    pub capacity_units: Option<String>,
    /// `ovf:format`: a URI naming the file format.
    pub format: Option<String>,
    /// `ovf:populatedSize`: bytes in use, when stated.
    pub populated_size: Option<u64>,
}

impl OvfDisk {
    /// The capacity in bytes, when it is a number in a known unit.
    pub fn capacity_bytes(&self) -> Option<u64> {
        units::bytes(&self.capacity, self.capacity_units.as_deref())
    }
}

impl OvfDocument {
    /// Parses a descriptor: UTF-8 XML of at most
    /// [`MAX_DESCRIPTOR_BYTES`](crate::MAX_DESCRIPTOR_BYTES) whose root is
    /// an OVF 1.x or 2.x `Envelope`. A DOCTYPE, and any entity other than
    /// the five predefined ones and character references, is refused.
    pub fn parse(bytes: &[u8]) -> Result<OvfDocument> {
        let root = crate::xml::Document::parse(bytes)?.root;
        let version = match root.namespace.as_deref() {
            Some(NS_OVF1) if root.local() == "Envelope" => OvfVersion::V1,
            Some(NS_OVF2) if root.local() == "Envelope" => OvfVersion::V2,
            ns => {
                return Err(DescError::at_line(
                    root.line,
                    format!(
                    "the root element is <{}> in namespace '{}', not an OVF 1.x or 2.x Envelope",
                    root.name,
                    ns.unwrap_or("")
                ),
                ))
            }
        };
        Ok(OvfDocument { root, version })
    }

    /// Reads and parses the descriptor at `path` (size-capped before
    /// reading); errors name the file.
    pub fn read(path: &Path) -> Result<OvfDocument> {
        let bytes = crate::read_descriptor(path)?;
        OvfDocument::parse(&bytes).map_err(|e| e.in_file(path))
    }

    /// The `Envelope` element.
    pub fn root(&self) -> &Element {
        &self.root
    }

    /// The OVF version the envelope's namespace declares.
    pub fn version(&self) -> OvfVersion {
        self.version
    }

    /// The namespace of OVF's own elements and attributes.
    fn ns(&self) -> &'static str {
        match self.version {
            OvfVersion::V1 => NS_OVF1,
            OvfVersion::V2 => NS_OVF2,
        }
    }

    /// The package's files (`References/File`), in order.
    pub fn files(&self) -> Vec<OvfFile> {
        let ns = self.ns();
        self.root
            .all_ns(ns, "References")
            .flat_map(|r| r.all_ns(ns, "File"))
            .map(|f| OvfFile {
                id: f.get_ns_or_unprefixed(ns, "id").unwrap_or("").to_string(),
                href: f.get_ns_or_unprefixed(ns, "href").unwrap_or("").to_string(),
                size: f
                    .get_ns_or_unprefixed(ns, "size")
                    .and_then(|s| s.trim().parse().ok()),
                compression: f
                    .get_ns_or_unprefixed(ns, "compression")
                    .filter(|c| !c.is_empty() && *c != "identity")
                    .map(str::to_string),
                chunk_size: f
                    .get_ns_or_unprefixed(ns, "chunkSize")
                    .and_then(|s| s.trim().parse().ok()),
            })
            .collect()
    }

    /// The virtual disks (`DiskSection/Disk`), in order. The section is
    /// looked for in the envelope and in each virtual system.
    pub fn disks(&self) -> Vec<OvfDisk> {
        let ns = self.ns();
        let mut sections: Vec<&Element> = self.root.all_ns(ns, "DiskSection").collect();
        for vs in self.system_elements() {
            sections.extend(vs.all_ns(ns, "DiskSection"));
        }
        sections
            .into_iter()
            .flat_map(|s| s.all_ns(ns, "Disk"))
            .map(|d| OvfDisk {
                disk_id: d
                    .get_ns_or_unprefixed(ns, "diskId")
                    .unwrap_or("")
                    .to_string(),
                file_ref: d
                    .get_ns_or_unprefixed(ns, "fileRef")
                    .filter(|r| !r.is_empty())
                    .map(str::to_string),
                capacity: d
                    .get_ns_or_unprefixed(ns, "capacity")
                    .unwrap_or("")
                    .to_string(),
                capacity_units: d
                    .get_ns_or_unprefixed(ns, "capacityAllocationUnits")
                    .map(str::to_string),
                format: d.get_ns_or_unprefixed(ns, "format").map(str::to_string),
                populated_size: d
                    .get_ns_or_unprefixed(ns, "populatedSize")
                    .and_then(|s| s.trim().parse().ok()),
            })
            .collect()
    }

    /// The `ovf:id`s of the virtual systems, in document order (those of
    /// a `VirtualSystemCollection` included).
    pub fn virtual_systems(&self) -> Vec<String> {
        let ns = self.ns();
        self.system_elements()
            .iter()
            .map(|vs| vs.get_ns_or_unprefixed(ns, "id").unwrap_or("").to_string())
            .collect()
    }

    /// Every `VirtualSystem` element, collections walked depth-first.
    fn system_elements(&self) -> Vec<&Element> {
        fn walk<'a>(e: &'a Element, ns: &str, out: &mut Vec<&'a Element>) {
            for c in e.elements() {
                if c.is(ns, "VirtualSystem") {
                    out.push(c);
                } else if c.is(ns, "VirtualSystemCollection") {
                    walk(c, ns, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root, self.ns(), &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(body: &str) -> String {
        format!(
            r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">{body}</Envelope>"#
        )
    }

    #[test]
    fn doctype_is_refused_with_its_line() {
        let text = r#"<?xml version="1.0"?>
<!DOCTYPE Envelope [ <!ENTITY xxe SYSTEM "file:///etc/passwd"> ]>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1">&xxe;</Envelope>"#;
        let e = OvfDocument::parse(text.as_bytes()).unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.message.contains("DOCTYPE"), "{e}");
    }

    #[test]
    fn billion_laughs_is_refused() {
        let text = r#"<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"><Info>&lol2;</Info></Envelope>"#;
        let e = OvfDocument::parse(text.as_bytes()).unwrap_err();
        assert!(e.message.contains("DOCTYPE"), "{e}");
    }

    #[test]
    fn undeclared_entity_is_refused_in_text_and_attributes() {
        let e = OvfDocument::parse(envelope("<Info>&xxe;</Info>").as_bytes()).unwrap_err();
        assert!(e.message.contains("'&xxe;' is refused"), "{e}");
        assert_eq!(e.line, Some(2));
        let e =
            OvfDocument::parse(envelope(r#"<Info ovf:msgid="&xxe;"/>"#).as_bytes()).unwrap_err();
        assert!(e.message.contains("'&xxe;' is refused"), "{e}");
    }

    #[test]
    fn predefined_entities_and_character_references_resolve() {
        let d = OvfDocument::parse(
            envelope(r#"<Info ovf:msgid="a&amp;b&#x41;">&lt;x&gt; &#65;&quot;&apos;<![CDATA[&raw]]></Info>"#)
                .as_bytes(),
        )
        .unwrap();
        let info = d.root().first_ns(NS_OVF1, "Info").unwrap();
        assert_eq!(info.own_text(), "<x> A\"'&raw");
        assert_eq!(info.get_ns_or_unprefixed(NS_OVF1, "msgid"), Some("a&bA"));
    }

    #[test]
    fn namespaces_resolve_whatever_the_prefixes() {
        let text = r#"<o:Envelope xmlns:o="http://schemas.dmtf.org/ovf/envelope/2"
            xmlns:r="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
            <o:References><o:File o:id="f" o:href="a.vmdk" o:size="12"/></o:References></o:Envelope>"#;
        let d = OvfDocument::parse(text.as_bytes()).unwrap();
        assert_eq!(d.version(), OvfVersion::V2);
        let f = &d.files()[0];
        assert_eq!(
            (f.id.as_str(), f.href.as_str(), f.size),
            ("f", "a.vmdk", Some(12))
        );
    }

    #[test]
    fn undeclared_prefix_and_foreign_roots_are_errors() {
        let e = OvfDocument::parse(b"<x:Envelope/>").unwrap_err();
        assert!(e.message.contains("prefix 'x'"), "{e}");
        let e = OvfDocument::parse(b"<domain type='kvm'/>").unwrap_err();
        assert!(e.message.contains("not an OVF"), "{e}");
    }

    #[test]
    fn malformed_documents_are_errors() {
        for bad in [
            &b""[..],
            b"<Envelope xmlns='http://schemas.dmtf.org/ovf/envelope/1'>",
            b"<Envelope xmlns='http://schemas.dmtf.org/ovf/envelope/1'></Other>",
            b"<a/><b/>",
            b"text<a/>",
            b"\xff\xfe<\x00a\x00/\x00>\x00",
            b"<a>\xc3</a>",
            b"<?xml version='1.0' encoding='ISO-8859-1'?><a/>",
        ] {
            assert!(
                OvfDocument::parse(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn oversized_and_deep_documents_are_refused() {
        let big = vec![b' '; crate::MAX_DESCRIPTOR_BYTES as usize + 1];
        assert!(OvfDocument::parse(&big)
            .unwrap_err()
            .message
            .contains("MiB"));
        let deep = "<a>".repeat(100) + &"</a>".repeat(100);
        assert!(OvfDocument::parse(deep.as_bytes())
            .unwrap_err()
            .message
            .contains("nest"));
    }
}
