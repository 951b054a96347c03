//! A YAML document as a tree of [`Node`]s that remember the file and line they came from, so
//! every later error can name them. Built from `saphyr-parser`'s event stream: aliases are
//! resolved to copies of their anchored node, and YAML 1.1 merge keys (`<<: *base`, or a
//! list of them) are applied as go-yaml (Docker's parser) does: keys written in the mapping
//! win over merged ones, and an earlier merged mapping over a later one. Scalars keep their
//! text and whether they were plain (unquoted), so types are resolved later, by what each
//! field expects, with Docker's rules (`0444` is octal, `"3"` is still a number once
//! interpolated).

use std::collections::HashMap;
use std::sync::Arc;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

use crate::Error;

/// One value of the document.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `~`, `null` or nothing at all.
    Null,
    /// A scalar's text; `plain` when it was written unquoted (only then may it be a number,
    /// a boolean or null).
    Str {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    /// Entries in the order written; keys are unique.
    Map(Vec<(Key, Node)>),
}

/// A mapping key: its text and line.
#[derive(Clone, Debug, PartialEq)]
pub struct Key {
    pub text: String,
    pub line: usize,
}

/// A value and where it was written.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub value: Value,
    pub file: Arc<str>,
    /// 1-based.
    pub line: usize,
}

impl Node {
    /// An error about this node, at `path`.
    pub fn err(&self, path: &str, message: impl std::fmt::Display) -> Error {
        Error::at(&self.file, self.line, path, message)
    }

    /// Docker-like description of the value for type errors: `string "three"`, `a mapping`.
    pub fn describe(&self) -> String {
        match &self.value {
            Value::Null => "null".into(),
            Value::Str { text, .. } => format!("string {text:?}"),
            Value::Seq(_) => "a sequence".into(),
            Value::Map(_) => "a mapping".into(),
        }
    }

    /// The value of `key` in a mapping.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries.iter().find(|(k, _)| k.text == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Whether a null node (an empty value).
    pub fn is_null(&self) -> bool {
        matches!(self.value, Value::Null)
    }
}

/// Parses one document; an empty file is `Null`.
pub fn parse(file: &Arc<str>, text: &str) -> Result<Node, Error> {
    let mut b = Builder {
        file: file.clone(),
        parser: Parser::new_from_str(text),
        anchors: HashMap::new(),
    };
    let mut root = None;
    loop {
        let (ev, span) = b.next()?;
        match ev {
            Event::StreamStart | Event::DocumentEnd | Event::Nothing => {}
            Event::DocumentStart(_) => {
                let (ev, span) = b.next()?;
                if matches!(ev, Event::DocumentEnd) {
                    continue;
                }
                if root.is_some() {
                    return Err(Error::at(
                        file,
                        span.start.line(),
                        "",
                        "more than one YAML document in a compose file",
                    ));
                }
                root = Some(b.node(ev, span)?);
            }
            Event::StreamEnd => break,
            _ => {
                return Err(Error::at(
                    file,
                    span.start.line(),
                    "",
                    "unexpected YAML event",
                ))
            }
        }
    }
    Ok(root.unwrap_or(Node {
        value: Value::Null,
        file: file.clone(),
        line: 1,
    }))
}

struct Builder<'a> {
    file: Arc<str>,
    parser: Parser<'a, saphyr_parser::StrInput<'a>>,
    anchors: HashMap<usize, Node>,
}

impl<'a> Builder<'a> {
    fn next(&mut self) -> Result<(Event<'a>, Span), Error> {
        match self.parser.next_event() {
            Some(Ok(e)) => Ok(e),
            Some(Err(e)) => Err(Error::at(
                &self.file,
                e.marker().line(),
                "",
                format!("invalid YAML: {}", e.info()),
            )),
            None => Err(Error::at(&self.file, 0, "", "invalid YAML: unexpected end")),
        }
    }

