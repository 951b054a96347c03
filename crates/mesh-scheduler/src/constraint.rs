//! Placement constraints, as `docker service create --constraint` takes them: `KEY==VALUE` or
//! `KEY!=VALUE`, where KEY is `node.id`, `node.hostname`, `node.role` or
//! `node.labels.<name>`.
//!
//! Matching follows swarmkit: values compare case-insensitively, the fixed part of the key is
//! case-insensitive while a label's name is looked up exactly, and a node without the label
//! fails `==` and passes `!=`.

use std::fmt;

use mesh_api::{Node, NodeRole};

/// What a constraint looks at.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ConstraintKey {
    /// `node.id`.
    Id,
    /// `node.hostname`.
    Hostname,
    /// `node.role` (`manager` or `worker`).
    Role,
    /// `node.labels.<name>`: the node label of this (non-empty) name.
    Label(String),
}

impl fmt::Display for ConstraintKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConstraintKey::Id => f.write_str("node.id"),
            ConstraintKey::Hostname => f.write_str("node.hostname"),
            ConstraintKey::Role => f.write_str("node.role"),
            ConstraintKey::Label(name) => write!(f, "node.labels.{name}"),
        }
    }
}

/// How a constraint compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operator {
    /// `==`.
    Eq,
    /// `!=`.
    Ne,
}

impl fmt::Display for Operator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operator::Eq => "==",
            Operator::Ne => "!=",
        })
    }
}

/// One parsed placement constraint. Its [`Display`](fmt::Display) form parses back to itself.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Constraint {
    key: ConstraintKey,
    op: Operator,
    /// As given (trimmed); `manager` or `worker` for [`ConstraintKey::Role`].
    value: String,
}

/// Why a constraint does not parse. Every message starts with `invalid constraint: "<text>"`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConstraintError {
    /// No `==` or `!=` (nor anything like an operator), or nothing before it.
    #[error("invalid constraint: {constraint:?}: expected KEY==VALUE or KEY!=VALUE")]
    Syntax { constraint: String },
    /// An operator other than `==` and `!=` (`=`, `>=`, `<>`, `===`, ...).
    #[error("invalid constraint: {constraint:?}: unknown operator {op} (expected == or !=)")]
    UnknownOperator { constraint: String, op: String },
    /// A key other than `node.id`, `node.hostname`, `node.role` and `node.labels.<name>`.
    #[error(
        "invalid constraint: {constraint:?}: unknown key {key} \
         (expected node.id, node.hostname, node.role or node.labels.<name>)"
    )]
    UnknownKey { constraint: String, key: String },
    /// Nothing after the operator.
    #[error("invalid constraint: {constraint:?}: empty value")]
    EmptyValue { constraint: String },
    /// `node.role` compared with something else than `manager` or `worker`.
    #[error(
        "invalid constraint: {constraint:?}: invalid role {value} (expected manager or worker)"
    )]
    InvalidRole { constraint: String, value: String },
}

/// The characters operators are made of; the first run of them in a constraint is its
/// operator.
fn is_operator_char(c: char) -> bool {
    matches!(c, '=' | '!' | '<' | '>')
}

/// Parses one constraint: `KEY OP VALUE`, spaces allowed around the operator (and the whole).
pub fn parse_constraint(s: &str) -> Result<Constraint, ConstraintError> {
    let constraint = || s.to_string();
    let Some(start) = s.find(is_operator_char) else {
        return Err(ConstraintError::Syntax {
            constraint: constraint(),
        });
    };
    let rest = &s[start..];
    let len = rest.find(|c| !is_operator_char(c)).unwrap_or(rest.len());
    let (op_text, value) = rest.split_at(len);
    let key_text = s[..start].trim();
    let value = value.trim();
    if key_text.is_empty() {
        return Err(ConstraintError::Syntax {
            constraint: constraint(),
        });
    }
    let op = match op_text {
        "==" => Operator::Eq,
        "!=" => Operator::Ne,
        other => {
            return Err(ConstraintError::UnknownOperator {
                constraint: constraint(),
                op: other.to_string(),
            })
        }
    };
    let key = parse_key(key_text).ok_or_else(|| ConstraintError::UnknownKey {
        constraint: constraint(),
        key: key_text.to_string(),
    })?;
    if value.is_empty() {
        return Err(ConstraintError::EmptyValue {
            constraint: constraint(),
        });
    }
    let value = if key == ConstraintKey::Role {
        match value.to_ascii_lowercase().as_str() {
            "manager" => NodeRole::Manager.to_string(),
            "worker" => NodeRole::Worker.to_string(),
            _ => {
                return Err(ConstraintError::InvalidRole {
                    constraint: constraint(),
                    value: value.to_string(),
                })
            }
        }
    } else {
        value.to_string()
    };
    Ok(Constraint { key, op, value })
}

