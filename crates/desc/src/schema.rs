//! libvirt's own RELAX NG schema, checked in pure Rust.
//!
//! [`validate_domain`] compiles the `domain.rng` installed with libvirt
//! (Debian: [`DEFAULT_SCHEMA_DIR`]) with the `relax-ng` crate and
//! validates a domain against it: the check `virt-xml-validate FILE
//! domain` makes with xmllint, without running either.
//!
//! - The schema is compiled on every call and nothing is cached (libvirt
//!   9.0's sixteen thousand lines compile in 10 to 15 ms, and a domain
//!   validates in about as long).
//! - Its `include`s are read from the schema folder only, by plain file
//!   name: an `href` with a path, a scheme or `..` is refused, and so is a
//!   name that leads out of the folder through a link.
//! - The document is shown to the validator as the RELAX NG data model
//!   sees it: names as (namespace, local name), namespace declarations not
//!   as attributes, text and CDATA merged into one run between elements,
//!   comments and processing instructions left out.
//! - The verdicts are xmllint's except on values with white space around
//!   them or a sign (`' qemu'`, `' 4 '`, `'+1'`); the test
//!   `known_disagreements_with_xmllint_are_pinned` says which side is
//!   wrong in each case.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use relax_ng::{
    CompileError, Content, DatatypeRegistry, ExpandedName, ResolveError, Schema, SchemaResolver,
    SchemaSource, SchemaSyntax, ValidationError, ValidationErrorKind,
};
use vmshift_model::{Finding, Severity};

use crate::xml::{Attribute, Document, Element, Node};
use crate::{DescError, Result};

/// Where Debian (and most distributions) install libvirt's schemas.
pub const DEFAULT_SCHEMA_DIR: &str = "/usr/share/libvirt/schemas";

/// The code of the findings [`validate_domain`] returns.
pub const FINDING_CODE: &str = "libvirt-schema";

/// The schema a domain is checked against, in the schema folder.
const DOMAIN_SCHEMA: &str = "domain.rng";

/// The largest schema file read (libvirt's largest, `domaincommon.rng`,
/// is about 230 KiB).
const MAX_SCHEMA_BYTES: u64 = 4 << 20;

/// The namespace the `xml` prefix is always bound to.
const XML_NAMESPACE: &str = "http://www.w3.org/XML/1998/namespace";

/// Whether the libvirt whose schema is in `schema_dir` takes an emulated
/// NVMe disk (`<target dev='nvme0n1' bus='nvme'/>`, libvirt 11 and later);
/// false when it does not, or the schema cannot be read.
pub fn accepts_emulated_nvme(schema_dir: &Path) -> bool {
    const PROBE: &str = "<domain type='kvm'><name>probe</name><memory>1024</memory><os><type>hvm</type></os><devices><disk type='file' device='disk'><source file='/probe.qcow2'/><target dev='nvme0n1' bus='nvme'/></disk></devices></domain>";
    Document::parse(PROBE.as_bytes())
        .ok()
        .and_then(|doc| validate_domain(&doc, schema_dir).ok())
        .is_some_and(|f| f.is_empty())
}

/// Checks `doc`'s root element against `schema_dir/domain.rng`: one
/// [`Severity::Error`] finding (code [`FINDING_CODE`]) per problem, none
/// for a valid domain.
///
/// A finding's path names the element (`domain/devices/disk[2]/target`),
/// or the attribute (`domain/memory/@unit`), and its message says what is
/// wrong and on which line, for a parsed document.
///
/// A schema file that is missing, unreadable or not a schema the crate
/// can compile, and an `include` outside `schema_dir`, are errors naming
/// the file.
pub fn validate_domain(doc: &Document, schema_dir: &Path) -> Result<Vec<Finding>> {
    let schema = compile(schema_dir)?;
    let errors = schema
        .validate(&DatatypeRegistry::new(), &Scoped::root(&doc.root))
        .map_err(|e| {
            DescError::new(format!(
                "uses a datatype the relax-ng crate does not implement: {e}"
            ))
            .in_file(&schema_dir.join(DOMAIN_SCHEMA))
        })?;
    Ok(errors.iter().map(finding).collect())
}

