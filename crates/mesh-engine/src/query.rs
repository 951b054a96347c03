//! Query strings: parameters, booleans parsed as dockerd parses them, and the `filters`
//! parameter (parsed and matched by [`mesh_api::filter`], shared with the `mesh` CLI).

use std::collections::BTreeMap;

pub use mesh_api::Filters;

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
        Filters::parse_json(self.get("filters").unwrap_or(""))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booleans_as_dockerd() {
        let q = Query::parse(Some("a=1&b=false&c=&d=True&e=none"));
        assert!(q.flag("a") && q.flag("d"));
        assert!(!q.flag("b") && !q.flag("c") && !q.flag("e") && !q.flag("zz"));
    }
}
