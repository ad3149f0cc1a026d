//! The OVF descriptor as a namespace-resolved XML tree.
//!
//! OVF mixes five vocabularies (`ovf`, `rasd`, `vssd`, `vmw`, and in OVF
//! 2.0 `sasd`/`epasd`) whose prefixes are the writer's choice, so every
//! element and attribute keeps both its name as written and the namespace
//! URI its prefix is bound to; readers match on (namespace, local name).
//!
//! Safe by construction: a DOCTYPE is refused (so no entity can be
//! declared), any entity other than the five predefined ones and character
//! references is refused, and the input, the nesting depth and the number
//! of elements are bounded.

use quick_xml::escape::resolve_xml_entity;
use quick_xml::events::{BytesStart, Event};
use quick_xml::name::ResolveResult;
use quick_xml::NsReader;

use crate::{DescError, Result, MAX_DESCRIPTOR_BYTES};

/// The deepest nesting accepted (an OVF descriptor nests about 6 deep).
const MAX_DEPTH: usize = 64;
/// The most elements accepted (a large OVF has a few hundred).
const MAX_ELEMENTS: usize = 100_000;

/// The namespace `xmlns` declarations belong to.
pub const XMLNS_NAMESPACE: &str = "http://www.w3.org/2000/xmlns/";

/// A node of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// An element.
    Element(Element),
    /// Character data (references resolved, CDATA included as text).
    Text(String),
    /// A comment's text.
    Comment(String),
}

/// An attribute: its name as written, its namespace and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribute {
    /// The qualified name as written (`ovf:id`, `xmlns:rasd`).
    pub name: String,
    /// The namespace URI of its prefix; `None` for an unprefixed attribute.
    pub namespace: Option<String>,
    /// The name without its prefix.
    pub local: String,
    /// The value, references resolved.
    pub value: String,
}

/// An element: its names, attributes and children in document order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// The qualified name as written (`rasd:ResourceType`).
    pub name: String,
    /// The namespace URI it resolved to, if any.
    pub namespace: Option<String>,
    /// The name without its prefix.
    pub local: String,
    /// Attributes in order, namespace declarations included.
    pub attributes: Vec<Attribute>,
    /// Child nodes in order.
    pub children: Vec<Node>,
    /// 1-based line of the start tag.
    pub line: usize,
}

impl Element {
    /// Whether the element is `local` in namespace `ns`.
    pub fn is(&self, ns: &str, local: &str) -> bool {
        self.local == local && self.namespace.as_deref() == Some(ns)
    }

    /// Child elements.
    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            _ => None,
        })
    }

    /// Child elements named `local` in namespace `ns`.
    pub fn children_named<'a>(
        &'a self,
        ns: &'a str,
        local: &'a str,
    ) -> impl Iterator<Item = &'a Element> + 'a {
        self.elements().filter(move |e| e.is(ns, local))
    }

    /// The first child element named `local` in namespace `ns`.
    pub fn child(&self, ns: &str, local: &str) -> Option<&Element> {
        self.elements().find(|e| e.is(ns, local))
    }

    /// The value of attribute `local` in namespace `ns`.
    pub fn attr_ns(&self, ns: &str, local: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|a| a.local == local && a.namespace.as_deref() == Some(ns))
            .map(|a| a.value.as_str())
    }

    /// The value of attribute `local` in namespace `ns`, or of the
    /// unprefixed attribute `local` (some writers leave OVF attributes
    /// unqualified).
    pub fn attr(&self, ns: &str, local: &str) -> Option<&str> {
        self.attr_ns(ns, local).or_else(|| {
            self.attributes
                .iter()
                .find(|a| a.local == local && a.namespace.is_none())
                .map(|a| a.value.as_str())
        })
    }

    /// The element's own text (not its descendants'), trimmed.
    pub fn text(&self) -> String {
        let mut s = String::new();
        for n in &self.children {
            if let Node::Text(t) = n {
                s.push_str(t);
            }
        }
        s.trim().to_string()
    }
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
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
            return line_of_bytes(self.text, end);
        }
        self.line += self.text[self.offset..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        self.offset = end;
        self.line
    }
}

