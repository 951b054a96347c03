//! `--format` as Docker's CLI takes it: `table` (the default columns), `json` (one JSON array
//! of the rows: mesh's machine output), `table TEMPLATE` (a header row from the fields'
//! names, then a row per object, cells split on tabs and aligned) or `TEMPLATE` (a line per
//! object).
//!
//! Templates are a small subset of Go's `text/template`, what listings are formatted with:
//! text, and actions `{{.Field}}`, `{{.}}`, `{{json .}}`, `{{json .Field}}`, `{{upper
//! .Field}}`, `{{lower .Field}}`, `{{title .Field}}`, and pipelines such as `{{.Name |
//! upper}}`; `\t` and `\n` written as two characters are a tab and a newline, as Docker's
//! CLI reads them. Errors keep Go's wording: `template: :1:2: executing "" at <.Foo>:
//! can't evaluate field Foo in type *formatter.serviceContext`.

use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value};

/// One object of a listing: its fields by Docker's names (`ID`, `Name`, ...).
pub type Row = Map<String, Value>;

/// The `--format` of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Format {
    /// The default table.
    Table,
    /// One JSON array of the rows.
    Json,
    /// `table TEMPLATE`: a header, then a row per object, aligned on tabs.
    TableTemplate(String),
    /// A line per object.
    Template(String),
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "" | "table" => Format::Table,
            "json" => Format::Json,
            t => match t.strip_prefix("table ") {
                Some(rest) => Format::TableTemplate(rest.to_string()),
                None => Format::Template(t.to_string()),
            },
        })
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Format::Table => f.write_str("table"),
            Format::Json => f.write_str("json"),
            Format::TableTemplate(t) => write!(f, "table {t}"),
            Format::Template(t) => f.write_str(t),
        }
    }
}

/// What a listing's rows are called in errors, as Docker's formatter types
/// (`*formatter.serviceContext`).
#[derive(Clone, Copy, Debug)]
pub struct Kind(pub &'static str);

pub const NODE: Kind = Kind("nodeContext");
pub const SERVICE: Kind = Kind("serviceContext");
pub const TASK: Kind = Kind("taskContext");
pub const NETWORK: Kind = Kind("networkContext");
pub const SECRET: Kind = Kind("secretContext");
pub const CONFIG: Kind = Kind("configContext");
pub const STACK: Kind = Kind("stackContext");

/// One step of a pipeline: a value (`.`, `.Field`) or a function.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Word {
    /// `.` (empty) or `.Field`, with its offset in the template.
    Field(String, usize),
    Func(Func),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Func {
    Json,
    Upper,
    Lower,
    Title,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    /// Commands separated by `|`, each a list of words.
    Action(Vec<Vec<Word>>),
}

/// A parsed template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    src: String,
    parts: Vec<Part>,
}

fn parse_error(msg: impl fmt::Display) -> String {
    format!("template parsing error: template: :{msg}")
}

/// Docker's CLI turns the two characters `\t` and `\n` into a tab and a newline.
fn unescape(s: &str) -> String {
    s.replace("\\t", "\t").replace("\\n", "\n")
}

impl Template {
    pub fn parse(raw: &str) -> Result<Template, String> {
        let src = unescape(raw);
        let mut parts = Vec::new();
        let mut rest = 0;
        while let Some(open) = src[rest..].find("{{").map(|i| rest + i) {
            if open > rest {
                parts.push(Part::Text(src[rest..open].to_string()));
            }
            let line = 1 + src[..open].matches('\n').count();
            let close = src[open..]
                .find("}}")
                .map(|i| open + i)
                .ok_or_else(|| parse_error(format!("{line}: unclosed action")))?;
            let body_at = open + 2;
            parts.push(Part::Action(parse_action(
                &src[body_at..close],
                body_at,
                line,
            )?));
            rest = close + 2;
        }
        if rest < src.len() {
            parts.push(Part::Text(src[rest..].to_string()));
        }
        Ok(Template { src, parts })
    }

