//! Secrets and configs: small named blobs stored by the managers and mounted into tasks as
//! files (`mesh secret create`, `mesh config create`, `--secret` / `--config` on services).
//!
//! Both kinds share one shape, as Docker's do: a name, labels and the data. They differ in
//! where a task sees them and who may read them back: a secret is a file under
//! `/run/secrets/` on a tmpfs, never written to a worker's disk, and its data is never
//! returned by the API; a config is a file anywhere (default `/NAME`) whose data `inspect`
//! shows.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The largest secret or config, as Docker's (500 KiB).
pub const MAX_BLOB_BYTES: usize = 500 * 1024;

/// Which of the two a blob is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlobKind {
    Secret,
    Config,
}

impl BlobKind {
    /// `secret` / `config`, as Docker's messages name them.
    pub fn word(self) -> &'static str {
        match self {
            BlobKind::Secret => "secret",
            BlobKind::Config => "config",
        }
    }
}

impl fmt::Display for BlobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.word())
    }
}

/// What `secret create` / `config create` asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The content; base64 on the wire. Empty in what the API returns for a secret.
    #[serde(default, with = "b64", skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<u8>,
}

impl BlobSpec {
    /// Docker's checks: a name of 1-64 characters of `[a-zA-Z0-9-_.]` starting and ending
    /// with a letter or digit, and data of at most [`MAX_BLOB_BYTES`] (a secret not empty).
    pub fn validate(&self, kind: BlobKind) -> Result<(), String> {
        let n = &self.name;
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        let ends_ok = n.starts_with(|c: char| c.is_ascii_alphanumeric())
            && n.ends_with(|c: char| c.is_ascii_alphanumeric());
        if n.is_empty() || n.len() > 64 || !n.chars().all(ok_char) || !ends_ok {
            return Err(format!(
                "invalid name, only 64 [a-zA-Z0-9-_.] characters allowed, and the start and end character must be [a-zA-Z0-9]: {n:?}"
            ));
        }
        if self.data.len() > MAX_BLOB_BYTES {
            return Err(format!(
                "{kind} data too long ({} bytes; at most {MAX_BLOB_BYTES})",
                self.data.len()
            ));
        }
        if kind == BlobKind::Secret && self.data.is_empty() {
            return Err("secret data must not be empty".into());
        }
        Ok(())
    }
}

/// A secret or config as stored (a secret's `spec.data` is emptied in every answer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob {
    pub id: String,
    pub kind: BlobKind,
    pub spec: BlobSpec,
    pub version: u64,
    pub created_at: u64,
    pub updated_at: u64,
}

impl Blob {
    /// As dockerd shows it (`docker secret inspect`, `GET /secrets/{id}`): a config with its
    /// data, a secret never.
    pub fn docker_json(&self) -> serde_json::Value {
        use crate::human::rfc3339;
        let mut spec = serde_json::json!({ "Name": self.spec.name, "Labels": self.spec.labels });
        if self.kind == BlobKind::Config {
            spec["Data"] = serde_json::json!(
                base64::engine::general_purpose::STANDARD.encode(&self.spec.data)
            );
        }
        serde_json::json!({
            "ID": self.id,
            "Version": { "Index": self.version },
            "CreatedAt": rfc3339(self.created_at),
            "UpdatedAt": rfc3339(self.updated_at),
            "Spec": spec,
        })
    }
}

/// A service's use of a secret or config: `--secret source=NAME,target=T,uid=,gid=,mode=`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobReference {
    /// The secret's or config's name.
    pub source: String,
    /// Its ID, filled in by the manager when the service is created or updated.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// A secret: a file name under `/run/secrets/` or an absolute path (default: the name).
    /// A config: a path, relative ones under `/` (default: `/NAME`).
    pub target: String,
    #[serde(default = "zero")]
    pub uid: String,
    #[serde(default = "zero")]
    pub gid: String,
    /// File mode bits (default 0444).
    #[serde(default = "default_mode")]
    pub mode: u32,
}

fn zero() -> String {
    "0".into()
}

fn default_mode() -> u32 {
    0o444
}

impl BlobReference {
    /// Parses `NAME` or `source=NAME[,target=T][,uid=U][,gid=G][,mode=0400]` as
    /// `docker service create --secret/--config` does.
    pub fn parse(kind: BlobKind, s: &str) -> Result<BlobReference, String> {
        let mut r = BlobReference {
            source: String::new(),
            id: String::new(),
            target: String::new(),
            uid: zero(),
            gid: zero(),
            mode: default_mode(),
        };
        if !s.contains('=') {
            r.source = s.to_string();
        } else {
            for field in s.split(',') {
                let (k, v) = field
                    .split_once('=')
                    .ok_or_else(|| format!("invalid field '{field}' must be a key=value pair"))?;
                match k.trim().to_ascii_lowercase().as_str() {
                    "source" | "src" => r.source = v.to_string(),
                    "target" => r.target = v.to_string(),
                    "uid" => r.uid = v.to_string(),
                    "gid" => r.gid = v.to_string(),
                    "mode" => {
                        r.mode = u32::from_str_radix(v.trim_start_matches("0o"), 8)
                            .ok()
                            .filter(|m| *m <= 0o7777)
                            .ok_or_else(|| {
                                format!("invalid mode {v:?}: an octal mode such as 0400")
                            })?
                    }
                    _ => return Err(format!("invalid field key {k:?}")),
                }
            }
        }
        if r.source.is_empty() {
            return Err(format!(
                "invalid {kind} reference {s:?}: source is required"
            ));
        }
        r.complete(kind)?;
        Ok(r)
    }