fn line_of_bytes(text: &[u8], end: usize) -> usize {
    text[..end].iter().filter(|&&b| b == b'\n').count() + 1
}

/// Decodes the bytes as UTF-8 (the only encoding OVF writers use),
/// skipping a byte-order mark and refusing UTF-16.
fn decode(bytes: &[u8]) -> Result<&str> {
    if bytes.starts_with(&[0xff, 0xfe])
        || bytes.starts_with(&[0xfe, 0xff])
        || bytes.starts_with(&[0, b'<'])
        || bytes.starts_with(&[b'<', 0])
    {
        return Err(DescError::new(
            "the descriptor is UTF-16; only UTF-8 descriptors are read",
        ));
    }
    let bytes = bytes.strip_prefix(&[0xef, 0xbb, 0xbf]).unwrap_or(bytes);
    std::str::from_utf8(bytes).map_err(|e| {
        let at = e.valid_up_to();
        let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        DescError::at_line(line, format!("invalid UTF-8 at byte {at}"))
    })
}

/// Parses a whole document and returns its root element. Comments and
/// processing instructions outside the root are not kept.
pub(crate) fn parse(bytes: &[u8]) -> Result<Element> {
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

    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    let mut count = 0usize;
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
                    line_of(text, at),
                    format!("not well-formed XML: {e}"),
                ));
            }
        };
        let line = lines.at(start);
        match event {
            Event::DocType(_) => {
                return Err(DescError::at_line(
                    line,
                    "a DOCTYPE is refused: OVF needs none, and the entities it declares can read files or expand without bound",
                ))
            }
            Event::Decl(d) => {
                if let Some(enc) = d.encoding() {
                    let enc = enc.map_err(|e| DescError::at_line(line, e.to_string()))?;
                    let enc = String::from_utf8_lossy(&enc).to_ascii_lowercase();
                    if !matches!(enc.as_str(), "utf-8" | "utf8" | "us-ascii" | "ascii") {
                        return Err(DescError::at_line(
                            line,
                            format!("encoding '{enc}' is not supported; OVF descriptors are UTF-8"),
                        ));
                    }
                }
            }
            Event::Start(s) => {
                count += 1;
                if count > MAX_ELEMENTS || stack.len() >= MAX_DEPTH {
                    return Err(too_big(line, stack.len()));
                }
                let ns = namespace.map_err(|p| unbound_prefix(line, &p))?;
                stack.push(element(&reader, &s, ns, line)?);
            }
            Event::Empty(s) => {
                count += 1;
                if count > MAX_ELEMENTS || stack.len() >= MAX_DEPTH {
                    return Err(too_big(line, stack.len()));
                }
                let ns = namespace.map_err(|p| unbound_prefix(line, &p))?;
                let e = element(&reader, &s, ns, line)?;
                attach(&mut stack, &mut root, e, line)?;
            }
            Event::End(_) => {
                let Some(e) = stack.pop() else {
                    return Err(DescError::at_line(line, "an end tag without a start tag"));
                };
                attach(&mut stack, &mut root, e, line)?;
            }
            Event::Text(t) => {
                let s = t
                    .xml10_content()
                    .map_err(|e| DescError::at_line(line, e.to_string()))?;
                push_text(&mut stack, &s, line)?;
            }
            Event::CData(t) => {
                let s = t
                    .decode()
                    .map_err(|e| DescError::at_line(line, e.to_string()))?;
                push_text(&mut stack, &s, line)?;
            }
            Event::GeneralRef(r) => {
                let name = r
                    .decode()
                    .map_err(|e| DescError::at_line(line, e.to_string()))?;
                let c = if r.is_char_ref() {
                    match r.resolve_char_ref() {
                        Ok(Some(c)) => c.to_string(),
                        _ => {
                            return Err(DescError::at_line(
                                line,
                                format!("'&{name};' is not a valid character reference"),
                            ))
                        }
                    }
                } else {
                    match resolve_xml_entity(&name) {
                        Some(c) => c.to_string(),
                        None => return Err(entity_refused(line, &name)),
                    }
                };
                push_text(&mut stack, &c, line)?;
            }
            Event::Comment(c) => {
                if let Some(top) = stack.last_mut() {
                    let s = c
                        .decode()
                        .map_err(|e| DescError::at_line(line, e.to_string()))?;
                    top.children.push(Node::Comment(s.into_owned()));
                }
            }
            Event::PI(_) => {}
            Event::Eof => break,
        }
    }
    if let Some(open) = stack.last() {
        return Err(DescError::at_line(
            line_of(text, text.len()),
            format!(
                "the document ends inside <{}> (opened on line {})",
                open.name, open.line
            ),
        ));
    }
    root.ok_or_else(|| DescError::new("the document has no root element"))
}