/// Compiles `dir/domain.rng` and what it includes.
fn compile(dir: &Path) -> Result<Schema> {
    let folder = SchemaFolder::open(dir)?;
    let source = folder.read(DOMAIN_SCHEMA)?;
    Schema::compile(&source, &folder).map_err(|e| folder.compile_error(e))
}

/// A validation error as a finding.
fn finding(e: &ValidationError<Location>) -> Finding {
    let (path, line) = match e.location() {
        Some(l) => (l.path.clone(), l.line),
        None => (path_of(e.path()), 0),
    };
    let path = match e.kind() {
        ValidationErrorKind::UnexpectedAttribute(a)
        | ValidationErrorKind::InvalidAttributeValue(a, _) => format!("{path}/@{}", a.local),
        _ => path,
    };
    let mut message = e.kind().to_string();
    if line > 0 {
        message.push_str(&format!(" (line {line})"));
    }
    Finding::new(Severity::Error, FINDING_CODE, path, message)
}

/// `domain/devices/disk` from the names the crate reports.
fn path_of(names: &[ExpandedName]) -> String {
    let names: Vec<&str> = names.iter().map(|n| n.local.as_str()).collect();
    names.join("/")
}

/// The schema folder, as the crate's resolver: serves plain file names
/// inside it and remembers what it served or refused, so that a schema
/// that does not compile is reported against the right file.
struct SchemaFolder {
    /// The folder as given (errors name files by it).
    dir: PathBuf,
    /// The folder, canonical (every file read must resolve inside it).
    real: PathBuf,
    /// The included files read, in order.
    served: RefCell<Vec<SchemaSource>>,
    /// Why the last `include` could not be served.
    refused: RefCell<Option<DescError>>,
}

impl SchemaFolder {
    /// The folder `dir`; a folder that does not exist is reported as the
    /// missing `domain.rng` in it.
    fn open(dir: &Path) -> Result<SchemaFolder> {
        let real = dir
            .canonicalize()
            .map_err(|e| DescError::io(&dir.join(DOMAIN_SCHEMA), e))?;
        Ok(SchemaFolder {
            dir: dir.to_path_buf(),
            real,
            served: RefCell::new(Vec::new()),
            refused: RefCell::new(None),
        })
    }

    /// Reads the schema file `name` (a plain file name) of the folder.
    fn read(&self, name: &str) -> Result<SchemaSource> {
        let path = self.dir.join(name);
        let file = std::fs::File::open(&path).map_err(|e| DescError::io(&path, e))?;
        let real = path.canonicalize().map_err(|e| DescError::io(&path, e))?;
        if real.parent() != Some(self.real.as_path()) {
            return Err(DescError::new(format!(
                "refused: it leads out of {} (to {})",
                self.dir.display(),
                real.display()
            ))
            .in_file(&path));
        }
        let mut bytes = Vec::new();
        file.take(MAX_SCHEMA_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| DescError::io(&path, e))?;
        if bytes.len() as u64 > MAX_SCHEMA_BYTES {
            return Err(DescError::new(format!(
                "larger than {} MiB; not a libvirt schema",
                MAX_SCHEMA_BYTES >> 20
            ))
            .in_file(&path));
        }
        let text = String::from_utf8(bytes)
            .map_err(|_| DescError::new("not UTF-8; not a libvirt schema").in_file(&path))?;
        Ok(SchemaSource::new(text, name, SchemaSyntax::Xml))
    }

    /// Serves `href`, included by the file `base`.
    fn include(&self, href: &str, base: &str) -> Result<SchemaSource> {
        if !is_plain_file_name(href) {
            return Err(DescError::new(format!(
                "refused: schemas are read from {} by plain file name only",
                self.dir.display()
            ))
            .field(format!("<include href=\"{href}\">"))
            .in_file(&self.dir.join(base)));
        }
        self.read(href)
    }