    fn node(&mut self, ev: Event<'a>, span: Span) -> Result<Node, Error> {
        let line = span.start.line();
        let file = self.file.clone();
        let mk = move |value| Node { value, file, line };
        let (node, anchor) = match ev {
            Event::Scalar(text, style, anchor, tag) => {
                let tagged_str = tag.as_ref().is_some_and(|t| t.suffix == "str");
                let plain = style == ScalarStyle::Plain && !tagged_str;
                let value = if plain && matches!(&*text, "" | "~" | "null" | "Null" | "NULL") {
                    Value::Null
                } else {
                    Value::Str {
                        text: text.into_owned(),
                        plain,
                    }
                };
                (mk(value), anchor)
            }
            Event::Alias(id) => {
                let n = self.anchors.get(&id).cloned().ok_or_else(|| {
                    Error::at(&self.file, line, "", "invalid YAML: unknown alias")
                })?;
                return Ok(n);
            }
            Event::SequenceStart(anchor, _) => {
                let mut items = Vec::new();
                loop {
                    let (ev, span) = self.next()?;
                    if matches!(ev, Event::SequenceEnd) {
                        break;
                    }
                    items.push(self.node(ev, span)?);
                }
                (mk(Value::Seq(items)), anchor)
            }
            Event::MappingStart(anchor, _) => {
                let mut entries: Vec<(Key, Node)> = Vec::new();
                let mut merged: Vec<(Key, Node)> = Vec::new();
                loop {
                    let (ev, span) = self.next()?;
                    if matches!(ev, Event::MappingEnd) {
                        break;
                    }
                    let key = self.node(ev, span)?;
                    let (kev, kspan) = self.next()?;
                    let value = self.node(kev, kspan)?;
                    let text = match &key.value {
                        Value::Str { text, .. } => text.clone(),
                        Value::Null => String::new(),
                        _ => {
                            return Err(key.err("", "invalid YAML: a mapping key must be a scalar"))
                        }
                    };
                    if text == "<<" && matches!(key.value, Value::Str { plain: true, .. }) {
                        let sources = match &value.value {
                            Value::Map(_) => vec![value],
                            Value::Seq(items) => items.clone(),
                            _ => {
                                return Err(value.err(
                                    "<<",
                                    "a merge key takes a mapping or a list of mappings",
                                ))
                            }
                        };
                        for s in sources {
                            let Value::Map(es) = s.value else {
                                return Err(s.err(
                                    "<<",
                                    "a merge key takes a mapping or a list of mappings",
                                ));
                            };
                            for (k, v) in es {
                                if !merged.iter().any(|(m, _)| m.text == k.text) {
                                    merged.push((k, v));
                                }
                            }
                        }
                        continue;
                    }
                    if let Some((first, _)) = entries.iter().find(|(k, _)| k.text == text) {
                        return Err(Error::at(
                            &self.file,
                            key.line,
                            &text,
                            format!(
                                "invalid YAML: mapping key {text:?} already defined at line {}",
                                first.line
                            ),
                        ));
                    }
                    entries.push((
                        Key {
                            text,
                            line: key.line,
                        },
                        value,
                    ));
                }
                for (k, v) in merged {
                    if !entries.iter().any(|(e, _)| e.text == k.text) {
                        entries.push((k, v));
                    }
                }
                (mk(Value::Map(entries)), anchor)
            }
            _ => {
                return Err(Error::at(
                    &self.file,
                    line,
                    "",
                    "invalid YAML: unexpected event",
                ))
            }
        };
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        Ok(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Node, Error> {
        parse(&Arc::from("t.yml"), s)
    }

    fn text(n: &Node) -> &str {
        match &n.value {
            Value::Str { text, .. } => text,
            _ => panic!("not a scalar: {n:?}"),
        }
    }

    #[test]
    fn lines_anchors_and_merge_keys() {
        let n =
            p("x-base: &base\n  a: 1\n  b: 2\nsvc:\n  <<: *base\n  b: 3\n  c: \"4\"\n").unwrap();
        let svc = n.get("svc").unwrap();
        assert_eq!(text(svc.get("a").unwrap()), "1");
        assert_eq!(text(svc.get("b").unwrap()), "3");
        assert_eq!(svc.get("b").unwrap().line, 6);
        assert_eq!(svc.get("a").unwrap().line, 2);
        assert_eq!(
            svc.get("c").unwrap().value,
            Value::Str {
                text: "4".into(),
                plain: false
            }
        );
        let n = p("a: &a {x: 1}\nb: &b {x: 2, y: 2}\nc:\n  <<: [*a, *b]\n").unwrap();
        let c = n.get("c").unwrap();
        assert_eq!(
            (text(c.get("x").unwrap()), text(c.get("y").unwrap())),
            ("1", "2")
        );
        let l = p("l: &l [1, 2]\nm: *l\n").unwrap();
        assert!(matches!(&l.get("m").unwrap().value, Value::Seq(v) if v.len() == 2));
    }

    #[test]
    fn nulls_errors_and_empty_files() {
        let n = p("a:\nb: ~\nc: ''\n").unwrap();
        assert!(n.get("a").unwrap().is_null() && n.get("b").unwrap().is_null());
        assert!(!n.get("c").unwrap().is_null());
        assert!(p("").unwrap().is_null());
        let e = p("a: 1\nb: [1, 2\n").unwrap_err().to_string();
        assert!(e.starts_with("t.yml:"), "{e}");
        assert!(e.contains("invalid YAML"), "{e}");
        let e = p("a: 1\na: 2\n").unwrap_err().to_string();
        assert_eq!(
            e,
            "t.yml:2: a: invalid YAML: mapping key \"a\" already defined at line 1"
        );
        let e = p("a: *nope\n").unwrap_err().to_string();
        assert!(e.contains("invalid YAML"), "{e}");
    }
}