/// The namespace an element's prefix resolved to; `Err(prefix)` for a
/// prefix that no `xmlns` declares.
fn namespace_of(r: ResolveResult<'_>) -> std::result::Result<Option<String>, String> {
    match r {
        ResolveResult::Bound(ns) => Ok(Some(String::from_utf8_lossy(ns.into_inner()).into_owned())),
        ResolveResult::Unbound => Ok(None),
        ResolveResult::Unknown(p) => Err(String::from_utf8_lossy(&p).into_owned()),
    }
}

fn unbound_prefix(line: usize, prefix: &str) -> DescError {
    DescError::at_line(line, format!("namespace prefix '{prefix}' is not declared"))
}

fn too_big(line: usize, depth: usize) -> DescError {
    DescError::at_line(
        line,
        if depth >= MAX_DEPTH {
            format!("elements nest deeper than {MAX_DEPTH}; not an OVF descriptor")
        } else {
            format!("more than {MAX_ELEMENTS} elements; not an OVF descriptor")
        },
    )
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
    namespace: Option<String>,
    line: usize,
) -> Result<Element> {
    let name = utf8(s.name().as_ref(), line)?;
    let local = utf8(s.local_name().as_ref(), line)?;
    let mut attributes = Vec::new();
    for a in s.attributes() {
        let a = a.map_err(|e| DescError::at_line(line, format!("<{name}>: {e}")))?;
        let key = utf8(a.key.as_ref(), line)?;
        let value =
            a.decode_and_unescape_value_with(reader.decoder(), resolve_xml_entity)
                .map_err(|e| match e {
                    quick_xml::Error::Escape(
                        quick_xml::escape::EscapeError::UnrecognizedEntity(_, ent),
                    ) => entity_refused(line, &ent),
                    e => DescError::at_line(line, format!("<{name}> attribute '{key}': {e}")),
                })?;
        let (namespace, local) = if key == "xmlns" {
            (Some(XMLNS_NAMESPACE.to_string()), String::new())
        } else if let Some(p) = key.strip_prefix("xmlns:") {
            (Some(XMLNS_NAMESPACE.to_string()), p.to_string())
        } else {
            let (r, l) = reader.resolve_attribute(a.key);
            let ns = namespace_of(r).map_err(|p| unbound_prefix(line, &p))?;
            (ns, utf8(l.as_ref(), line)?)
        };
        attributes.push(Attribute {
            name: key,
            namespace,
            local,
            value: value.into_owned(),
        });
    }
    Ok(Element {
        name,
        namespace,
        local,
        attributes,
        children: Vec::new(),
        line,
    })
}

/// Appends a finished element to its parent, or makes it the root.
fn attach(
    stack: &mut [Element],
    root: &mut Option<Element>,
    e: Element,
    line: usize,
) -> Result<()> {
    match stack.last_mut() {
        Some(parent) => parent.children.push(Node::Element(e)),
        None if root.is_none() => *root = Some(e),
        None => {
            return Err(DescError::at_line(
                line,
                format!("a second root element <{}>", e.name),
            ))
        }
    }
    Ok(())
}

/// Appends character data to the open element, merging adjacent pieces;
/// outside the root only white space may appear.
fn push_text(stack: &mut [Element], s: &str, line: usize) -> Result<()> {
    let Some(top) = stack.last_mut() else {
        if s.trim().is_empty() {
            return Ok(());
        }
        return Err(DescError::at_line(line, "text outside the root element"));
    };
    if let Some(Node::Text(t)) = top.children.last_mut() {
        t.push_str(s);
    } else {
        top.children.push(Node::Text(s.to_string()));
    }
    Ok(())
}