    /// The text for `row`.
    pub fn render(&self, row: &Row, kind: Kind) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Action(cmds) => out.push_str(&text(&self.eval(cmds, row, kind)?)),
            }
        }
        Ok(out)
    }

    /// The header row of `table TEMPLATE`: each field's column name, as Docker prints them.
    pub fn header(&self, headers: &dyn Fn(&str) -> String) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Action(cmds) => {
                    let field = cmds.iter().flatten().find_map(|w| match w {
                        Word::Field(f, _) if !f.is_empty() => Some(f.as_str()),
                        _ => None,
                    });
                    if let Some(f) = field {
                        out.push_str(&headers(f));
                    }
                }
            }
        }
        out
    }

    fn eval(&self, cmds: &[Vec<Word>], row: &Row, kind: Kind) -> Result<Value, String> {
        let mut piped: Option<Value> = None;
        for cmd in cmds {
            let mut arg = piped.take();
            let mut func = None;
            for w in cmd {
                match w {
                    Word::Func(f) => func = Some(*f),
                    Word::Field(name, at) => arg = Some(self.field(row, name, *at, kind)?),
                }
            }
            let arg = arg.unwrap_or(Value::Null);
            piped = Some(match func {
                None => arg,
                Some(Func::Json) => Value::String(arg.to_string()),
                Some(Func::Upper) => Value::String(text(&arg).to_uppercase()),
                Some(Func::Lower) => Value::String(text(&arg).to_lowercase()),
                Some(Func::Title) => Value::String(title(&text(&arg))),
            });
        }
        Ok(piped.unwrap_or(Value::Null))
    }

    fn field(&self, row: &Row, name: &str, at: usize, kind: Kind) -> Result<Value, String> {
        if name.is_empty() {
            return Ok(Value::Object(row.clone()));
        }
        row.get(name).cloned().ok_or_else(|| {
            let line_start = self.src[..at].rfind('\n').map_or(0, |i| i + 1);
            let line = 1 + self.src[..at].matches('\n').count();
            format!(
                "template parsing error: template: :{line}:{}: executing \"\" at <.{name}>: can't evaluate field {name} in type *formatter.{}",
                at - line_start,
                kind.0
            )
        })
    }
}

/// Splits an action's body into `|`-separated commands of words.
fn parse_action(body: &str, at: usize, line: usize) -> Result<Vec<Vec<Word>>, String> {
    let mut cmds = Vec::new();
    let mut offset = at;
    for cmd in body.split('|') {
        let mut words = Vec::new();
        let mut pos = 0;
        for w in cmd.split(' ') {
            let w_at = offset + pos;
            pos += w.len() + 1;
            let w = w.trim();
            if w.is_empty() {
                continue;
            }
            words.push(if let Some(f) = w.strip_prefix('.') {
                if !f.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(parse_error(format!(
                        "{line}: unexpected bad character in operand: {w:?}"
                    )));
                }
                Word::Field(f.to_string(), w_at)
            } else {
                Word::Func(match w {
                    "json" => Func::Json,
                    "upper" => Func::Upper,
                    "lower" => Func::Lower,
                    "title" => Func::Title,
                    _ => return Err(parse_error(format!("{line}: function \"{w}\" not defined"))),
                })
            });
        }
        if words.is_empty() {
            return Err(parse_error(format!("{line}: missing value for command")));
        }
        cmds.push(words);
        offset += cmd.len() + 1;
    }
    Ok(cmds)
}

/// A value as Go's templates print it: strings bare, the rest as JSON.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn title(s: &str) -> String {
    let mut out = String::new();
    let mut start = true;
    for c in s.chars() {
        if start {
            out.extend(c.to_uppercase());
        } else {
            out.push(c);
        }
        start = !c.is_alphanumeric();
    }
    out
}

/// A field's column name as Docker prints it: `ManagerStatus` -> `MANAGER STATUS`.
pub fn header_of(field: &str) -> String {
    let chars: Vec<char> = field.chars().collect();
    let mut out = String::new();
    for (i, &c) in chars.iter().enumerate() {
        let prev_lower = i > 0 && chars[i - 1].is_lowercase();
        let next_lower = chars.get(i + 1).is_some_and(|n| n.is_lowercase());
        let prev_upper = i > 0 && chars[i - 1].is_uppercase();
        if c.is_uppercase() && (prev_lower || (prev_upper && next_lower)) {
            out.push(' ');
        }
        out.extend(c.to_uppercase());
    }
    out
}

