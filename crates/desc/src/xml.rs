//! The one XML tree of vmshift's descriptors (libvirt domain XML, OVF),
//! over quick-xml: lossless, namespace-aware and safe.
//!
//! - Lossless: elements keep their attributes in order, and text, comments,
//!   CDATA and processing instructions stay where they were, as do the
//!   comments before and after the root; [`Document::render`] writes it all
//!   back, so a descriptor can be read, changed and written without losing
//!   what vmshift does not model.
//! - Namespace-aware: every element and attribute keeps its name as written
//!   and the namespace URI its prefix is bound to, so a vocabulary whose
//!   prefixes are the writer's choice (OVF's `ovf`, `rasd`, `vssd`, `vmw`…)
//!   is matched on (namespace, local name) ([`Element::is`],
//!   [`Element::first_ns`], [`Element::get_ns`]). A prefix no `xmlns`
//!   declares is an error. Readers that go by local name alone (libvirt)
//!   use [`Element::first`], [`Element::at`] and [`Element::get`].
//! - Safe by construction: a DOCTYPE is refused (so no entity can be
//!   declared), any entity other than the five predefined ones and
//!   character references is refused, and the input size, the nesting depth
//!   and the number of elements are bounded. Only UTF-8 is read.
//!
//! Elements built in code ([`Element::new`]) keep their names as given;
//! only parsing resolves prefixes to namespaces.

use quick_xml::escape::{resolve_xml_entity, EscapeError};
use quick_xml::events::{
    BytesCData, BytesDecl, BytesEnd, BytesPI, BytesRef, BytesStart, BytesText, Event,
};
use quick_xml::name::ResolveResult;
use quick_xml::{NsReader, Writer};

use crate::{DescError, Result, MAX_DESCRIPTOR_BYTES};

/// The deepest nesting accepted (libvirt and OVF documents nest about 6).
const MAX_DEPTH: usize = vmshift_model::limits::XML_DEPTH;
/// The most elements accepted (a large descriptor has a few hundred).
const MAX_ELEMENTS: usize = vmshift_model::limits::XML_ELEMENTS;

/// The namespace `xmlns` declarations belong to.
pub const XMLNS_NAMESPACE: &str = "http://www.w3.org/2000/xmlns/";

/// A node of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// An element.
    Element(Element),
    /// Character data, references resolved.
    Text(String),
    /// A comment's text.
    Comment(String),
    /// A CDATA section's text.
    CData(String),
    /// A processing instruction (its target and content).
    Pi(String),
}

/// An attribute: its name as written, its namespace and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribute {
    /// The qualified name as written (`ovf:id`, `xmlns:rasd`, `type`).
    pub name: String,
    /// The namespace URI of its prefix ([`XMLNS_NAMESPACE`] for a
    /// namespace declaration); `None` for an unprefixed attribute.
    pub namespace: Option<String>,
    /// The value, references resolved.
    pub value: String,
}

impl Attribute {
    /// The name without its prefix (for `xmlns:rasd`, the declared prefix
    /// `rasd`).
    pub fn local(&self) -> &str {
        local(&self.name)
    }

    /// Whether this is a namespace declaration (`xmlns`, `xmlns:p`).
    pub fn is_namespace_declaration(&self) -> bool {
        self.namespace.as_deref() == Some(XMLNS_NAMESPACE)
    }
}

/// An element: its names, attributes and children in document order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Element {
    /// The qualified name as written (`rasd:ResourceType`, `domain`).
    pub name: String,
    /// The namespace URI its prefix (or the default namespace) is bound
    /// to; `None` for no namespace, and for elements built in code.
    pub namespace: Option<String>,
    /// Attributes in order, namespace declarations included.
    pub attributes: Vec<Attribute>,
    /// Child nodes in order.
    pub children: Vec<Node>,
    /// 1-based line of the start tag (0 for elements built in code).
    pub line: usize,
}

/// Building.
impl Element {
    /// A new element without attributes or children.
    pub fn new(name: &str) -> Element {
        Element {
            name: name.to_string(),
            ..Element::default()
        }
    }

    /// Adds an attribute (builder style); `xmlns` and `xmlns:p` are
    /// recorded as namespace declarations.
    pub fn attr(mut self, name: &str, value: impl Into<String>) -> Element {
        let namespace =
            (name == "xmlns" || name.starts_with("xmlns:")).then(|| XMLNS_NAMESPACE.to_string());
        self.attributes.push(Attribute {
            name: name.to_string(),
            namespace,
            value: value.into(),
        });
        self
    }