    /// Fills in the default target and checks it.
    pub fn complete(&mut self, kind: BlobKind) -> Result<(), String> {
        if self.target.is_empty() {
            self.target = match kind {
                BlobKind::Secret => self.source.clone(),
                BlobKind::Config => format!("/{}", self.source),
            };
        }
        let bad = self.target.split('/').any(|c| c == "..");
        if bad || self.target == "/" {
            return Err(format!("invalid {kind} target {:?}", self.target));
        }
        for (what, v) in [("uid", &self.uid), ("gid", &self.gid)] {
            if v.parse::<u32>().is_err() {
                return Err(format!("invalid {what} {v:?}: a number"));
            }
        }
        Ok(())
    }

    /// Where the file appears in the task: a relative secret target under `/run/secrets/`,
    /// a relative config target under `/`, as Docker places them.
    pub fn path(&self, kind: BlobKind) -> String {
        match kind {
            _ if self.target.starts_with('/') => self.target.clone(),
            BlobKind::Secret => format!("/run/secrets/{}", self.target),
            BlobKind::Config => format!("/{}", self.target),
        }
    }
}

/// One row of `mesh secret ls` / `mesh config ls`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobSummary {
    pub id: String,
    pub name: String,
    pub created_at: u64,
    pub updated_at: u64,
}

/// Base64 (standard alphabet, padded) for `Vec<u8>` fields, as Docker's JSON carries data.
pub mod b64 {
    use super::*;

    pub fn serialize<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(data))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_as_docker_does() {
        let r = BlobReference::parse(BlobKind::Secret, "db_pw").unwrap();
        assert_eq!(
            (r.source.as_str(), r.target.as_str(), r.mode),
            ("db_pw", "db_pw", 0o444)
        );
        assert_eq!(r.path(BlobKind::Secret), "/run/secrets/db_pw");
        let r = BlobReference::parse(
            BlobKind::Secret,
            "source=db_pw,target=pw.txt,uid=33,gid=33,mode=0400",
        )
        .unwrap();
        assert_eq!(
            (r.uid.as_str(), r.gid.as_str(), r.mode),
            ("33", "33", 0o400)
        );
        assert_eq!(r.path(BlobKind::Secret), "/run/secrets/pw.txt");
        let c = BlobReference::parse(BlobKind::Config, "site").unwrap();
        assert_eq!(c.path(BlobKind::Config), "/site");
        let rel = BlobReference::parse(BlobKind::Config, "source=a,target=etc/a.conf").unwrap();
        assert_eq!(rel.path(BlobKind::Config), "/etc/a.conf");
        assert!(BlobReference::parse(BlobKind::Config, "source=a,target=/").is_err());
        assert!(BlobReference::parse(BlobKind::Secret, "source=a,target=../x").is_err());
        assert!(BlobReference::parse(BlobKind::Secret, "target=x").is_err());
        assert!(BlobReference::parse(BlobKind::Secret, "source=a,mode=9").is_err());
        assert!(BlobReference::parse(BlobKind::Secret, "source=a,color=red").is_err());
    }

    #[test]
    fn names_and_sizes_are_checked() {
        let spec = |name: &str, data: &[u8]| BlobSpec {
            name: name.into(),
            labels: BTreeMap::new(),
            data: data.to_vec(),
        };
        assert!(spec("db_pw.v1", b"x").validate(BlobKind::Secret).is_ok());
        assert!(spec("-x", b"x").validate(BlobKind::Secret).is_err());
        assert!(spec("a/b", b"x").validate(BlobKind::Secret).is_err());
        assert!(spec("ok", b"").validate(BlobKind::Secret).is_err());
        assert!(spec("ok", b"").validate(BlobKind::Config).is_ok());
        assert!(spec("ok", &vec![0; MAX_BLOB_BYTES + 1])
            .validate(BlobKind::Config)
            .is_err());
    }

    #[test]
    fn data_travels_as_base64() {
        let s = BlobSpec {
            name: "n".into(),
            labels: BTreeMap::new(),
            data: b"hi\n".to_vec(),
        };
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(j, r#"{"name":"n","data":"aGkK"}"#);
        assert_eq!(serde_json::from_str::<BlobSpec>(&j).unwrap(), s);
    }
}
