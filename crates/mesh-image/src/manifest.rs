//! The JSON documents of an image: Docker schema 2 manifests and manifest lists, OCI
//! manifests and indexes (one shape each, they differ only in media types), and the image
//! config, of which the store keeps what a task needs ([`ImageConfig`]) and `rootfs.diff_ids`.

use serde::{Deserialize, Serialize};

use crate::error::ImageError;

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Every manifest type a pull accepts.
pub const ACCEPTED: &[&str] = &[
    OCI_INDEX,
    DOCKER_MANIFEST_LIST,
    OCI_MANIFEST,
    DOCKER_MANIFEST,
];

/// Layer media types that can be unpacked (compression is detected from the content).
const LAYER_TYPES: &[&str] = &[
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

/// A content descriptor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

/// An index entry's platform.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// A manifest or an index: which one is told by `mediaType`, or by the fields present.
#[derive(Debug, Clone, Deserialize)]
struct AnyManifest {
    #[serde(rename = "schemaVersion", default)]
    schema_version: i64,
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
}

/// A parsed manifest document.
#[derive(Debug, Clone)]
pub enum Parsed {
    /// An image manifest: its config and its layers, base first.
    Image {
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
    /// An index or manifest list.
    Index { manifests: Vec<Descriptor> },
}

/// Parses a manifest or index.
pub fn parse(body: &[u8], header_type: Option<&str>) -> Result<Parsed, ImageError> {
    let m: AnyManifest = serde_json::from_slice(body)
        .map_err(|e| ImageError::Invalid(format!("invalid manifest: {e}")))?;
    if m.schema_version != 2 {
        return Err(ImageError::Invalid(format!(
            "unsupported manifest schema version {} (schema 1 images are not supported)",
            m.schema_version
        )));
    }
    let media = m.media_type.as_deref().or(header_type).unwrap_or("");
    let is_index = media == OCI_INDEX
        || media == DOCKER_MANIFEST_LIST
        || (media.is_empty() && m.manifests.is_some());
    if is_index {
        return Ok(Parsed::Index {
            manifests: m.manifests.unwrap_or_default(),
        });
    }
    if !(media == OCI_MANIFEST || media == DOCKER_MANIFEST || media.is_empty()) {
        return Err(ImageError::Invalid(format!(
            "unsupported manifest media type: {media}"
        )));
    }
    let config = m
        .config
        .ok_or_else(|| ImageError::Invalid("invalid manifest: no config".to_string()))?;
    let layers = m.layers.unwrap_or_default();
    for l in &layers {
        if !LAYER_TYPES.contains(&l.media_type.as_str()) {
            return Err(ImageError::Invalid(format!(
                "unsupported layer media type: {}",
                l.media_type
            )));
        }
    }
    Ok(Parsed::Image { config, layers })
}

/// The linux/amd64 entry of an index (Docker's default platform for this node).
pub fn pick_platform(manifests: &[Descriptor]) -> Option<&Descriptor> {
    manifests.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    })
}

/// What a task needs from an image's config.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
    pub stop_signal: Option<String>,
    pub exposed_ports: Vec<String>,
    /// The image's HEALTHCHECK.
    #[serde(default)]
    pub healthcheck: Option<Healthcheck>,
}

/// An image's HEALTHCHECK as its config holds it (Docker's `HealthConfig`: durations in
/// nanoseconds, zero for "inherit the default").
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct Healthcheck {
    #[serde(default)]
    pub test: Vec<String>,
    #[serde(default)]
    pub interval: u64,
    #[serde(default)]
    pub timeout: u64,
    #[serde(default)]
    pub start_period: u64,
    #[serde(default)]
    pub retries: u64,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    #[serde(default)]
    created: Option<String>,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: Option<RawRunConfig>,
    rootfs: RawRootfs,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawRunConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    stop_signal: Option<String>,
    #[serde(default)]
    exposed_ports: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    healthcheck: Option<Healthcheck>,
}

#[derive(Debug, Deserialize)]
struct RawRootfs {
    #[serde(rename = "type")]
    kind: String,
    diff_ids: Vec<String>,
}

/// An image config as the store reads it.
#[derive(Debug, Clone)]
pub struct ParsedConfig {
    pub config: ImageConfig,
    pub created: Option<String>,
    pub diff_ids: Vec<String>,
}