    /// Adds a child element (builder style).
    pub fn child(mut self, e: Element) -> Element {
        self.push(e);
        self
    }

    /// Adds text (builder style).
    pub fn text(mut self, t: impl Into<String>) -> Element {
        self.children.push(Node::Text(t.into()));
        self
    }

    /// Appends a child element.
    pub fn push(&mut self, e: Element) {
        self.children.push(Node::Element(e));
    }
}

/// Reading.
impl Element {
    /// The name without its namespace prefix.
    pub fn local(&self) -> &str {
        local(&self.name)
    }

    /// Whether the element is `local` in namespace `ns`.
    pub fn is(&self, ns: &str, local: &str) -> bool {
        self.local() == local && self.namespace.as_deref() == Some(ns)
    }

    /// Child elements.
    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            _ => None,
        })
    }

    /// Child elements whose local name is `local`, in any namespace.
    pub fn all<'a>(&'a self, local: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.elements().filter(move |e| e.local() == local)
    }

    /// The first child element whose local name is `local`, in any
    /// namespace.
    pub fn first(&self, local: &str) -> Option<&Element> {
        self.elements().find(|e| e.local() == local)
    }

    /// The element at a `/`-separated path of local names below this one
    /// (`devices/video/model`), each step the first match.
    pub fn at(&self, path: &str) -> Option<&Element> {
        path.split('/').try_fold(self, |e, step| e.first(step))
    }

    /// Child elements named `local` in namespace `ns`.
    pub fn all_ns<'a>(
        &'a self,
        ns: &'a str,
        local: &'a str,
    ) -> impl Iterator<Item = &'a Element> + 'a {
        self.elements().filter(move |e| e.is(ns, local))
    }

    /// The first child element named `local` in namespace `ns`.
    pub fn first_ns(&self, ns: &str, local: &str) -> Option<&Element> {
        self.elements().find(|e| e.is(ns, local))
    }

    /// The value of attribute `name`: matched on the qualified name first,
    /// then on the local name in any namespace (namespace declarations
    /// excepted).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|a| a.name == name)
            .or_else(|| {
                self.attributes
                    .iter()
                    .find(|a| a.local() == name && !a.is_namespace_declaration())
            })
            .map(|a| a.value.as_str())
    }

    /// The value of attribute `local` in namespace `ns`.
    pub fn get_ns(&self, ns: &str, local: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|a| a.local() == local && a.namespace.as_deref() == Some(ns))
            .map(|a| a.value.as_str())
    }

    /// The value of attribute `local` in namespace `ns`, or else of the
    /// unprefixed attribute `local` (some writers leave attributes of a
    /// namespaced vocabulary, OVF's among them, unqualified).
    pub fn get_ns_or_unprefixed(&self, ns: &str, local: &str) -> Option<&str> {
        self.get_ns(ns, local).or_else(|| {
            self.attributes
                .iter()
                .find(|a| a.name == local && a.namespace.is_none())
                .map(|a| a.value.as_str())
        })
    }

    /// The element's own text and CDATA (not its descendants'), trimmed.
    pub fn own_text(&self) -> String {
        let mut s = String::new();
        for n in &self.children {
            if let Node::Text(t) | Node::CData(t) = n {
                s.push_str(t);
            }
        }
        s.trim().to_string()
    }

    /// The text and CDATA of the element and all its descendants, in
    /// document order, trimmed.
    pub fn text_content(&self) -> String {
        fn collect(e: &Element, s: &mut String) {
            for n in &e.children {
                match n {
                    Node::Text(t) | Node::CData(t) => s.push_str(t),
                    Node::Element(c) => collect(c, s),
                    Node::Comment(_) | Node::Pi(_) => {}
                }
            }
        }
        let mut s = String::new();
        collect(self, &mut s);
        s.trim().to_string()
    }
}

/// The part of a qualified name after its prefix.
fn local(name: &str) -> &str {
    name.split_once(':').map_or(name, |(_, l)| l)
}

/// A whole document: the root element and the comments and processing
/// instructions around it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// Whether the input started with an XML declaration (written back as
    /// `<?xml version="1.0" encoding="UTF-8"?>`).
    pub declaration: bool,
    /// Comments and processing instructions before the root element.
    pub prolog: Vec<Node>,
    /// The root element.
    pub root: Element,
    /// Comments and processing instructions after the root element.
    pub epilog: Vec<Node>,
}

