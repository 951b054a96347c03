//! nft's JSON listings (`nft -j list ...`, libnftables-json(5)), read into types: the one
//! reader of what our tables hold in the kernel, for the balancer and the routing mesh alike.
//!
//! A listing is an array of one-key objects (`{"chain": {...}}`). The objects' envelopes
//! (tables, chains, sets and maps, rules) are typed here; what differs from one table to the
//! next (rule expressions, set elements) stays JSON, with helpers for the shapes nft uses
//! ([`concat`], [`pair`], [`verdict`]), so each reader matches the expressions it wrote.
//! Objects of other kinds (`metainfo`, counters, ...) are kept by kind, so a reader can
//! refuse what it does not expect.

use std::net::Ipv4Addr;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

/// A listing that is not what nft writes.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    /// Not JSON at all.
    #[error("not JSON: {0}")]
    Syntax(#[source] serde_json::Error),
    /// JSON without the top-level `nftables` array.
    #[error("no \"nftables\" array")]
    NoArray,
    /// An object is not `{"KIND": {...}}`, or a known kind lacks a field.
    #[error("bad {kind} object: {source}")]
    Object {
        /// The object's kind (`chain`, `rule`, ...).
        kind: String,
        /// What is wrong with it.
        #[source]
        source: serde_json::Error,
    },
}

/// One listing, its objects by kind, each in the order nft listed them (a chain's rules head
/// first).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Listing {
    /// `table` objects.
    pub tables: Vec<Table>,
    /// `chain` objects.
    pub chains: Vec<Chain>,
    /// `set` and `map` objects (a map has [`Set::map`]).
    pub sets: Vec<Set>,
    /// `rule` objects.
    pub rules: Vec<Rule>,
    /// Objects of any other kind, as listed: (kind, body). `metainfo` is not kept.
    pub other: Vec<(String, Value)>,
}

/// A table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Table {
    /// `ip`, `inet`, ...
    #[serde(default)]
    pub family: String,
    /// Its name.
    pub name: String,
}

/// A chain: a base chain has a type, hook, priority and policy; a regular chain has none.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Chain {
    /// `ip`, `inet`, ...
    #[serde(default)]
    pub family: String,
    /// Its table.
    #[serde(default)]
    pub table: String,
    /// Its name.
    pub name: String,
    /// `filter`, `nat`, `route` (base chains).
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// `prerouting`, `output`, ... (base chains).
    #[serde(default)]
    pub hook: Option<String>,
    /// The priority (base chains).
    #[serde(default)]
    pub prio: Option<i64>,
    /// `accept` or `drop` (base chains).
    #[serde(default)]
    pub policy: Option<String>,
}

impl Chain {
    /// A base chain: attached to a hook.
    pub fn is_base(&self) -> bool {
        self.hook.is_some()
    }
}

/// A set, or a map (`map` gives its value type).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Set {
    /// `ip`, `inet`, ...
    #[serde(default)]
    pub family: String,
    /// Its table.
    #[serde(default)]
    pub table: String,
    /// Its name.
    pub name: String,
    /// The key type: a name (`"ipv4_addr"`), or an array of names for a concatenation.
    #[serde(default, rename = "type")]
    pub key_type: Value,
    /// A map's value type (`"verdict"`, `"ipv4_addr"`, ...); `None` for a set.
    #[serde(default)]
    pub map: Option<Value>,
    /// `interval`, `timeout`, `dynamic`, ...
    #[serde(default)]
    pub flags: Option<Value>,
    /// A default element timeout.
    #[serde(default)]
    pub timeout: Option<Value>,
    /// The elements: a set's keys, a map's `[key, value]` pairs (see [`pair`]). nft leaves
    /// the field out when there are none.
    #[serde(default)]
    pub elem: Vec<Value>,
}

/// A rule.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Rule {
    /// `ip`, `inet`, ...
    #[serde(default)]
    pub family: String,
    /// Its table.
    #[serde(default)]
    pub table: String,
    /// Its chain.
    pub chain: String,
    /// Its handle (listings always give it).
    #[serde(default)]
    pub handle: Option<u64>,
    /// Its comment.
    #[serde(default)]
    pub comment: Option<String>,
    /// Its statements, in order.
    #[serde(default)]
    pub expr: Vec<Value>,
}

