//! Variable interpolation in compose values, with the compose specification's syntax:
//! `$VAR`, `${VAR}`, `${VAR:-default}` (unset or empty), `${VAR-default}` (unset),
//! `${VAR:?error}` / `${VAR?error}` (required), `${VAR:+other}` / `${VAR+other}`, and `$$`
//! for a literal `$`. Defaults and messages may themselves hold variables. A `$` followed by
//! anything else is refused with Docker's words.

/// Replaces the variables of `s`, looked up with `lookup`; errors are Docker's messages
/// (without the file and path, which the caller adds).
pub fn interpolate(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    if !s.contains('$') {
        return Ok(s.to_string());
    }
    let invalid = || {
        format!("invalid interpolation format: {s:?}. You may need to escape any $ with another $")
    };
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let Some(off) = s[i..].find('$') else {
            out.push_str(&s[i..]);
            break;
        };
        out.push_str(&s[i..i + off]);
        i += off + 1;
        match b.get(i) {
            Some(b'$') => {
                out.push('$');
                i += 1;
            }
            Some(b'{') => {
                // The matching brace, counting nested `${`.
                let mut depth = 1;
                let mut j = i + 1;
                while j < s.len() && depth > 0 {
                    if b[j] == b'$' && b.get(j + 1) == Some(&b'{') {
                        depth += 1;
                        j += 2;
                        continue;
                    }
                    if b[j] == b'}' {
                        depth -= 1;
                    }
                    j += 1;
                }
                if depth > 0 {
                    return Err(invalid());
                }
                let inner = &s[i + 1..j - 1];
                out.push_str(&braced(inner, lookup).map_err(|e| e.unwrap_or_else(invalid))?);
                i = j;
            }
            Some(c) if c.is_ascii_alphabetic() || *c == b'_' => {
                let end = s[i..]
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .map_or(s.len(), |e| i + e);
                out.push_str(&lookup(&s[i..end]).unwrap_or_default());
                i = end;
            }
            _ => return Err(invalid()),
        }
    }
    Ok(out)
}

/// `NAME[op word]` inside `${...}`; `Err(None)`: a malformed expression.
fn braced(inner: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, Option<String>> {
    let name_end = inner
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(inner.len());
    let name = &inner[..name_end];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(None);
    }
    let rest = &inner[name_end..];
    let value = lookup(name);
    let word = |w: &str| interpolate(w, lookup).map_err(Some);
    let set_nonempty = value.as_deref().is_some_and(|v| !v.is_empty());
    let (op, w) = if let Some(w) = rest.strip_prefix(":-") {
        (":-", w)
    } else if let Some(w) = rest.strip_prefix(":?") {
        (":?", w)
    } else if let Some(w) = rest.strip_prefix(":+") {
        (":+", w)
    } else if rest.is_empty() {
        ("", "")
    } else {
        rest.split_at(1)
    };
    let required = |w: &str| -> Result<String, Option<String>> {
        let msg = word(w)?;
        Err(Some(if msg.is_empty() {
            format!("required variable {name} is missing a value")
        } else {
            format!("required variable {name} is missing a value: {msg}")
        }))
    };
    match op {
        "" => Ok(value.unwrap_or_default()),
        ":-" if set_nonempty => Ok(value.unwrap_or_default()),
        ":-" => word(w),
        "-" if value.is_some() => Ok(value.unwrap_or_default()),
        "-" => word(w),
        ":?" if set_nonempty => Ok(value.unwrap_or_default()),
        ":?" => required(w),
        "?" if value.is_some() => Ok(value.unwrap_or_default()),
        "?" => required(w),
        ":+" if set_nonempty => word(w),
        ":+" => Ok(String::new()),
        "+" if value.is_some() => word(w),
        "+" => Ok(String::new()),
        _ => Err(None),
    }
}

/// Reads a `.env` file: `KEY=VALUE` lines, `#` comments, blank lines, an optional
/// `export ` and matching quotes around the value.
pub fn parse_dotenv(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim();
        let v = ['"', '\'']
            .iter()
            .find_map(|q| v.strip_prefix(*q).and_then(|r| r.strip_suffix(*q)))
            .unwrap_or(v);
        out.push((k.trim().to_string(), v.to_string()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        match k {
            "TAG" => Some("1.25".into()),
            "EMPTY" => Some(String::new()),
            "PORT" => Some("8080".into()),
            _ => None,
        }
    }

    fn i(s: &str) -> Result<String, String> {
        interpolate(s, &env)
    }

    #[test]
    fn every_form_of_the_spec() {
        assert_eq!(i("nginx:${TAG}").unwrap(), "nginx:1.25");
        assert_eq!(i("nginx:$TAG-alpine").unwrap(), "nginx:1.25-alpine");
        assert_eq!(i("${NOPE:-d}").unwrap(), "d");
        assert_eq!(i("${EMPTY:-d}").unwrap(), "d");
        assert_eq!(i("${EMPTY-d}").unwrap(), "");
        assert_eq!(i("${NOPE-d}").unwrap(), "d");
        assert_eq!(i("${NOPE:-${PORT}}").unwrap(), "8080");
        assert_eq!(i("${NOPE:-${NADA:-x}}y").unwrap(), "xy");
        assert_eq!(i("${TAG:+set}/${NOPE:+set}").unwrap(), "set/");
        assert_eq!(i("$$HOME $${TAG}").unwrap(), "$HOME ${TAG}");
        assert_eq!(i("${PORT?}").unwrap(), "8080");
        assert_eq!(i("$NOPE").unwrap(), "");
        assert_eq!(i("no dollars").unwrap(), "no dollars");
    }

    #[test]
    fn required_and_malformed() {
        assert_eq!(
            i("${NOPE?set NOPE first}").unwrap_err(),
            "required variable NOPE is missing a value: set NOPE first"
        );
        assert_eq!(
            i("${EMPTY:?}").unwrap_err(),
            "required variable EMPTY is missing a value"
        );
        assert!(i("${EMPTY?}").is_ok());
        for bad in ["${", "${TAG", "$ x", "${1A}", "${TAG!x}", "a$", "${}"] {
            let e = i(bad).unwrap_err();
            assert!(e.contains("invalid interpolation format"), "{bad}: {e}");
        }
    }

    #[test]
    fn dotenv_files() {
        let v = parse_dotenv("# c\n\nA=1\nexport B = \"two words\"\nC='x'\nbad line\nD=\n");
        assert_eq!(
            v,
            [
                ("A".to_string(), "1".to_string()),
                ("B".into(), "two words".into()),
                ("C".into(), "x".into()),
                ("D".into(), "".into())
            ]
        );
    }
}