    /// The file a compilation failure is reported against: the include
    /// refused, else the first file read that does not parse, else
    /// `domain.rng` (the error may then lie in any file it includes).
    fn compile_error(&self, e: CompileError) -> DescError {
        if let Some(refused) = self.refused.take() {
            return refused;
        }
        let root = self.dir.join(DOMAIN_SCHEMA);
        if let CompileError::Parse(p) = &e {
            return DescError::new(format!("not a schema the relax-ng crate can read: {p}"))
                .in_file(&root);
        }
        let served = self.served.borrow();
        let unparsable = served
            .iter()
            .find_map(|s| relax_ng::parse(s).err().map(|p| (s.base_uri(), p)));
        match unparsable {
            Some((name, p)) => {
                DescError::new(format!("not a schema the relax-ng crate can read: {p}"))
                    .in_file(&self.dir.join(name))
            }
            None => DescError::new(format!(
                "the schema (or a file it includes) does not compile: {e}"
            ))
            .in_file(&root),
        }
    }
}

impl SchemaResolver for SchemaFolder {
    fn resolve(
        &self,
        href: &str,
        base_uri: &str,
    ) -> std::result::Result<SchemaSource, ResolveError> {
        // Every source this folder serves has its plain file name as base.
        let base = Path::new(base_uri)
            .file_name()
            .and_then(|b| b.to_str())
            .unwrap_or(DOMAIN_SCHEMA);
        match self.include(href, base) {
            Ok(source) => {
                self.served.borrow_mut().push(source.clone());
                Ok(source)
            }
            Err(e) => {
                let message = e.to_string();
                self.refused.replace(Some(e));
                Err(ResolveError::new(message))
            }
        }
    }
}

/// Whether `href` names a file of the schema folder itself: no folder,
/// no `..`, no URI scheme, query, fragment or escape.
fn is_plain_file_name(href: &str) -> bool {
    !href.is_empty()
        && href != "."
        && href != ".."
        && !href.contains(['/', '\\', ':', '%', '?', '#', '\0'])
}

/// Where an element is: its path (`domain/devices/disk[2]`) and line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Location {
    path: String,
    /// 1-based; 0 for an element built in code.
    line: usize,
}

/// An element as the validator sees it: the element and its place in the
/// tree, which gives its path and the namespace declarations in scope.
/// (The crate takes children by value, so the tree is shared, not cloned.)
#[derive(Debug, Clone)]
struct Scoped<'a>(Rc<Place<'a>>);

#[derive(Debug)]
struct Place<'a> {
    element: &'a Element,
    parent: Option<Scoped<'a>>,
    /// 1-based position among its siblings of the same name, when it has
    /// such siblings.
    position: Option<usize>,
}

impl<'a> Scoped<'a> {
    fn root(element: &'a Element) -> Scoped<'a> {
        Scoped(Rc::new(Place {
            element,
            parent: None,
            position: None,
        }))
    }

    fn child(&self, element: &'a Element, position: Option<usize>) -> Scoped<'a> {
        Scoped(Rc::new(Place {
            element,
            parent: Some(self.clone()),
            position,
        }))
    }

    /// This element and its ancestors, nearest first.
    fn ancestry(&self) -> impl Iterator<Item = &Place<'a>> {
        std::iter::successors(Some(&*self.0), |p| p.parent.as_ref().map(|s| &*s.0))
    }

    /// The namespace `prefix` (`""` for the default namespace) is bound to
    /// here; `None` when unbound or undeclared (`xmlns=""`).
    fn lookup(&self, prefix: &str) -> Option<String> {
        if prefix == "xml" {
            return Some(XML_NAMESPACE.to_string());
        }
        let declared = |a: &&Attribute| {
            a.is_namespace_declaration()
                && match a.name.split_once(':') {
                    Some((_, p)) => p == prefix,
                    None => prefix.is_empty(),
                }
        };
        self.ancestry()
            .find_map(|p| p.element.attributes.iter().find(declared))
            .filter(|a| !a.value.is_empty())
            .map(|a| a.value.clone())
    }

    /// The element's namespace: as parsed, or for an element built in code
    /// (which carries none), what its prefix is declared as.
    fn element_namespace(&self) -> Option<String> {
        let e = self.0.element;
        e.namespace
            .clone()
            .or_else(|| self.lookup(prefix(&e.name).unwrap_or("")))
    }

    /// An attribute's namespace, likewise; unprefixed ones have none.
    fn attribute_namespace(&self, a: &Attribute) -> Option<String> {
        a.namespace
            .clone()
            .or_else(|| prefix(&a.name).and_then(|p| self.lookup(p)))
    }
}

/// The prefix of a qualified name.
fn prefix(name: &str) -> Option<&str> {
    name.split_once(':').map(|(p, _)| p)
}

impl relax_ng::Element for Scoped<'_> {
    type Location = Location;