/// Prints `rows` in `format` (`quiet`: their IDs only); `table` prints the default table.
/// `headers` overrides a field's column name (`network ls`: `ID` is `NETWORK ID`).
pub fn print(
    format: &Format,
    quiet: bool,
    kind: Kind,
    rows: &[Row],
    headers: &[(&str, &str)],
    table: impl FnOnce(),
) -> crate::Result<()> {
    if quiet {
        for r in rows {
            println!("{}", text(r.get("ID").unwrap_or(&Value::Null)));
        }
        return Ok(());
    }
    match format {
        Format::Table => table(),
        Format::Json => {
            let all: Vec<&Row> = rows.iter().collect();
            println!("{}", serde_json::to_string(&all)?);
        }
        Format::Template(t) => {
            let t = Template::parse(t)?;
            for r in rows {
                println!("{}", t.render(r, kind)?);
            }
        }
        Format::TableTemplate(t) => {
            let t = Template::parse(t.trim())?;
            let name = |f: &str| {
                headers
                    .iter()
                    .find(|(k, _)| *k == f)
                    .map(|(_, h)| h.to_string())
                    .unwrap_or_else(|| header_of(f))
            };
            let head = t.header(&name);
            let mut lines = Vec::new();
            for r in rows {
                lines.push(t.render(r, kind)?);
            }
            let cells = |l: &str| l.split('\t').map(str::to_string).collect::<Vec<_>>();
            let head_cells = cells(&head);
            let head_refs: Vec<&str> = head_cells.iter().map(String::as_str).collect();
            crate::table::print(&head_refs, lines.iter().map(|l| cells(l)).collect());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row() -> Row {
        json!({"ID": "abc", "Name": "web", "Replicas": "2/2", "Self": true})
            .as_object()
            .unwrap()
            .clone()
    }

    fn render(t: &str) -> Result<String, String> {
        Template::parse(t)?.render(&row(), SERVICE)
    }

    #[test]
    fn formats_parse_as_docker_s() {
        assert_eq!("table".parse::<Format>().unwrap(), Format::Table);
        assert_eq!("json".parse::<Format>().unwrap(), Format::Json);
        assert_eq!(
            "table {{.ID}}".parse::<Format>().unwrap(),
            Format::TableTemplate("{{.ID}}".into())
        );
        assert_eq!(
            "{{.ID}}".parse::<Format>().unwrap(),
            Format::Template("{{.ID}}".into())
        );
    }

    #[test]
    fn fields_functions_and_pipelines() {
        assert_eq!(render("{{.Name}}").unwrap(), "web");
        assert_eq!(render("{{.ID}}: {{.Replicas}}").unwrap(), "abc: 2/2");
        assert_eq!(render("{{ .Name }}\\t{{.Self}}").unwrap(), "web\ttrue");
        assert_eq!(render("{{json .Name}}").unwrap(), "\"web\"");
        assert_eq!(
            render("{{json .}}").unwrap(),
            r#"{"ID":"abc","Name":"web","Replicas":"2/2","Self":true}"#
        );
        assert_eq!(
            render("{{upper .Name}}-{{.Name | upper}}").unwrap(),
            "WEB-WEB"
        );
        assert_eq!(
            render("{{.Name | title}} {{lower .ID}}").unwrap(),
            "Web abc"
        );
        assert_eq!(render("plain").unwrap(), "plain");
    }

    #[test]
    fn errors_in_go_s_words() {
        assert_eq!(
            render("{{.Foo}}").unwrap_err(),
            "template parsing error: template: :1:2: executing \"\" at <.Foo>: can't evaluate field Foo in type *formatter.serviceContext"
        );
        assert_eq!(
            render("{{.ID}} {{ .Foo}}").unwrap_err(),
            "template parsing error: template: :1:11: executing \"\" at <.Foo>: can't evaluate field Foo in type *formatter.serviceContext"
        );
        assert_eq!(
            render("{{.ID").unwrap_err(),
            "template parsing error: template: :1: unclosed action"
        );
        assert_eq!(
            render("{{nope .ID}}").unwrap_err(),
            "template parsing error: template: :1: function \"nope\" not defined"
        );
        assert!(render("{{}}").is_err());
    }

    #[test]
    fn headers_as_docker_prints_them() {
        assert_eq!(header_of("ID"), "ID");
        assert_eq!(header_of("ManagerStatus"), "MANAGER STATUS");
        assert_eq!(header_of("DesiredState"), "DESIRED STATE");
        assert_eq!(header_of("TLSStatus"), "TLS STATUS");
        let t = Template::parse("{{.ID}}\\t{{.Name | upper}}\\t{{json .}}").unwrap();
        assert_eq!(t.header(&header_of), "ID\tNAME\t");
    }
}
