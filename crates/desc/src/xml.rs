//! A small lossless XML tree over quick-xml: elements with attributes in
//! order, text, comments, CDATA and processing instructions, enough to
//! read a descriptor, change it and write it back without losing what
//! vmshift does not model.
//!
//! Safe by construction: a DOCTYPE is refused (no internal subset, so no
//! entity can be declared), and any entity beyond the five predefined ones
//! and character references is an error — there is nothing to expand.

use quick_xml::events::{BytesCData, BytesDecl, BytesEnd, BytesPI, BytesStart, BytesText, Event};
use quick_xml::{Reader, Writer};

use crate::{DescError, Result};

/// The deepest nesting accepted (libvirt and OVF documents use about 6).
const MAX_DEPTH: usize = 64;

/// A node of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// An element.
    Element(Element),
    /// Text (entities resolved).
    Text(String),
    /// A comment's text.
    Comment(String),
    /// A CDATA section's text.
    CData(String),
    /// A processing instruction (its content).
    Pi(String),
}

/// An element: its name as written (with any prefix), attributes in order,
/// children in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Element {
    /// The qualified name (`rasd:ResourceType`).
    pub name: String,
    /// Attributes, values unescaped.
    pub attrs: Vec<(String, String)>,
    /// Child nodes.
    pub children: Vec<Node>,
    /// 1-based line of the start tag (0 for built elements).
    pub line: usize,
}

impl Element {
    /// A new element without attributes or children.
    pub fn new(name: &str) -> Element {
        Element {
            name: name.to_string(),
            ..Element::default()
        }
    }

    /// The name without its namespace prefix.
    pub fn local(&self) -> &str {
        local(&self.name)
    }

    /// Adds an attribute (builder style).
    pub fn attr(mut self, k: &str, v: impl Into<String>) -> Element {
        self.attrs.push((k.to_string(), v.into()));
        self
    }

    /// Adds a child element (builder style).
    pub fn child(mut self, e: Element) -> Element {
        self.children.push(Node::Element(e));
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

    /// The value of attribute `k`: matched on the qualified name first,
    /// then on the local name.
    pub fn get(&self, k: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _)| n == k)
            .or_else(|| self.attrs.iter().find(|(n, _)| local(n) == k))
            .map(|(_, v)| v.as_str())
    }

    /// Child elements.
    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            _ => None,
        })
    }

    /// Child elements whose local name is `name`.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.elements().filter(move |e| e.local() == name)
    }

    /// The first child element whose local name is `name`.
    pub fn first(&self, name: &str) -> Option<&Element> {
        self.elements().find(|e| e.local() == name)
    }

    /// The element at a `/`-separated path of local names below this one.
    pub fn at(&self, path: &str) -> Option<&Element> {
        path.split('/').try_fold(self, |e, step| e.first(step))
    }

    /// The concatenated text content (trimmed).
    pub fn text_content(&self) -> String {
        let mut s = String::new();
        for n in &self.children {
            match n {
                Node::Text(t) | Node::CData(t) => s.push_str(t),
                Node::Element(e) => s.push_str(&e.text_content()),
                _ => {}
            }
        }
        s.trim().to_string()
    }
}

fn local(name: &str) -> &str {
    name.rsplit(':').next().unwrap_or(name)
}

/// A whole document: what precedes the root (declaration, comments) and
/// the root element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// Nodes before the root element (comments, PIs), kept for writing.
    pub prolog: Vec<Node>,
    /// Whether the input started with an XML declaration.
    pub declaration: bool,
    /// The root element.
    pub root: Element,
}

