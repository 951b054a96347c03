//! Query strings and Docker's filters: URL-encoded JSON `{"key":{"value":true}}`, or the
//! legacy `{"key":["value"]}`; booleans parsed as dockerd parses them.

use std::collections::{BTreeMap, BTreeSet};

/// A request's query parameters (the last value of a repeated key wins).
#[derive(Clone, Debug, Default)]
pub struct Query(BTreeMap<String, String>);

impl Query {
    pub fn parse(raw: Option<&str>) -> Query {
        Query(
            form_urlencoded::parse(raw.unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// dockerd's boolean: anything but absent, "", "0", "no", "false" or "none" is true.
    pub fn flag(&self, key: &str) -> bool {
        self.get(key).is_some_and(|v| {
            !matches!(
                v.to_ascii_lowercase().as_str(),
                "" | "0" | "no" | "false" | "none"
            )
        })
    }

    /// The `filters` parameter.
    pub fn filters(&self) -> Result<Filters, String> {
        Filters::parse(self.get("filters").unwrap_or(""))
    }

    /// An unsigned parameter, or `None` when absent.
    pub fn u64(&self, key: &str) -> Result<Option<u64>, String> {
        match self.get(key) {
            None | Some("") => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| format!("invalid {key} value {v:?}: expected an unsigned integer")),
        }
    }
}

/// Parsed filters: each key with its set of values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filters(BTreeMap<String, BTreeSet<String>>);

impl Filters {
    pub fn parse(raw: &str) -> Result<Filters, String> {
        if raw.trim().is_empty() {
            return Ok(Filters::default());
        }
        let v: serde_json::Value =
            serde_json::from_str(raw).map_err(|e| format!("invalid filter: {e}"))?;
        let obj = v
            .as_object()
            .ok_or_else(|| "invalid filter: expected a JSON object".to_string())?;
        let mut out = BTreeMap::new();
        for (k, vals) in obj {
            let set: BTreeSet<String> = match vals {
                serde_json::Value::Object(m) => m
                    .iter()
                    .filter(|(_, b)| b.as_bool() != Some(false))
                    .map(|(s, _)| s.clone())
                    .collect(),
                serde_json::Value::Array(a) => a
                    .iter()
                    .map(|s| {
                        s.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| format!("invalid filter {k:?}: values must be strings"))
                    })
                    .collect::<Result<_, _>>()?,
                _ => return Err(format!("invalid filter {k:?}")),
            };
            out.insert(k.clone(), set);
        }
        Ok(Filters(out))
    }

    /// Refuses keys outside `allowed`, as dockerd does ("invalid filter 'x'").
    pub fn only(&self, allowed: &[&str]) -> Result<(), String> {
        match self.0.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(k) => Err(format!("invalid filter '{k}'")),
            None => Ok(()),
        }
    }

    pub fn values(&self, key: &str) -> Option<&BTreeSet<String>> {
        self.0.get(key).filter(|s| !s.is_empty())
    }

    /// No values for `key`, or `f` holds for one of them.
    pub fn any(&self, key: &str, f: impl Fn(&str) -> bool) -> bool {
        self.values(key)
            .is_none_or(|vals| vals.iter().any(|v| f(v)))
    }

    /// `label` filters (`key` or `key=value`): every one must match `labels`.
    pub fn labels(&self, key: &str, labels: &BTreeMap<String, String>) -> bool {
        self.values(key).is_none_or(|vals| {
            vals.iter().all(|want| match want.split_once('=') {
                Some((k, v)) => labels.get(k).is_some_and(|have| have == v),
                None => labels.contains_key(want.as_str()),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_both_syntaxes() {
        let f = Filters::parse(r#"{"name":{"web":true},"label":["a=b"]}"#).unwrap();
        assert!(f.any("name", |v| v == "web"));
        assert!(f.any("id", |_| false), "absent keys match everything");
        let mut l = BTreeMap::new();
        assert!(!f.labels("label", &l));
        l.insert("a".into(), "b".into());
        assert!(f.labels("label", &l));
        assert!(f.only(&["name", "label"]).is_ok());
        assert_eq!(f.only(&["name"]).unwrap_err(), "invalid filter 'label'");
        assert!(Filters::parse("[1]").is_err());
        assert!(Filters::parse(r#"{"a":3}"#).is_err());
    }

    #[test]
    fn booleans_as_dockerd() {
        let q = Query::parse(Some("a=1&b=false&c=&d=True&e=none"));
        assert!(q.flag("a") && q.flag("d"));
        assert!(!q.flag("b") && !q.flag("c") && !q.flag("e") && !q.flag("zz"));
    }
}
