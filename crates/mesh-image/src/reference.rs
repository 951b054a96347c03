//! Image references, normalised as Docker does (`github.com/distribution/reference`):
//! `busybox` is `docker.io/library/busybox:latest`, a first component with a `.` or a `:`, or
//! `localhost`, or an upper-case letter names a registry, `index.docker.io` is `docker.io`,
//! a tag defaults to `latest` unless a digest is given.

use std::fmt;

use crate::error::ImageError;

/// Docker Hub's canonical registry name.
pub const DOCKER_HUB: &str = "docker.io";
const LEGACY_DOCKER_HUB: &str = "index.docker.io";
const OFFICIAL_PREFIX: &str = "library/";
const NAME_TOTAL_MAX: usize = 255;

/// A normalised image reference: `registry/repository[:tag][@digest]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
}

impl Reference {
    /// Parses and normalises `s` as `docker pull` does.
    pub fn parse(s: &str) -> Result<Reference, ImageError> {
        if s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(ImageError::Invalid(format!(
                "invalid repository name ({s}), cannot specify 64-byte hexadecimal strings"
            )));
        }
        let (name_tag, digest) = match s.split_once('@') {
            Some((n, d)) => (n, Some(parse_digest(d)?)),
            None => (s, None),
        };
        let (registry, remainder) = split_domain(name_tag);
        let (path, tag) = match remainder.rsplit_once(':') {
            Some((p, t)) => (p, Some(t)),
            None => (remainder, None),
        };
        if path.to_lowercase() != path {
            return Err(ImageError::invalid_reference(Some(
                "repository name must be lowercase",
            )));
        }
        if registry != DOCKER_HUB && !valid_domain(&registry) {
            return Err(ImageError::invalid_reference(None));
        }
        if path.is_empty() || !path.split('/').all(valid_path_component) {
            return Err(ImageError::invalid_reference(None));
        }
        if let Some(t) = tag {
            if !valid_tag(t) {
                return Err(ImageError::invalid_reference(None));
            }
        }
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("{OFFICIAL_PREFIX}{path}")
        } else {
            path.to_string()
        };
        if registry.len() + 1 + repository.len() > NAME_TOTAL_MAX {
            return Err(ImageError::invalid_reference(Some(
                "repository name must not be more than 255 characters",
            )));
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, None) => Some("latest".to_string()),
            (None, Some(_)) => None,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The registry host (and port), `docker.io` for Docker Hub.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path inside the registry (`library/busybox`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if any (`latest` when neither tag nor digest was given).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if the reference is pinned.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// The full repository name: `docker.io/library/busybox`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The repository as `docker image ls` shows it: `busybox`, `foo/bar`, `127.0.0.1:5000/app`.
    pub fn familiar_name(&self) -> String {
        if self.registry == DOCKER_HUB {
            match self.repository.strip_prefix(OFFICIAL_PREFIX) {
                Some(short) if !short.contains('/') => short.to_string(),
                _ => self.repository.clone(),
            }
        } else {
            self.name()
        }
    }

    /// The reference as Docker shows it: `busybox:latest`, `127.0.0.1:5000/app:1`.
    pub fn familiar(&self) -> String {
        let mut s = self.familiar_name();
        push_tag_digest(&mut s, self.tag.as_deref(), self.digest.as_deref());
        s
    }

    /// The same reference pinned to `digest` (the tag is kept, as Docker's pinned form).
    pub fn with_digest(&self, digest: &str) -> Reference {
        Reference {
            digest: Some(digest.to_string()),
            ..self.clone()
        }
    }

    /// The same repository with `tag` and no digest.
    pub fn with_tag(&self, tag: &str) -> Reference {
        Reference {
            tag: Some(tag.to_string()),
            digest: None,
            ..self.clone()
        }
    }

    /// The same reference without its tag (`repo@digest`); unchanged when it has no digest.
    pub fn without_tag(&self) -> Reference {
        if self.digest.is_none() {
            return self.clone();
        }
        Reference {
            tag: None,
            ..self.clone()
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = self.name();
        push_tag_digest(&mut s, self.tag.as_deref(), self.digest.as_deref());
        f.write_str(&s)
    }
}

impl std::str::FromStr for Reference {
    type Err = ImageError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

fn push_tag_digest(s: &mut String, tag: Option<&str>, digest: Option<&str>) {
    if let Some(t) = tag {
        s.push(':');
        s.push_str(t);
    }
    if let Some(d) = digest {
        s.push('@');
        s.push_str(d);
    }
}

/// Docker's `splitDockerDomain`.
fn split_domain(name: &str) -> (String, &str) {
    let (domain, remainder) = match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.to_lowercase() != first =>
        {
            (first, rest)
        }
        _ => (DOCKER_HUB, name),
    };
    let domain = if domain == LEGACY_DOCKER_HUB {
        DOCKER_HUB
    } else {
        domain
    };
    (domain.to_string(), remainder)
}

/// `host[:port]`, host a DNS name, an IPv4 address or `[IPv6]`.
fn valid_domain(d: &str) -> bool {
    let (host, port) = if let Some(rest) = d.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return false;
        };
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after {
            "" => return true,
            p => match p.strip_prefix(':') {
                Some(port) => ("", Some(port)),
                None => return false,
            },
        }
    } else {
        match d.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (d, None),
        }
    };
    if let Some(p) = port {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
    }
    if d.starts_with('[') {
        return true;
    }
    !host.is_empty()
        && host.split('.').all(|c| {
            let b = c.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|&x| x.is_ascii_alphanumeric() || x == b'-')
        })
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*`
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: `.`, `_`, `__` or any number of `-`.
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return false;
        }
    }
    true
}

/// `[\w][\w.-]{0,127}`
fn valid_tag(t: &str) -> bool {
    let word = |x: u8| x.is_ascii_alphanumeric() || x == b'_';
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && word(b[0])
        && b.iter().all(|&x| word(x) || x == b'.' || x == b'-')
}

/// Checks a digest string (`sha256:<64 hex>` or `sha512:<128 hex>`) and returns it.
pub(crate) fn parse_digest(d: &str) -> Result<String, ImageError> {
    let (alg, hex) = d
        .split_once(':')
        .ok_or_else(|| ImageError::invalid_reference(None))?;
    let want = match alg {
        "sha256" => 64,
        "sha512" => 128,
        _ if !alg.is_empty() && alg.bytes().all(|b| b.is_ascii_alphanumeric()) => {
            return Err(ImageError::Invalid(format!(
                "unsupported digest algorithm: {alg}"
            )))
        }
        _ => return Err(ImageError::invalid_reference(None)),
    };
    if hex.len() < 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ImageError::invalid_reference(None));
    }
    if hex.len() != want {
        return Err(ImageError::Invalid(
            "invalid checksum digest length".to_string(),
        ));
    }
    if hex.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(ImageError::Invalid(
            "invalid checksum digest format".to_string(),
        ));
    }
    Ok(d.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4";

    /// Docker's normalisation table (`distribution/reference` normalize_test.go and the
    /// `docker pull` documentation).
    #[test]
    fn normalises_as_docker() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "busybox",
                "docker.io/library/busybox:latest",
                "busybox:latest",
            ),
            (
                "busybox:1.36",
                "docker.io/library/busybox:1.36",
                "busybox:1.36",
            ),
            (
                "library/busybox",
                "docker.io/library/busybox:latest",
                "busybox:latest",
            ),
            (
                "docker.io/busybox",
                "docker.io/library/busybox:latest",
                "busybox:latest",
            ),
            (
                "index.docker.io/library/busybox",
                "docker.io/library/busybox:latest",
                "busybox:latest",
            ),
            (
                "dmcgowan/myapp",
                "docker.io/dmcgowan/myapp:latest",
                "dmcgowan/myapp:latest",
            ),
            (
                "dmcgowan/myapp/sub",
                "docker.io/dmcgowan/myapp/sub:latest",
                "dmcgowan/myapp/sub:latest",
            ),
            (
                "docker.io/library/a/b",
                "docker.io/library/a/b:latest",
                "library/a/b:latest",
            ),
            (
                "localhost/app",
                "localhost/app:latest",
                "localhost/app:latest",
            ),
            (
                "localhost:5000/app:1",
                "localhost:5000/app:1",
                "localhost:5000/app:1",
            ),
            (
                "127.0.0.1:5000/app:1",
                "127.0.0.1:5000/app:1",
                "127.0.0.1:5000/app:1",
            ),
            (
                "registry.example.com/team/app",
                "registry.example.com/team/app:latest",
                "registry.example.com/team/app:latest",
            ),
            (
                "Docker.example:5000/app",
                "Docker.example:5000/app:latest",
                "Docker.example:5000/app:latest",
            ),
            (
                "[::1]:5000/app:v2",
                "[::1]:5000/app:v2",
                "[::1]:5000/app:v2",
            ),
            (
                "foo-bar.com:8080/a-b__c.d:T_a.g-1",
                "foo-bar.com:8080/a-b__c.d:T_a.g-1",
                "foo-bar.com:8080/a-b__c.d:T_a.g-1",
            ),
        ];
        for (input, full, familiar) in cases {
            let r = Reference::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.to_string(), *full, "{input}");
            assert_eq!(r.familiar(), *familiar, "{input}");
        }
    }

    #[test]
    fn digests_pin_without_a_default_tag() {
        let r = Reference::parse(&format!("busybox@{D}")).unwrap();
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest(), Some(D));
        assert_eq!(r.to_string(), format!("docker.io/library/busybox@{D}"));
        assert_eq!(r.familiar(), format!("busybox@{D}"));

        let r = Reference::parse(&format!("127.0.0.1:5000/app:1@{D}")).unwrap();
        assert_eq!(r.tag(), Some("1"));
        assert_eq!(r.digest(), Some(D));
        assert_eq!(r.to_string(), format!("127.0.0.1:5000/app:1@{D}"));

        let pinned = Reference::parse("busybox").unwrap().with_digest(D);
        assert_eq!(
            pinned.to_string(),
            format!("docker.io/library/busybox:latest@{D}")
        );
        assert_eq!(Reference::parse(&pinned.to_string()).unwrap(), pinned);
        assert_eq!(
            pinned.without_tag().to_string(),
            format!("docker.io/library/busybox@{D}")
        );
    }

    #[test]
    fn refuses_what_docker_refuses() {
        let invalid = "invalid reference format";
        let lower = "invalid reference format: repository name must be lowercase";
        let cases: &[(&str, &str)] = &[
            ("", invalid),
            ("Busybox", lower),
            ("docker.io/Library/busybox", lower),
            ("busybox:", invalid),
            ("busybox:-tag", invalid),
            ("busybox::1", invalid),
            ("-busybox", invalid),
            ("busy--box_", invalid),
            ("a//b", invalid),
            ("a/b/", invalid),
            ("busybox@sha256:abc", invalid),
            ("busybox@", invalid),
            ("host:port/app", invalid),
            ("[::1/app", invalid),
            ("a..b.com/app", invalid),
            ("busybox:tag with space", invalid),
            ("foo_bar.com:8080/app", invalid),
        ];
        for (input, msg) in cases {
            match Reference::parse(input) {
                Ok(r) => panic!("{input:?} parsed as {r}"),
                Err(e) => {
                    assert!(matches!(e, ImageError::Invalid(_)), "{input}: {e:?}");
                    assert_eq!(e.to_string(), *msg, "{input:?}");
                }
            }
        }
        let long = format!("a/{}", "b".repeat(260));
        assert!(Reference::parse(&long)
            .unwrap_err()
            .to_string()
            .contains("255 characters"));
        let hex = &D["sha256:".len()..];
        assert!(Reference::parse(hex)
            .unwrap_err()
            .to_string()
            .contains("cannot specify 64-byte hexadecimal strings"));
        let short = format!("busybox@sha256:{}", &hex[..40]);
        assert_eq!(
            Reference::parse(&short).unwrap_err().to_string(),
            "invalid checksum digest length"
        );
    }
}