/// The key of `node.id`, `node.hostname`, `node.role` (any case) or `node.labels.<name>` (the
/// prefix in any case, the name as given and non-empty).
fn parse_key(key: &str) -> Option<ConstraintKey> {
    const LABELS: &str = "node.labels.";
    if key.eq_ignore_ascii_case("node.id") {
        Some(ConstraintKey::Id)
    } else if key.eq_ignore_ascii_case("node.hostname") {
        Some(ConstraintKey::Hostname)
    } else if key.eq_ignore_ascii_case("node.role") {
        Some(ConstraintKey::Role)
    } else {
        match key.get(..LABELS.len()) {
            Some(prefix) if prefix.eq_ignore_ascii_case(LABELS) && key.len() > LABELS.len() => {
                Some(ConstraintKey::Label(key[LABELS.len()..].to_string()))
            }
            _ => None,
        }
    }
}

/// Parses all constraints of a service spec; the first invalid one is the error.
pub fn parse_constraints(specs: &[String]) -> Result<Vec<Constraint>, ConstraintError> {
    specs.iter().map(|s| parse_constraint(s)).collect()
}

/// Whether two strings are equal ignoring case (Unicode lowercase mapping, as Go's
/// `strings.EqualFold` that swarmkit uses), without allocating.
fn eq_fold(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.eq_ignore_ascii_case(b)
        || a.chars()
            .flat_map(char::to_lowercase)
            .eq(b.chars().flat_map(char::to_lowercase))
}

impl Constraint {
    /// Builds a constraint from its parts. `value` is compared as is (case-insensitively);
    /// for [`ConstraintKey::Role`] it should be `manager` or `worker`.
    pub fn new(key: ConstraintKey, op: Operator, value: impl Into<String>) -> Constraint {
        Constraint {
            key,
            op,
            value: value.into(),
        }
    }

    pub fn key(&self) -> &ConstraintKey {
        &self.key
    }

    pub fn op(&self) -> Operator {
        self.op
    }

    pub fn value(&self) -> &str {
        &self.value
    }

    /// Whether `node` satisfies the constraint. A node without the label of a
    /// `node.labels.<name>` constraint fails `==` and passes `!=`, as in swarmkit.
    pub fn matches(&self, node: &Node) -> bool {
        let actual: Option<&str> = match &self.key {
            ConstraintKey::Id => Some(&node.id),
            ConstraintKey::Hostname => Some(&node.hostname),
            ConstraintKey::Role => Some(match node.role {
                NodeRole::Manager => "manager",
                NodeRole::Worker => "worker",
            }),
            ConstraintKey::Label(name) => node.labels.get(name).map(String::as_str),
        };
        let equal = actual.is_some_and(|a| eq_fold(a, &self.value));
        match self.op {
            Operator::Eq => equal,
            Operator::Ne => !equal,
        }
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}{}", self.key, self.op, self.value)
    }
}