fn line_of(text: &[u8], pos: usize) -> usize {
    text[..pos.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn xml_err(text: &[u8], pos: usize, e: impl std::fmt::Display) -> DescError {
    DescError::at_line(line_of(text, pos), format!("not well-formed XML: {e}"))
}

impl Document {
    /// Parses `text` (UTF-8). Refuses DOCTYPEs and unknown entities.
    pub fn parse(text: &[u8]) -> Result<Document> {
        let mut reader = Reader::from_reader(text);
        reader.config_mut().check_end_names = true;
        let mut stack: Vec<Element> = Vec::new();
        let mut prolog = Vec::new();
        let mut declaration = false;
        let mut root = None;
        let mut buf = Vec::new();
        loop {
            let pos = reader.buffer_position() as usize;
            let ev = reader
                .read_event_into(&mut buf)
                .map_err(|e| xml_err(text, pos, e))?;
            let utf8 = |b: &[u8]| {
                std::str::from_utf8(b)
                    .map(str::to_string)
                    .map_err(|_| DescError::at_line(line_of(text, pos), "invalid UTF-8"))
            };
            let node = match ev {
                Event::Eof => break,
                Event::DocType(_) => {
                    return Err(DescError::at_line(
                        line_of(text, pos),
                        "a DOCTYPE is not accepted (it could declare entities); remove it",
                    ))
                }
                Event::Decl(_) => {
                    declaration = true;
                    continue;
                }
                Event::Start(s) => {
                    if stack.len() >= MAX_DEPTH {
                        return Err(DescError::at_line(
                            line_of(text, pos),
                            format!("elements nested deeper than {MAX_DEPTH}"),
                        ));
                    }
                    stack.push(start(&s, text, pos)?);
                    continue;
                }
                Event::Empty(s) => Node::Element(start(&s, text, pos)?),
                Event::End(_) => {
                    let done = stack
                        .pop()
                        .ok_or_else(|| xml_err(text, pos, "unexpected end tag"))?;
                    Node::Element(done)
                }
                Event::Text(t) => {
                    let s = t.decode().map_err(|e| xml_err(text, pos, e))?;
                    Node::Text(unescape(&s, text, pos)?)
                }
                Event::GeneralRef(r) => {
                    let name = utf8(&r)?;
                    Node::Text(unescape(&format!("&{name};"), text, pos)?)
                }
                Event::CData(c) => Node::CData(utf8(&c)?),
                Event::Comment(c) => Node::Comment(utf8(&c)?),
                Event::PI(p) => Node::Pi(utf8(&p)?),
            };
            match stack.last_mut() {
                Some(parent) => {
                    // Adjacent text pieces (split around references) merge.
                    if let (Node::Text(t), Some(Node::Text(prev))) =
                        (&node, parent.children.last_mut())
                    {
                        prev.push_str(t);
                    } else {
                        parent.children.push(node);
                    }
                }
                None => match node {
                    Node::Element(e) => {
                        if root.is_some() {
                            return Err(xml_err(text, pos, "more than one root element"));
                        }
                        root = Some(e);
                    }
                    Node::Text(t) if t.trim().is_empty() => {}
                    Node::Text(_) | Node::CData(_) => {
                        return Err(xml_err(text, pos, "text outside the root element"))
                    }
                    other => {
                        if root.is_none() {
                            prolog.push(other);
                        }
                    }
                },
            }
            buf.clear();
        }
        if !stack.is_empty() {
            return Err(xml_err(
                text,
                text.len(),
                "the document ends inside an element",
            ));
        }
        let root = root.ok_or_else(|| DescError::new("no root element: not an XML document"))?;
        Ok(Document {
            prolog,
            declaration,
            root,
        })
    }

    /// Writes the document (two-space indentation for built trees; parsed
    /// whitespace is kept as it was).
    pub fn render(&self) -> String {
        let mut w = Writer::new(Vec::new());
        if self.declaration {
            let _ = w.write_event(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)));
            let _ = w.write_event(Event::Text(BytesText::from_escaped("\n")));
        }
        for n in &self.prolog {
            write_node(&mut w, n, 0, false);
            let _ = w.write_event(Event::Text(BytesText::from_escaped("\n")));
        }
        let pretty = !has_whitespace_text(&self.root);
        write_node(&mut w, &Node::Element(self.root.clone()), 0, pretty);
        let mut s = String::from_utf8(w.into_inner()).unwrap_or_default();
        s.push('\n');
        s
    }
}

fn has_whitespace_text(e: &Element) -> bool {
    e.children.iter().any(|n| match n {
        Node::Text(t) => t.trim().is_empty() && !t.is_empty(),
        Node::Element(c) => has_whitespace_text(c),
        _ => false,
    })
}

