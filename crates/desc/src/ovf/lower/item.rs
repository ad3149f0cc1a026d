//! Reading one hardware item: its CIM fields (from `rasd`, `sasd` or
//! `epasd`, by local name), its `vmw:Config` settings, and the host
//! resources it names.

use crate::ovf::{Element, CIM_SCHEMA_PREFIX, NS_VMW};

/// Whether an item applies: `ovf:bound` absent or `normal`, and, with a
/// deployment option chosen, `ovf:configuration` absent or naming it.
pub(super) fn selected(item: &Element, ns: &str, config: Option<&str>) -> bool {
    if item
        .get_ns_or_unprefixed(ns, "bound")
        .is_some_and(|b| b != "normal")
    {
        return false;
    }
    match (item.get_ns_or_unprefixed(ns, "configuration"), config) {
        (Some(list), Some(c)) => list.split_whitespace().any(|x| x == c),
        _ => true,
    }
}

/// One hardware item's CIM fields (from `rasd`, `sasd` or `epasd`, by
/// local name) and its `vmw:Config` settings.
pub(super) struct Item<'a> {
    pub(super) el: &'a Element,
    pub(super) resource_type: Option<u32>,
    pub(super) instance_id: String,
    pub(super) subtype: Option<String>,
    pub(super) config: Vec<(String, String)>,
}

impl<'a> Item<'a> {
    pub(super) fn new(el: &'a Element) -> Item<'a> {
        let mut it = Item {
            el,
            resource_type: None,
            instance_id: String::new(),
            subtype: None,
            config: Vec::new(),
        };
        it.resource_type = it.field("ResourceType").and_then(|t| t.parse().ok());
        it.instance_id = it.field("InstanceID").unwrap_or_default();
        it.subtype = it.field("ResourceSubType");
        it.config = el
            .elements()
            .filter(|e| e.is(NS_VMW, "Config"))
            .filter_map(key_value)
            .collect();
        it
    }

    /// The trimmed text of the first CIM field `local`; `None` when absent
    /// or empty.
    pub(super) fn field(&self, local: &str) -> Option<String> {
        self.fields(local).into_iter().next()
    }

    /// The non-empty texts of every CIM field `local` (`Connection` and
    /// `HostResource` may repeat).
    pub(super) fn fields(&self, local: &str) -> Vec<String> {
        self.el
            .elements()
            .filter(|e| {
                e.local() == local
                    && e.namespace
                        .as_deref()
                        .is_some_and(|n| n.starts_with(CIM_SCHEMA_PREFIX))
            })
            .map(Element::own_text)
            .filter(|t| !t.is_empty())
            .collect()
    }

    pub(super) fn setting(&self, key: &str) -> Option<&str> {
        self.config
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    /// `ovf:Item[<InstanceID>]`, the path findings about the item use.
    pub(super) fn path(&self) -> String {
        format!("ovf:Item[{}]", self.instance_id)
    }

    /// The item's `ElementName`, or a description of its type.
    pub(super) fn label(&self) -> String {
        self.field("ElementName").unwrap_or_else(|| {
            format!(
                "item {} (ResourceType {})",
                self.instance_id,
                self.resource_type
                    .map_or_else(|| "missing".to_string(), |t| t.to_string())
            )
        })
    }
}

/// A `vmw:Config`/`vmw:ExtraConfig` element's key and value (`vmw:key`,
/// with `ovf:key` and unqualified spellings accepted).
pub(super) fn key_value(e: &Element) -> Option<(String, String)> {
    let get = |name: &str| e.get_ns(NS_VMW, name).or_else(|| e.get(name));
    Some((
        get("key")?.to_string(),
        get("value").unwrap_or_default().to_string(),
    ))
}

pub(super) fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" => Some(false),
        _ => None,
    }
}

/// What a `HostResource` points at.
pub(super) enum HostRef<'a> {
    Disk(&'a str),
    File(&'a str),
    Other,
}

pub(super) fn host_ref(s: &str) -> HostRef<'_> {
    for p in ["ovf:/disk/", "ovf:disk/", "/disk/"] {
        if let Some(id) = s.strip_prefix(p) {
            return HostRef::Disk(id);
        }
    }
    for p in ["ovf:/file/", "ovf:file/", "/file/"] {
        if let Some(id) = s.strip_prefix(p) {
            return HostRef::File(id);
        }
    }
    HostRef::Other
}