/// Reads the output of `nft -j list ...`.
pub fn parse(text: &str) -> Result<Listing, JsonError> {
    let mut doc: Value = serde_json::from_str(text).map_err(JsonError::Syntax)?;
    let Some(Value::Array(items)) = doc.get_mut("nftables").map(Value::take) else {
        return Err(JsonError::NoArray);
    };
    let mut listing = Listing::default();
    for item in items {
        let bad = |kind: &str, source| JsonError::Object {
            kind: kind.to_string(),
            source,
        };
        let Value::Object(one) = item else {
            return Err(bad("top-level", serde::de::Error::custom("not an object")));
        };
        let mut one = one.into_iter();
        let (Some((kind, body)), None) = (one.next(), one.next()) else {
            return Err(bad("top-level", serde::de::Error::custom("not one key")));
        };
        match kind.as_str() {
            "metainfo" => {}
            "table" => listing.tables.push(typed(&kind, body)?),
            "chain" => listing.chains.push(typed(&kind, body)?),
            "set" | "map" => {
                let set: Set = typed(&kind, body)?;
                if (kind == "map") != set.map.is_some() {
                    let e = serde::de::Error::custom("`map` given for a set or missing for a map");
                    return Err(bad(&kind, e));
                }
                listing.sets.push(set);
            }
            "rule" => listing.rules.push(typed(&kind, body)?),
            _ => listing.other.push((kind, body)),
        }
    }
    Ok(listing)
}

fn typed<T: DeserializeOwned>(kind: &str, body: Value) -> Result<T, JsonError> {
    serde_json::from_value(body).map_err(|source| JsonError::Object {
        kind: kind.to_string(),
        source,
    })
}

impl Listing {
    /// The set or map named `name`.
    pub fn set(&self, name: &str) -> Option<&Set> {
        self.sets.iter().find(|s| s.name == name)
    }

    /// The rules of chain `chain`, head first.
    pub fn rules_of<'a>(&'a self, chain: &'a str) -> impl Iterator<Item = &'a Rule> + 'a {
        self.rules.iter().filter(move |r| r.chain == chain)
    }
}

/// The parts of a concatenation (`{"concat": [a, b]}`).
pub fn concat(v: &Value) -> Option<&[Value]> {
    v.get("concat")?.as_array().map(Vec::as_slice)
}

/// A map element's key and value (`[key, value]`).
pub fn pair(v: &Value) -> Option<(&Value, &Value)> {
    match v.as_array()?.as_slice() {
        [k, v] => Some((k, v)),
        _ => None,
    }
}

/// An IPv4 address (`"10.0.0.5"`).
pub fn ipv4(v: &Value) -> Option<Ipv4Addr> {
    v.as_str()?.parse().ok()
}