    fn name(&self) -> ExpandedName {
        ExpandedName::new(self.element_namespace(), self.0.element.local())
    }

    fn attributes(&self) -> impl Iterator<Item = (ExpandedName, String)> {
        self.0
            .element
            .attributes
            .iter()
            .filter(|a| !a.is_namespace_declaration())
            .map(|a| {
                let name = ExpandedName::new(self.attribute_namespace(a), a.local());
                (name, a.value.clone())
            })
    }

    fn children(&self) -> impl Iterator<Item = Content<Self>> {
        let element = self.0.element;
        let mut totals = BTreeMap::<&str, usize>::new();
        for c in element.elements() {
            *totals.entry(&c.name).or_default() += 1;
        }
        let mut seen = BTreeMap::<&str, usize>::new();
        let mut out = Vec::new();
        let mut text = String::new();
        for node in &element.children {
            match node {
                Node::Text(t) | Node::CData(t) => text.push_str(t),
                Node::Comment(_) | Node::Pi(_) => {}
                Node::Element(c) => {
                    if !text.is_empty() {
                        out.push(Content::Text(std::mem::take(&mut text)));
                    }
                    let n = seen.entry(&c.name).or_default();
                    *n += 1;
                    let position = (totals[c.name.as_str()] > 1).then_some(*n);
                    out.push(Content::Element(self.child(c, position)));
                }
            }
        }
        if !text.is_empty() {
            out.push(Content::Text(text));
        }
        out.into_iter()
    }

    fn location(&self) -> Option<Location> {
        let mut steps: Vec<String> = self
            .ancestry()
            .map(|p| match p.position {
                Some(i) => format!("{}[{i}]", p.element.name),
                None => p.element.name.clone(),
            })
            .collect();
        steps.reverse();
        Some(Location {
            path: steps.join("/"),
            line: self.0.element.line,
        })
    }