impl Document {
    /// A document of `root` alone, without a declaration.
    pub fn new(root: Element) -> Document {
        Document {
            declaration: false,
            prolog: Vec::new(),
            root,
            epilog: Vec::new(),
        }
    }

    /// Parses UTF-8 XML of at most [`MAX_DESCRIPTOR_BYTES`]. Refuses a
    /// DOCTYPE, entities beyond the predefined five, undeclared namespace
    /// prefixes, other encodings, and nesting or element counts past the
    /// limits; errors carry the line.
    pub fn parse(bytes: &[u8]) -> Result<Document> {
        if bytes.len() as u64 > MAX_DESCRIPTOR_BYTES {
            return Err(DescError::new(format!(
                "{} bytes is larger than the {} MiB a descriptor may have",
                bytes.len(),
                MAX_DESCRIPTOR_BYTES >> 20
            )));
        }
        let text = decode(bytes)?;
        let mut reader = NsReader::from_str(text);
        reader.config_mut().check_end_names = true;
        reader.config_mut().check_comments = true;
        let mut tree = Tree::default();
        let mut lines = Lines {
            text: text.as_bytes(),
            offset: 0,
            line: 1,
        };
        loop {
            let start = usize::try_from(reader.buffer_position()).unwrap_or(usize::MAX);
            let (namespace, event) = match reader.read_resolved_event() {
                Ok((r, e)) => (namespace_of(r), e),
                Err(e) => {
                    let at = usize::try_from(reader.error_position()).unwrap_or(usize::MAX);
                    return Err(DescError::at_line(
                        line_of(text.as_bytes(), at),
                        format!("not well-formed XML: {e}"),
                    ));
                }
            };
            let line = lines.at(start);
            if matches!(event, Event::Eof) {
                break;
            }
            tree.event(&reader, event, namespace, line)?;
        }
        tree.finish(line_of(text.as_bytes(), text.len()))
    }

    /// Writes the document. A parsed tree keeps its white space as it was;
    /// a built one (no white-space text anywhere) is indented by two
    /// spaces.
    pub fn render(&self) -> String {
        let mut w = Writer::new(Vec::new());
        let newline = |w: &mut Writer<Vec<u8>>| {
            let _ = w.write_event(Event::Text(BytesText::from_escaped("\n")));
        };
        if self.declaration {
            let _ = w.write_event(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)));
            newline(&mut w);
        }
        for n in &self.prolog {
            write_node(&mut w, n, 0, false);
            newline(&mut w);
        }
        let pretty = !has_whitespace_text(&self.root);
        write_element(&mut w, &self.root, 0, pretty);
        newline(&mut w);
        for n in &self.epilog {
            write_node(&mut w, n, 0, false);
            newline(&mut w);
        }
        String::from_utf8(w.into_inner()).unwrap_or_default()
    }
}

/// Decodes the bytes as UTF-8, skipping a byte-order mark and refusing
/// UTF-16.
fn decode(bytes: &[u8]) -> Result<&str> {
    if bytes.starts_with(&[0xff, 0xfe])
        || bytes.starts_with(&[0xfe, 0xff])
        || bytes.starts_with(&[0, b'<'])
        || bytes.starts_with(&[b'<', 0])
    {
        return Err(DescError::new(
            "the document is UTF-16; only UTF-8 descriptors are read",
        ));
    }
    let bytes = bytes.strip_prefix(&[0xef, 0xbb, 0xbf]).unwrap_or(bytes);
    std::str::from_utf8(bytes).map_err(|e| {
        let at = e.valid_up_to();
        DescError::at_line(line_of(bytes, at), format!("invalid UTF-8 at byte {at}"))
    })
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &[u8], offset: usize) -> usize {
    let end = offset.min(text.len());
    text[..end].iter().filter(|&&b| b == b'\n').count() + 1
}

/// Line numbers of increasing offsets, counted incrementally (each byte
/// once per document).
struct Lines<'t> {
    text: &'t [u8],
    offset: usize,
    line: usize,
}

impl Lines<'_> {
    fn at(&mut self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        if end < self.offset {
            return line_of(self.text, end);
        }
        self.line += self.text[self.offset..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        self.offset = end;
        self.line
    }
}