/// Parses an image config blob.
pub fn parse_config(body: &[u8]) -> Result<ParsedConfig, ImageError> {
    let raw: RawConfig = serde_json::from_slice(body)
        .map_err(|e| ImageError::Invalid(format!("invalid image config: {e}")))?;
    if raw.rootfs.kind != "layers" {
        return Err(ImageError::Invalid(format!(
            "invalid image config: rootfs type {}",
            raw.rootfs.kind
        )));
    }
    if (!raw.os.is_empty() && raw.os != "linux")
        || (!raw.architecture.is_empty() && raw.architecture != "amd64")
    {
        return Err(ImageError::Invalid(format!(
            "image operating system \"{}/{}\" cannot be used on this platform (linux/amd64)",
            raw.os, raw.architecture
        )));
    }
    for d in &raw.rootfs.diff_ids {
        crate::digest::sha256_hex(d)?;
    }
    let rc = raw.config.unwrap_or_default();
    let mut ports: Vec<String> = rc
        .exposed_ports
        .unwrap_or_default()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    ports.sort();
    Ok(ParsedConfig {
        config: ImageConfig {
            entrypoint: rc.entrypoint.unwrap_or_default(),
            cmd: rc.cmd.unwrap_or_default(),
            env: rc.env.unwrap_or_default(),
            working_dir: rc.working_dir.unwrap_or_default(),
            user: rc.user.unwrap_or_default(),
            stop_signal: rc.stop_signal.filter(|s| !s.is_empty()),
            exposed_ports: ports,
            healthcheck: rc.healthcheck,
        },
        created: raw.created,
        diff_ids: raw.rootfs.diff_ids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_docker_and_oci_documents() {
        let d = "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4";
        let list = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST_LIST}","manifests":[
            {{"mediaType":"{DOCKER_MANIFEST}","digest":"sha256:1","size":1,"platform":{{"architecture":"arm64","os":"linux"}}}},
            {{"mediaType":"{DOCKER_MANIFEST}","digest":"{d}","size":1,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        );
        let Parsed::Index { manifests } = parse(list.as_bytes(), None).unwrap() else {
            panic!("not an index")
        };
        assert_eq!(pick_platform(&manifests).unwrap().digest, d);

        let oci = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{d}","size":2}},
            "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+zstd","digest":"{d}","size":3}}]}}"#
        );
        let Parsed::Image { layers, .. } = parse(oci.as_bytes(), Some(OCI_MANIFEST)).unwrap()
        else {
            panic!("not an image")
        };
        assert_eq!(layers.len(), 1);

        let v1 = br#"{"schemaVersion":1,"name":"x"}"#;
        assert!(parse(v1, None)
            .unwrap_err()
            .to_string()
            .contains("schema 1"));

        let cfg = format!(
            r#"{{"architecture":"amd64","os":"linux","created":"2024-01-01T00:00:00Z",
            "config":{{"Entrypoint":["/bin/sh","-c"],"Cmd":["echo hi"],"Env":["PATH=/bin"],"WorkingDir":"/w",
            "User":"1000","StopSignal":"SIGQUIT","ExposedPorts":{{"80/tcp":{{}},"53/udp":{{}}}}}},
            "rootfs":{{"type":"layers","diff_ids":["{d}"]}}}}"#
        );
        let p = parse_config(cfg.as_bytes()).unwrap();
        assert_eq!(p.config.entrypoint, ["/bin/sh", "-c"]);
        assert_eq!(p.config.exposed_ports, ["53/udp", "80/tcp"]);
        assert_eq!(p.config.stop_signal.as_deref(), Some("SIGQUIT"));
        assert_eq!(p.diff_ids, [d]);
        assert_eq!(p.config.healthcheck, None);
    }

    #[test]
    fn reads_the_image_s_healthcheck() {
        let d = "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4";
        let cfg = format!(
            r#"{{"architecture":"amd64","os":"linux",
            "config":{{"Healthcheck":{{"Test":["CMD-SHELL","wget -q localhost"],"Interval":5000000000,"Retries":2}}}},
            "rootfs":{{"type":"layers","diff_ids":["{d}"]}}}}"#
        );
        let h = parse_config(cfg.as_bytes())
            .unwrap()
            .config
            .healthcheck
            .unwrap();
        assert_eq!(h.test, ["CMD-SHELL", "wget -q localhost"]);
        assert_eq!((h.interval, h.timeout, h.retries), (5_000_000_000, 0, 2));
    }
}