    fn namespace_bindings(&self) -> impl Iterator<Item = (String, String)> {
        let mut bindings = BTreeMap::<String, String>::new();
        for place in self.ancestry() {
            for a in place.element.attributes.iter() {
                if a.is_namespace_declaration() {
                    let prefix = a.name.split_once(':').map_or("", |(_, p)| p);
                    bindings
                        .entry(prefix.to_string())
                        .or_insert_with(|| a.value.clone());
                }
            }
        }
        bindings.into_iter().filter(|(_, uri)| !uri.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::libvirt::DomainDocument;
    use crate::mapping::{to_kvm, MapOptions};
    use crate::vmx::VmxDocument;
    use vmshift_model::{DiskRef, Vm};

    const LINUX: &str = include_str!("../../../fixtures/vms/linux-web/linux-web.vmx");
    const WINDOWS: &str = include_str!("../../../fixtures/vms/winsrv/winsrv.vmx");
    const WEB01: &str = include_str!("../../../fixtures/vms/libvirt/web01.xml");

    fn installed() -> &'static Path {
        Path::new(DEFAULT_SCHEMA_DIR)
    }

    /// The domain vmshift writes for a `.vmx`, its disks given the absolute
    /// paths libvirt's schema wants.
    fn written(vmx: &str) -> DomainDocument {
        let vm = VmxDocument::parse(vmx.as_bytes()).unwrap().lower().vm;
        let mut vm: Vm = to_kvm(&vm, &MapOptions::default()).0;
        for (i, d) in vm.disks.iter_mut().enumerate() {
            if d.source.is_some() {
                d.source = Some(DiskRef::File {
                    path: format!("/var/lib/libvirt/images/{}-{i}.qcow2", vm.name),
                });
            }
        }
        DomainDocument::raise(&vm)
    }

    /// web01.xml with `from` replaced by `to` (which must be there).
    fn web01_with(from: &str, to: &str) -> String {
        assert!(WEB01.contains(from), "{from} is not in web01.xml");
        WEB01.replacen(from, to, 1)
    }

    fn validate(xml: &str) -> Vec<Finding> {
        let doc = Document::parse(xml.as_bytes()).unwrap();
        validate_domain(&doc, installed()).unwrap()
    }

    /// Whether `virt-xml-validate FILE domain` (xmllint against the same
    /// installed schema) accepts `xml`.
    fn xmllint_accepts(xml: &str) -> bool {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("domain.xml");
        std::fs::write(&file, xml).unwrap();
        let out = std::process::Command::new("virt-xml-validate")
            .arg(&file)
            .arg("domain")
            .output()
            .expect("virt-xml-validate (libvirt-clients) is installed");
        out.status.success()
    }

    /// A schema folder holding `files`.
    fn schema_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    const RNG: &str = "http://relaxng.org/ns/structure/1.0";

    /// `<a xmlns="urn:x">` with a `p:q` attribute (`urn:p`) and a `<b>` in
    /// no namespace holding an integer.
    fn small_schema() -> tempfile::TempDir {
        let rng = format!(
            r#"<element name="a" ns="urn:x" xmlns="{RNG}" datatypeLibrary="http://www.w3.org/2001/XMLSchema-datatypes">
                 <attribute name="q" ns="urn:p"/>
                 <element name="b" ns=""><data type="integer"/></element>
               </element>"#
        );
        schema_dir(&[("domain.rng", &rng)])
    }

    #[test]
    fn emulated_nvme_is_probed_in_the_installed_schema() {
        // libvirt 9.0 (Debian 12) has no bus='nvme' for an emulated disk.
        assert!(!accepts_emulated_nvme(installed()));
        // The same probe with a SATA disk passes: only NVMe is refused.
        let sata = "<domain type='kvm'><name>probe</name><memory>1024</memory><os><type>hvm</type></os><devices><disk type='file' device='disk'><source file='/probe.qcow2'/><target dev='sda' bus='sata'/></disk></devices></domain>";
        let doc = Document::parse(sata.as_bytes()).unwrap();
        assert!(validate_domain(&doc, installed()).unwrap().is_empty());
        // A schema that has it (as libvirt 11 does) is seen to.
        let dir = tempfile::tempdir().unwrap();
        for e in std::fs::read_dir(installed()).unwrap() {
            let e = e.unwrap();
            let mut text = std::fs::read_to_string(e.path()).unwrap();
            if e.file_name() == "domaincommon.rng" {
                text = text
                    .replacen(
                        "<value>sata</value>",
                        "<value>sata</value><value>nvme</value>",
                        1,
                    )
                    .replacen("(fd|hd|sd|vd|xvd|ubd)", "(fd|hd|sd|vd|xvd|ubd|nvme)", 1);
            }
            std::fs::write(dir.path().join(e.file_name()), text).unwrap();
        }
        assert!(accepts_emulated_nvme(dir.path()));
        assert!(!accepts_emulated_nvme(Path::new("/nonexistent")));
    }

    #[test]
    fn written_domains_of_the_sample_vms_are_valid() {
        for vmx in [LINUX, WINDOWS] {
            let dom = written(vmx);

            let built = validate_domain(&dom.doc, installed()).unwrap();
            let parsed = validate(&dom.render());

            assert_eq!(built, [], "{}", dom.render());
            assert_eq!(parsed, [], "{}", dom.render());
        }
    }

    #[test]
    fn sample_libvirt_domain_is_valid() {
        assert_eq!(validate(WEB01), []);
    }

    #[test]
    fn verdicts_are_xmllints() {
        let cases = [
            ("linux-web written", written(LINUX).render()),
            ("winsrv written", written(WINDOWS).render()),
            ("web01.xml", WEB01.to_string()),
            (
                "memory in parsecs",
                web01_with("<memory unit='KiB'>", "<memory unit='parsecs'>"),
            ),
            (
                "disk without target",
                web01_with("<target dev='vda' bus='virtio'/>", ""),
            ),
            (
                "relative disk source",
                web01_with("/var/lib/libvirt/images/web01.qcow2", "x.qcow2"),
            ),
            (
                "unknown device",
                web01_with("<devices>", "<devices>\n    <bogus/>"),
            ),
            (
                "vcpu not a number",
                web01_with(
                    "<vcpu placement='static'>4</vcpu>",
                    "<vcpu placement='static'>abc</vcpu>",
                ),
            ),
            ("no name", web01_with("<name>web01</name>", "")),
        ];

        let ours: Vec<(&str, bool)> = cases
            .iter()
            .map(|(what, xml)| (*what, validate(xml).is_empty()))
            .collect();
        let xmllint: Vec<(&str, bool)> = cases
            .iter()
            .map(|(what, xml)| (*what, xmllint_accepts(xml)))
            .collect();

        assert_eq!(ours, xmllint, "(case, valid): ours, then xmllint's");
        let valid: Vec<&str> = ours.iter().filter(|v| v.1).map(|v| v.0).collect();
        assert_eq!(valid, ["linux-web written", "winsrv written", "web01.xml"]);
    }

    /// Where the crate and xmllint part ways on libvirt's schema, pinned
    /// so that a relax-ng (or libxml2) change shows up here: the crate
    /// accepts each, xmllint refuses each.
    #[test]
    fn known_disagreements_with_xmllint_are_pinned() {
        let cases = [
            // A `string` with a `pattern` (genericName): white space is
            // significant in a string, but the crate trims every value
            // before matching a pattern. The crate is wrong.
            web01_with(
                "<driver name='qemu' type='raw'/>",
                "<driver name=' qemu' type='raw'/>",
            ),
            // An `unsignedInt` with a `pattern`: XSD collapses white space
            // before the pattern is matched; libxml2 matches the raw value.
            // xmllint is wrong.
            web01_with(
                "<vcpu placement='static'>4</vcpu>",
                "<vcpu placement='static'> 4 </vcpu>",
            ),
            // An `unsignedInt`: XSD allows `+1` (and `-0`); libxml2 does
            // not. xmllint is wrong.
            web01_with("domain='0x0000'", "domain='+1'"),
        ];

        let verdicts: Vec<(bool, bool)> = cases
            .iter()
            .map(|xml| (validate(xml).is_empty(), xmllint_accepts(xml)))
            .collect();

        assert_eq!(verdicts, [(true, false); 3], "(ours, xmllint)");
    }

    #[test]
    fn finding_names_the_element_path_and_line() {
        let xml = web01_with("/var/lib/libvirt/images/web01-data.raw", "x.raw");
        let line = xml.lines().position(|l| l.contains("'x.raw'")).unwrap() + 1;

        let findings = validate(&xml);

        assert_eq!(
            findings,
            [Finding::new(
                Severity::Error,
                FINDING_CODE,
                "domain/devices/disk[2]/source/@file",
                format!("invalid value `x.raw` for attribute `file` (line {line})"),
            )]
        );
    }

    #[test]
    fn unknown_element_is_found_at_its_own_path() {
        let findings = validate(&web01_with("<devices>", "<devices>\n    <bogus/>"));

        let paths: Vec<&str> = findings.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["domain/devices/bogus"]);
    }