/// The document being built: open elements, and what lies outside them.
#[derive(Default)]
struct Tree {
    declaration: bool,
    prolog: Vec<Node>,
    stack: Vec<Element>,
    root: Option<Element>,
    epilog: Vec<Node>,
    elements: usize,
}

/// An element's namespace as resolved, or the undeclared prefix.
type Resolved = std::result::Result<Option<String>, String>;

impl Tree {
    /// Adds the event read at `line` to the tree.
    fn event(
        &mut self,
        reader: &NsReader<&[u8]>,
        event: Event<'_>,
        namespace: Resolved,
        line: usize,
    ) -> Result<()> {
        let node = match event {
            Event::DocType(_) => {
                return Err(DescError::at_line(
                    line,
                    "a DOCTYPE is refused: no descriptor needs one, and the entities it declares can read files or expand without bound",
                ))
            }
            Event::Decl(d) => return self.declaration(&d, line),
            Event::Start(s) => {
                self.count(line)?;
                let e = element(reader, &s, namespace, line)?;
                self.stack.push(e);
                return Ok(());
            }
            Event::Empty(s) => {
                self.count(line)?;
                Node::Element(element(reader, &s, namespace, line)?)
            }
            Event::End(_) => match self.stack.pop() {
                Some(e) => Node::Element(e),
                None => return Err(DescError::at_line(line, "an end tag without a start tag")),
            },
            Event::Text(t) => Node::Text(t.xml10_content().map_err(|e| at(line, e))?.into_owned()),
            Event::GeneralRef(r) => Node::Text(reference(&r, line)?),
            Event::CData(c) => Node::CData(c.decode().map_err(|e| at(line, e))?.into_owned()),
            Event::Comment(c) => Node::Comment(c.decode().map_err(|e| at(line, e))?.into_owned()),
            Event::PI(p) => Node::Pi(utf8(&p, line)?),
            Event::Eof => return Ok(()),
        };
        self.attach(node, line)
    }

    /// Checks the encoding an XML declaration names.
    fn declaration(&mut self, d: &BytesDecl<'_>, line: usize) -> Result<()> {
        self.declaration = true;
        let Some(enc) = d.encoding() else {
            return Ok(());
        };
        let enc = enc.map_err(|e| at(line, e))?;
        let enc = String::from_utf8_lossy(&enc).to_ascii_lowercase();
        if matches!(enc.as_str(), "utf-8" | "utf8" | "us-ascii" | "ascii") {
            return Ok(());
        }
        Err(DescError::at_line(
            line,
            format!("encoding '{enc}' is not supported; descriptors are read as UTF-8"),
        ))
    }

    /// Counts one more element at the current depth, refusing it past
    /// the limits.
    fn count(&mut self, line: usize) -> Result<()> {
        self.elements += 1;
        if self.stack.len() >= MAX_DEPTH {
            return Err(DescError::at_line(
                line,
                format!("elements nest deeper than {MAX_DEPTH}"),
            ));
        }
        if self.elements > MAX_ELEMENTS {
            return Err(DescError::at_line(
                line,
                format!("more than {MAX_ELEMENTS} elements"),
            ));
        }
        Ok(())
    }

    /// Appends a finished node to the open element, merging adjacent text;
    /// outside the root, keeps comments and processing instructions and
    /// refuses anything but white space.
    fn attach(&mut self, node: Node, line: usize) -> Result<()> {
        if let Some(parent) = self.stack.last_mut() {
            match (node, parent.children.last_mut()) {
                (Node::Text(t), Some(Node::Text(prev))) => prev.push_str(&t),
                (node, _) => parent.children.push(node),
            }
            return Ok(());
        }
        match node {
            Node::Element(e) if self.root.is_none() => self.root = Some(e),
            Node::Element(e) => {
                return Err(DescError::at_line(
                    line,
                    format!("a second root element <{}>", e.name),
                ))
            }
            Node::Text(t) if t.trim().is_empty() => {}
            Node::Text(_) | Node::CData(_) => {
                return Err(DescError::at_line(line, "text outside the root element"))
            }
            other if self.root.is_none() => self.prolog.push(other),
            other => self.epilog.push(other),
        }
        Ok(())
    }

    /// The document, once the input is read to its end (at `last_line`).
    fn finish(self, last_line: usize) -> Result<Document> {
        if let Some(open) = self.stack.last() {
            return Err(DescError::at_line(
                last_line,
                format!(
                    "the document ends inside <{}> (opened on line {})",
                    open.name, open.line
                ),
            ));
        }
        let root = self
            .root
            .ok_or_else(|| DescError::new("no root element: not an XML document"))?;
        Ok(Document {
            declaration: self.declaration,
            prolog: self.prolog,
            root,
            epilog: self.epilog,
        })
    }
}