fn start(s: &BytesStart<'_>, text: &[u8], pos: usize) -> Result<Element> {
    let name = std::str::from_utf8(s.name().as_ref())
        .map_err(|_| DescError::at_line(line_of(text, pos), "invalid UTF-8 in a tag name"))?
        .to_string();
    let mut e = Element {
        name,
        line: line_of(text, pos),
        ..Element::default()
    };
    for a in s.attributes() {
        let a = a.map_err(|err| xml_err(text, pos, err))?;
        let k = std::str::from_utf8(a.key.as_ref())
            .map_err(|_| DescError::at_line(e.line, "invalid UTF-8 in an attribute name"))?
            .to_string();
        let raw = std::str::from_utf8(&a.value)
            .map_err(|_| DescError::at_line(e.line, "invalid UTF-8 in an attribute value"))?;
        let v = unescape(raw, text, pos)?;
        e.attrs.push((k, v));
    }
    Ok(e)
}

/// Resolves the five predefined entities and character references;
/// anything else is an error.
fn unescape(s: &str, text: &[u8], pos: usize) -> Result<String> {
    if !s.contains('&') {
        return Ok(s.to_string());
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let end = after
            .find(';')
            .filter(|&e| e <= 12)
            .ok_or_else(|| xml_err(text, pos, "an '&' that starts no entity"))?;
        let name = &after[..end];
        let c = match name {
            "lt" => '<',
            "gt" => '>',
            "amp" => '&',
            "apos" => '\'',
            "quot" => '"',
            n if n.starts_with("#x") => u32::from_str_radix(&n[2..], 16)
                .ok()
                .and_then(char::from_u32)
                .ok_or_else(|| xml_err(text, pos, format!("bad character reference &{n};")))?,
            n if n.starts_with('#') => n[1..]
                .parse::<u32>()
                .ok()
                .and_then(char::from_u32)
                .ok_or_else(|| xml_err(text, pos, format!("bad character reference &{n};")))?,
            n => {
                return Err(DescError::at_line(
                    line_of(text, pos),
                    format!("entity &{n}; is not one of XML's five predefined entities; external and custom entities are not accepted"),
                ))
            }
        };
        out.push(c);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn write_node(w: &mut Writer<Vec<u8>>, n: &Node, depth: usize, pretty: bool) {
    let indent = |w: &mut Writer<Vec<u8>>, d: usize| {
        if pretty {
            let _ = w.write_event(Event::Text(BytesText::from_escaped(format!(
                "\n{}",
                "  ".repeat(d)
            ))));
        }
    };
    match n {
        Node::Element(e) => {
            let mut s = BytesStart::new(e.name.as_str());
            for (k, v) in &e.attrs {
                s.push_attribute((k.as_str(), v.as_str()));
            }
            if e.children.is_empty() {
                let _ = w.write_event(Event::Empty(s));
                return;
            }
            let _ = w.write_event(Event::Start(s));
            let only_text = e
                .children
                .iter()
                .all(|c| matches!(c, Node::Text(_) | Node::CData(_)));
            for c in &e.children {
                if !only_text {
                    indent(w, depth + 1);
                }
                write_node(w, c, depth + 1, pretty);
            }
            if !only_text {
                indent(w, depth);
            }
            let _ = w.write_event(Event::End(BytesEnd::new(e.name.as_str())));
        }
        Node::Text(t) => {
            let _ = w.write_event(Event::Text(BytesText::new(t)));
        }
        Node::Comment(c) => {
            let _ = w.write_event(Event::Comment(BytesText::from_escaped(c.as_str())));
        }
        Node::CData(c) => {
            let _ = w.write_event(Event::CData(BytesCData::new(c.as_str())));
        }
        Node::Pi(p) => {
            let _ = w.write_event(Event::PI(BytesPI::new(p.as_str())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_keeps_comments_attributes_and_text() {
        let src = "<?xml version='1.0'?>\n<!-- a -->\n<domain type='kvm'>\n  <!-- keep -->\n  <name>a &amp; b&#33;</name>\n  <x:y z='1'/>\n</domain>\n";
        let d = Document::parse(src.as_bytes()).unwrap();
        assert_eq!(d.root.get("type"), Some("kvm"));
        assert_eq!(d.root.first("name").unwrap().text_content(), "a & b!");
        assert_eq!(d.root.first("y").unwrap().get("z"), Some("1"));
        let again = Document::parse(d.render().as_bytes()).unwrap();
        assert_eq!(again.root_without_lines(), d.root_without_lines());
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