    #[test]
    fn namespaces_are_resolved_and_declarations_are_no_attributes() {
        let dir = small_schema();
        let xml = r#"<a xmlns="urn:x" xmlns:p="urn:p" p:q="1"><b xmlns="">1<!-- c --><![CDATA[2]]>3</b></a>"#;

        let findings = validate_domain(&Document::parse(xml.as_bytes()).unwrap(), dir.path());

        assert_eq!(findings.unwrap(), []);
    }

    #[test]
    fn built_elements_take_their_namespace_from_declarations() {
        let dir = small_schema();
        let root = Element::new("x:a")
            .attr("xmlns:x", "urn:x")
            .attr("xmlns:p", "urn:p")
            .attr("p:q", "1")
            .child(Element::new("b").text("12"));

        let findings = validate_domain(&Document::new(root), dir.path());

        assert_eq!(findings.unwrap(), []);
    }

    #[test]
    fn element_in_another_namespace_is_a_finding() {
        let dir = small_schema();
        let xml = r#"<a xmlns="urn:y" xmlns:p="urn:p" p:q="1"><b>1</b></a>"#;

        let findings = validate_domain(&Document::parse(xml.as_bytes()).unwrap(), dir.path());

        let messages: Vec<String> = findings.unwrap().into_iter().map(|f| f.message).collect();
        assert_eq!(messages, ["unexpected element `{urn:y}a` (line 1)"]);
    }