/// The text a reference stands for: a character reference, or one of the
/// five predefined entities; any other entity is refused.
fn reference(r: &BytesRef<'_>, line: usize) -> Result<String> {
    let name = r.decode().map_err(|e| at(line, e))?;
    if !r.is_char_ref() {
        return resolve_xml_entity(&name)
            .map(str::to_string)
            .ok_or_else(|| entity_refused(line, &name));
    }
    match r.resolve_char_ref() {
        Ok(Some(c)) => Ok(c.to_string()),
        _ => Err(DescError::at_line(
            line,
            format!("'&{name};' is not a valid character reference"),
        )),
    }
}

fn at(line: usize, e: impl std::fmt::Display) -> DescError {
    DescError::at_line(line, e.to_string())
}

/// The namespace a prefix resolved to; `Err(prefix)` for a prefix that no
/// `xmlns` declares.
fn namespace_of(r: ResolveResult<'_>) -> Resolved {
    match r {
        ResolveResult::Bound(ns) => Ok(Some(String::from_utf8_lossy(ns.into_inner()).into_owned())),
        ResolveResult::Unbound => Ok(None),
        ResolveResult::Unknown(p) => Err(String::from_utf8_lossy(&p).into_owned()),
    }
}

fn unbound_prefix(line: usize, prefix: &str) -> DescError {
    DescError::at_line(line, format!("namespace prefix '{prefix}' is not declared"))
}

fn entity_refused(line: usize, name: &str) -> DescError {
    DescError::at_line(
        line,
        format!("entity '&{name};' is refused: only the five predefined XML entities and character references are allowed"),
    )
}

fn utf8(b: &[u8], line: usize) -> Result<String> {
    std::str::from_utf8(b)
        .map(str::to_string)
        .map_err(|_| DescError::at_line(line, "a name that is not UTF-8"))
}

/// Builds an element from its start tag, resolving attribute namespaces.
fn element(
    reader: &NsReader<&[u8]>,
    s: &BytesStart<'_>,
    namespace: Resolved,
    line: usize,
) -> Result<Element> {
    let namespace = namespace.map_err(|p| unbound_prefix(line, &p))?;
    let name = utf8(s.name().as_ref(), line)?;
    let mut attributes = Vec::new();
    for a in s.attributes() {
        let a = a.map_err(|e| DescError::at_line(line, format!("<{name}>: {e}")))?;
        let key = utf8(a.key.as_ref(), line)?;
        let value = a
            .decode_and_unescape_value_with(reader.decoder(), resolve_xml_entity)
            .map_err(|e| match e {
                quick_xml::Error::Escape(EscapeError::UnrecognizedEntity(_, ent)) => {
                    entity_refused(line, &ent)
                }
                e => DescError::at_line(line, format!("<{name}> attribute '{key}': {e}")),
            })?;
        let namespace = if key == "xmlns" || key.starts_with("xmlns:") {
            Some(XMLNS_NAMESPACE.to_string())
        } else {
            let (r, _) = reader.resolve_attribute(a.key);
            namespace_of(r).map_err(|p| unbound_prefix(line, &p))?
        };
        attributes.push(Attribute {
            name: key,
            namespace,
            value: value.into_owned(),
        });
    }
    Ok(Element {
        name,
        namespace,
        attributes,
        children: Vec::new(),
        line,
    })
}

fn has_whitespace_text(e: &Element) -> bool {
    e.children.iter().any(|n| match n {
        Node::Text(t) => t.trim().is_empty() && !t.is_empty(),
        Node::Element(c) => has_whitespace_text(c),
        _ => false,
    })
}

fn write_node(w: &mut Writer<Vec<u8>>, n: &Node, depth: usize, pretty: bool) {
    let _ = match n {
        Node::Element(e) => {
            write_element(w, e, depth, pretty);
            Ok(())
        }
        Node::Text(t) => w.write_event(Event::Text(BytesText::new(t))),
        Node::Comment(c) => w.write_event(Event::Comment(BytesText::from_escaped(c.as_str()))),
        Node::CData(c) => w.write_event(Event::CData(BytesCData::new(c.as_str()))),
        Node::Pi(p) => w.write_event(Event::PI(BytesPI::new(p.as_str()))),
    };
}