/// A verdict (in a verdict map's value or a rule).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// `{"accept": null}`.
    Accept,
    /// `{"drop": null}`.
    Drop,
    /// `{"jump": {"target": CHAIN}}`.
    Jump(&'a str),
    /// `{"goto": {"target": CHAIN}}`.
    Goto(&'a str),
}

/// Reads a verdict; `None` for anything else.
pub fn verdict(v: &Value) -> Option<Verdict<'_>> {
    let obj = v.as_object()?;
    if obj.len() != 1 {
        return None;
    }
    let (kind, body) = obj.iter().next()?;
    let target = || body.get("target")?.as_str();
    match kind.as_str() {
        "accept" => Some(Verdict::Accept),
        "drop" => Some(Verdict::Drop),
        "jump" => Some(Verdict::Jump(target()?)),
        "goto" => Some(Verdict::Goto(target()?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    // Captured from `nft -j list table ip mesh_lb` (nft 1.0.6), trimmed.
    const LISTING: &str = r#"{"nftables": [
      {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
      {"table": {"family": "ip", "name": "mesh_lb", "handle": 3}},
      {"map": {"family": "ip", "name": "vips", "table": "mesh_lb", "type": "ipv4_addr", "handle": 1, "map": "verdict",
               "elem": [["10.255.0.1", {"goto": {"target": "lb_2"}}], ["10.255.0.2", {"accept": null}]]}},
      {"map": {"family": "ip", "name": "backends", "table": "mesh_lb", "type": ["ipv4_addr", "integer"], "handle": 2, "map": "ipv4_addr"}},
      {"set": {"family": "ip", "name": "published", "table": "mesh_lb", "type": ["inet_proto", "inet_service"], "handle": 4,
               "elem": [{"concat": ["tcp", 30080]}]}},
      {"chain": {"family": "ip", "table": "mesh_lb", "name": "output", "handle": 3, "type": "nat", "hook": "output", "prio": -100, "policy": "accept"}},
      {"chain": {"family": "ip", "table": "mesh_lb", "name": "lb_2", "handle": 5}},
      {"rule": {"family": "ip", "table": "mesh_lb", "chain": "output", "handle": 6, "expr": [{"masquerade": null}]}},
      {"rule": {"family": "ip", "table": "mesh_lb", "chain": "lb_2", "handle": 8, "comment": "two", "expr": []}},
      {"rule": {"family": "ip", "table": "mesh_lb", "chain": "lb_2", "handle": 7, "expr": []}},
      {"counter": {"family": "ip", "name": "c", "table": "mesh_lb", "packets": 0, "bytes": 0}}
    ]}"#;

    #[test]
    fn reads_every_kind_in_order() {
        let l = parse(LISTING).unwrap();
        assert_eq!(
            l.tables,
            vec![Table {
                family: "ip".into(),
                name: "mesh_lb".into()
            }]
        );
        let output = &l.chains[0];
        assert!(output.is_base());
        assert_eq!(
            (
                output.kind.as_deref(),
                output.prio,
                output.policy.as_deref()
            ),
            (Some("nat"), Some(-100), Some("accept"))
        );
        assert!(!l.chains[1].is_base());

        let vips = l.set("vips").unwrap();
        assert_eq!(vips.key_type, json!("ipv4_addr"));
        assert_eq!(vips.map, Some(json!("verdict")));
        let verdicts: Vec<_> = vips
            .elem
            .iter()
            .map(|e| {
                let (k, v) = pair(e).unwrap();
                (ipv4(k).unwrap(), verdict(v).unwrap())
            })
            .collect();
        assert_eq!(
            verdicts,
            vec![
                ("10.255.0.1".parse().unwrap(), Verdict::Goto("lb_2")),
                ("10.255.0.2".parse().unwrap(), Verdict::Accept)
            ]
        );
        // No "elem": no elements.
        assert!(l.set("backends").unwrap().elem.is_empty());
        let published = l.set("published").unwrap();
        assert_eq!(published.map, None);
        assert_eq!(
            concat(&published.elem[0]).unwrap(),
            &[json!("tcp"), json!(30080)]
        );

        let handles: Vec<_> = l.rules_of("lb_2").map(|r| r.handle).collect();
        assert_eq!(handles, vec![Some(8), Some(7)]);
        assert_eq!(l.rules[1].comment.as_deref(), Some("two"));
        assert_eq!(l.rules[0].expr, vec![json!({"masquerade": null})]);
        assert_eq!(l.other.len(), 1);
        assert_eq!(l.other[0].0, "counter");
    }

    #[test]
    fn refuses_what_nft_does_not_write() {
        assert!(matches!(parse("nope"), Err(JsonError::Syntax(_))));
        assert!(matches!(parse("{}"), Err(JsonError::NoArray)));
        assert!(matches!(
            parse(r#"{"nftables": {}}"#),
            Err(JsonError::NoArray)
        ));
        for bad in [
            r#"{"nftables": [1]}"#,
            r#"{"nftables": [{"chain": {"name": "a"}, "rule": {"chain": "a"}}]}"#,
            r#"{"nftables": [{"chain": {"table": "t"}}]}"#,
            r#"{"nftables": [{"rule": {"chain": "a", "handle": "x"}}]}"#,
            r#"{"nftables": [{"map": {"name": "m"}}]}"#,
            r#"{"nftables": [{"set": {"name": "s", "map": "verdict"}}]}"#,
        ] {
            let e = parse(bad).unwrap_err();
            assert!(matches!(e, JsonError::Object { .. }), "{bad}: {e}");
        }
        assert_eq!(parse(r#"{"nftables": []}"#).unwrap(), Listing::default());
    }

    #[test]
    fn verdicts_and_elements() {
        assert_eq!(verdict(&json!({"drop": null})), Some(Verdict::Drop));
        assert_eq!(
            verdict(&json!({"jump": {"target": "x"}})),
            Some(Verdict::Jump("x"))
        );
        assert_eq!(verdict(&json!({"goto": {}})), None);
        assert_eq!(verdict(&json!({"accept": null, "drop": null})), None);
        assert_eq!(verdict(&json!("accept")), None);
        assert_eq!(pair(&json!([1])), None);
        assert_eq!(pair(&json!([1, 2, 3])), None);
        assert_eq!(concat(&json!(["tcp", 1])), None);
        assert_eq!(ipv4(&json!("10.0.0.300")), None);
    }
}