    #[test]
    fn missing_schema_is_an_error_naming_it() {
        let dir = schema_dir(&[]);

        let err = validate_domain(&Document::parse(WEB01.as_bytes()).unwrap(), dir.path());

        let want = dir.path().join("domain.rng");
        assert_eq!(err.unwrap_err().file, Some(want));
    }

    #[test]
    fn include_outside_the_folder_is_refused() {
        let outer = schema_dir(&[("evil.rng", "<grammar/>")]);
        let inner = outer.path().join("schemas");
        std::fs::create_dir(&inner).unwrap();
        let include = format!(r#"<grammar xmlns="{RNG}"><include href="../evil.rng"/></grammar>"#);
        std::fs::write(inner.join("domain.rng"), include).unwrap();

        let err = validate_domain(&Document::parse(WEB01.as_bytes()).unwrap(), &inner).unwrap_err();

        assert_eq!(err.file, Some(inner.join("domain.rng")));
        assert_eq!(err.field.as_deref(), Some("<include href=\"../evil.rng\">"));
    }

    #[test]
    fn include_linked_out_of_the_folder_is_refused() {
        let outer = schema_dir(&[("evil.rng", "<grammar/>")]);
        let inner = outer.path().join("schemas");
        std::fs::create_dir(&inner).unwrap();
        let include = format!(r#"<grammar xmlns="{RNG}"><include href="common.rng"/></grammar>"#);
        std::fs::write(inner.join("domain.rng"), include).unwrap();
        std::os::unix::fs::symlink(outer.path().join("evil.rng"), inner.join("common.rng"))
            .unwrap();

        let err = validate_domain(&Document::parse(WEB01.as_bytes()).unwrap(), &inner).unwrap_err();

        assert_eq!(err.file, Some(inner.join("common.rng")));
        assert!(err.message.starts_with("refused"), "{err}");
    }

    #[test]
    fn unparsable_include_is_an_error_naming_it() {
        let include = format!(
            r#"<grammar xmlns="{RNG}"><include href="common.rng"/><start><ref name="x"/></start></grammar>"#
        );
        let dir = schema_dir(&[("domain.rng", &include), ("common.rng", "<grammar")]);

        let err =
            validate_domain(&Document::parse(WEB01.as_bytes()).unwrap(), dir.path()).unwrap_err();

        assert_eq!(err.file, Some(dir.path().join("common.rng")));
    }

    #[test]
    fn plain_file_names_only() {
        let plain: Vec<bool> = [
            "basictypes.rng",
            "../x.rng",
            "/etc/x.rng",
            "sub/x.rng",
            "file:x.rng",
            "x%2Erng",
            "..",
            "",
        ]
        .iter()
        .map(|h| is_plain_file_name(h))
        .collect();

        assert_eq!(
            plain,
            [true, false, false, false, false, false, false, false]
        );
    }
}