/// Writes an element; when `pretty`, each child of an element that holds
/// more than text goes on its own line, indented by `depth + 1` steps.
fn write_element(w: &mut Writer<Vec<u8>>, e: &Element, depth: usize, pretty: bool) {
    let indent = |w: &mut Writer<Vec<u8>>, d: usize| {
        let _ = w.write_event(Event::Text(BytesText::from_escaped(format!(
            "\n{}",
            "  ".repeat(d)
        ))));
    };
    let mut start = BytesStart::new(e.name.as_str());
    for a in &e.attributes {
        start.push_attribute((a.name.as_str(), a.value.as_str()));
    }
    if e.children.is_empty() {
        let _ = w.write_event(Event::Empty(start));
        return;
    }
    let _ = w.write_event(Event::Start(start));
    let pretty = pretty
        && !e
            .children
            .iter()
            .all(|c| matches!(c, Node::Text(_) | Node::CData(_)));
    for c in &e.children {
        if pretty {
            indent(w, depth + 1);
        }
        write_node(w, c, depth + 1, pretty);
    }
    if pretty {
        indent(w, depth);
    }
    let _ = w.write_event(Event::End(BytesEnd::new(e.name.as_str())));
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS_A: &str = "urn:a";

    #[test]
    fn parse_keeps_comments_attributes_and_text() {
        let src = "<?xml version='1.0'?>\n<!-- a -->\n<domain type='kvm'>\n  <!-- keep -->\n  <name>a &amp; b&#33;</name>\n  <x:y xmlns:x='urn:x' z='1'/>\n</domain>\n";
        let d = Document::parse(src.as_bytes()).unwrap();
        assert_eq!(d.root.get("type"), Some("kvm"));
        assert_eq!(d.root.first("name").unwrap().text_content(), "a & b!");
        assert_eq!(d.root.first("y").unwrap().get("z"), Some("1"));
        let again = Document::parse(d.render().as_bytes()).unwrap();
        assert_eq!(again.root_without_lines(), d.root_without_lines());
    }

    #[test]
    fn render_of_a_parsed_document_keeps_everything_in_place() {
        let src = concat!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n",
            "<!-- before -->\n",
            "<?stylesheet href=\"a\"?>\n",
            "<a:r xmlns:a=\"urn:a\" z=\"2\" a:y=\"1\" b=\"&lt;&amp;&quot;\">\n",
            "\t<e/>  <f>t</f>\n",
            "  <![CDATA[<raw>]]><!-- in -->\n",
            "</a:r>\n",
            "<!-- after -->\n",
        );
        let d = Document::parse(src.as_bytes()).unwrap();
        assert_eq!(d.render(), src);
    }

    #[test]
    fn built_tree_renders_indented() {
        let mut root = Element::new("domain").attr("type", "kvm");
        root.push(Element::new("name").text("a<b"));
        let root = root.child(
            Element::new("metadata").child(
                Element::new("p:os")
                    .attr("xmlns:p", "urn:p")
                    .attr("id", "x"),
            ),
        );
        let d = Document::new(root);
        assert_eq!(
            d.render(),
            "<domain type=\"kvm\">\n  <name>a&lt;b</name>\n  <metadata>\n    <p:os xmlns:p=\"urn:p\" id=\"x\"/>\n  </metadata>\n</domain>\n"
        );
        let os = d.root.at("metadata/os").unwrap();
        assert!(os.attributes[0].is_namespace_declaration());
        assert_eq!(os.get("p"), None, "a declaration is not an attribute");
    }

    #[test]
    fn namespaces_resolve_whatever_the_prefixes() {
        let src = br#"<r xmlns="urn:a" xmlns:q="urn:q" xml:lang="en">
  <q:x a="1" q:b="2"/><x/><y xmlns=""/>
</r>"#;
        let d = Document::parse(src).unwrap();
        let r = &d.root;
        assert!(r.is(NS_A, "r"));
        assert_eq!(
            r.get_ns("http://www.w3.org/XML/1998/namespace", "lang"),
            Some("en")
        );
        let qx = r.first_ns("urn:q", "x").unwrap();
        assert_eq!((qx.name.as_str(), qx.local()), ("q:x", "x"));
        assert_eq!(qx.get_ns("urn:q", "b"), Some("2"));
        assert_eq!(qx.get_ns("urn:q", "a"), None, "unprefixed: no namespace");
        assert_eq!(qx.get_ns_or_unprefixed("urn:q", "a"), Some("1"));
        assert_eq!(qx.get("b"), Some("2"));
        assert_eq!(r.all_ns(NS_A, "x").count(), 1);
        assert_eq!(r.all("x").count(), 2);
        assert_eq!(r.first("y").unwrap().namespace, None);
    }

    #[test]
    fn own_text_and_text_content_differ_on_descendants() {
        let d = Document::parse(b"<a> x <b>y</b><![CDATA[&z]]> </a>").unwrap();
        assert_eq!(d.root.own_text(), "x &z");
        assert_eq!(d.root.text_content(), "x y&z");
    }

    #[test]
    fn doctype_and_custom_entities_are_refused() {
        let bomb =
            b"<?xml version='1.0'?><!DOCTYPE d [<!ENTITY a 'aaaa'><!ENTITY b '&a;&a;'>]><d>&b;</d>";
        let e = Document::parse(bomb).unwrap_err().to_string();
        assert!(e.contains("DOCTYPE"), "{e}");
        let e = Document::parse(b"<d>&xxe;</d>").unwrap_err().to_string();
        assert!(e.contains("&xxe;"), "{e}");
        let e = Document::parse(b"<d a='&ext;'/>").unwrap_err().to_string();
        assert!(e.contains("&ext;"), "{e}");
    }

    #[test]
    fn malformed_input_is_an_error_with_a_line() {
        for bad in [
            &b"<a><b></a>"[..],
            b"<a>",
            b"",
            b"<a/><b/>",
            b"text",
            b"<a>\n<b>&</b></a>",
            b"<a>&#0;</a>",
            b"<a><!-- a -- b --></a>",
        ] {
            let e = Document::parse(bad).unwrap_err().to_string();
            assert!(!e.is_empty());
        }
        let e = Document::parse(b"<a>\n\n<b></c></a>")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3"), "{e}");
        let deep = "<a>".repeat(100) + &"</a>".repeat(100);
        assert!(Document::parse(deep.as_bytes()).is_err());
    }

    #[test]
    fn undeclared_prefix_is_refused_with_its_line() {
        let e = Document::parse(b"<a>\n<x:y/></a>").unwrap_err();
        assert!(e.message.contains("prefix 'x'"), "{e}");
        assert_eq!(e.line, Some(2));
        let e = Document::parse(b"<a p:z='1'/>").unwrap_err();
        assert!(e.message.contains("prefix 'p'"), "{e}");
    }

    #[test]
    fn depth_and_element_count_are_bounded() {
        let at_limit = "<a>".repeat(MAX_DEPTH) + &"</a>".repeat(MAX_DEPTH);
        assert!(Document::parse(at_limit.as_bytes()).is_ok());
        let deep = "<a>".repeat(MAX_DEPTH + 1) + &"</a>".repeat(MAX_DEPTH + 1);
        let e = Document::parse(deep.as_bytes()).unwrap_err();
        assert!(e.message.contains("nest deeper"), "{e}");
        let many = format!("<a>{}</a>", "<b/>".repeat(MAX_ELEMENTS));
        let e = Document::parse(many.as_bytes()).unwrap_err();
        assert!(e.message.contains("more than 100000 elements"), "{e}");
    }

    #[test]
    fn encodings_other_than_utf8_are_refused() {
        let e = Document::parse(b"<?xml version='1.0' encoding='ISO-8859-1'?><a/>").unwrap_err();
        assert!(e.message.contains("iso-8859-1"), "{e}");
        let e = Document::parse(b"\xff\xfe<\x00a\x00/\x00>\x00").unwrap_err();
        assert!(e.message.contains("UTF-16"), "{e}");
        let e = Document::parse(b"<a>\n\xc3</a>").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(
            Document::parse(b"\xef\xbb\xbf<a/>").is_ok(),
            "a BOM is skipped"
        );
    }

    impl Document {
        fn root_without_lines(&self) -> Element {
            fn strip(e: &Element) -> Element {
                Element {
                    line: 0,
                    children: e
                        .children
                        .iter()
                        .map(|n| match n {
                            Node::Element(c) => Node::Element(strip(c)),
                            o => o.clone(),
                        })
                        .collect(),
                    ..e.clone()
                }
            }
            strip(&self.root)
        }
    }
}