impl std::str::FromStr for Constraint {
    type Err = ConstraintError;
    fn from_str(s: &str) -> Result<Self, ConstraintError> {
        parse_constraint(s)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn node(id: &str, hostname: &str, role: NodeRole, labels: &[(&str, &str)]) -> Node {
        Node {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            ..Node::new(id, hostname, role, "10.0.0.1:2377")
        }
    }

    fn parse(s: &str) -> Constraint {
        parse_constraint(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn err(s: &str) -> String {
        match parse_constraint(s) {
            Ok(c) => panic!("{s} parsed as {c}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_every_key_and_operator() {
        let c = parse("node.id==abc");
        assert_eq!(
            (c.key(), c.op(), c.value()),
            (&ConstraintKey::Id, Operator::Eq, "abc")
        );
        let c = parse("node.hostname!=h1");
        assert_eq!(
            (c.key(), c.op(), c.value()),
            (&ConstraintKey::Hostname, Operator::Ne, "h1")
        );
        let c = parse("node.role==manager");
        assert_eq!((c.key(), c.value()), (&ConstraintKey::Role, "manager"));
        let c = parse("node.role != Worker");
        assert_eq!(
            (c.key(), c.op(), c.value()),
            (&ConstraintKey::Role, Operator::Ne, "worker")
        );
        let c = parse("node.labels.zone==a");
        assert_eq!(c.key(), &ConstraintKey::Label("zone".into()));
        assert_eq!(c.value(), "a");
        // Spaces around the operator and the whole; dots and dashes in label names; an `=`
        // inside the value.
        let c = parse("  node.labels.com.example.rack-id   ==   r=1 ");
        assert_eq!(c.key(), &ConstraintKey::Label("com.example.rack-id".into()));
        assert_eq!(c.value(), "r=1");
        // The fixed part of keys is case-insensitive; label names keep their case.
        assert_eq!(parse("NODE.Hostname==x").key(), &ConstraintKey::Hostname);
        assert_eq!(
            parse("Node.Labels.Zone==x").key(),
            &ConstraintKey::Label("Zone".into())
        );
        // Display round-trips.
        for s in [
            "node.id==abc",
            "node.hostname!=h1",
            "node.role==worker",
            "node.labels.zone!=a",
        ] {
            assert_eq!(parse(s).to_string(), s);
            assert_eq!(parse(&parse(s).to_string()), parse(s));
        }
        assert_eq!("node.id==x".parse::<Constraint>(), Ok(parse("node.id==x")));
    }

    #[test]
    fn rejects_malformed_constraints_with_a_message_naming_them() {
        assert_eq!(
            err("x"),
            r#"invalid constraint: "x": expected KEY==VALUE or KEY!=VALUE"#
        );
        assert_eq!(
            err(""),
            r#"invalid constraint: "": expected KEY==VALUE or KEY!=VALUE"#
        );
        assert_eq!(
            err("==a"),
            r#"invalid constraint: "==a": expected KEY==VALUE or KEY!=VALUE"#
        );
        assert_eq!(
            err("node.foo==a"),
            r#"invalid constraint: "node.foo==a": unknown key node.foo (expected node.id, node.hostname, node.role or node.labels.<name>)"#
        );
        assert!(err("node.labels.==a").contains("unknown key node.labels."));
        assert!(err("labels.zone==a").contains("unknown key labels.zone"));
        assert_eq!(
            err("node.role=manager"),
            r#"invalid constraint: "node.role=manager": unknown operator = (expected == or !=)"#
        );
        assert!(err("node.role>=x").contains("unknown operator >="));
        assert!(err("node.role<>x").contains("unknown operator <>"));
        assert!(err("node.role===x").contains("unknown operator ==="));
        assert!(err("node.role!x").contains("unknown operator !"));
        assert_eq!(
            err("node.id=="),
            r#"invalid constraint: "node.id==": empty value"#
        );
        assert_eq!(
            err("node.labels.zone !=  "),
            r#"invalid constraint: "node.labels.zone !=  ": empty value"#
        );
        assert_eq!(
            err("node.role==boss"),
            r#"invalid constraint: "node.role==boss": invalid role boss (expected manager or worker)"#
        );
    }

    #[test]
    fn parse_constraints_stops_at_the_first_error() {
        let ok =
            parse_constraints(&["node.role==worker".into(), "node.labels.a!=b".into()]).unwrap();
        assert_eq!(ok.len(), 2);
        assert!(parse_constraints(&[]).unwrap().is_empty());
        let e = parse_constraints(&["node.role==worker".into(), "bad".into(), "node.x==1".into()])
            .unwrap_err();
        assert_eq!(
            e,
            ConstraintError::Syntax {
                constraint: "bad".into()
            }
        );
    }

    #[test]
    fn matches_nodes_like_swarmkit() {
        let w = node(
            "id1",
            "host-1",
            NodeRole::Worker,
            &[("zone", "a"), ("ssd", "true")],
        );
        let m = node("id2", "host-2", NodeRole::Manager, &[("zone", "b")]);
        let check = |s: &str| (parse(s).matches(&w), parse(s).matches(&m));
        assert_eq!(check("node.id==id1"), (true, false));
        assert_eq!(check("node.id!=id1"), (false, true));
        assert_eq!(check("node.hostname==HOST-2"), (false, true));
        assert_eq!(check("node.role==worker"), (true, false));
        assert_eq!(check("node.role!=worker"), (false, true));
        assert_eq!(check("node.role==manager"), (false, true));
        assert_eq!(check("node.labels.zone==a"), (true, false));
        assert_eq!(check("node.labels.zone==A"), (true, false));
        assert_eq!(check("node.labels.zone!=a"), (false, true));
        // A missing label: `==` false, `!=` true.
        assert_eq!(check("node.labels.ssd==true"), (true, false));
        assert_eq!(check("node.labels.ssd!=true"), (false, true));
        assert_eq!(check("node.labels.gpu!=yes"), (true, true));
        assert_eq!(check("node.labels.gpu==yes"), (false, false));
        // Label names are looked up exactly.
        assert_eq!(check("node.labels.Zone==a"), (false, false));
        assert!(eq_fold("ÉTÉ", "été"));
        assert!(!eq_fold("a", "ab"));
    }
}
