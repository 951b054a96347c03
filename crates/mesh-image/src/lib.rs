//! The node's image store: pulls OCI images (Docker schema 2 and OCI manifests and indexes,
//! linux/amd64) from registries with `oci-client`, checks every blob against its digest and
//! every layer against its config's `diff_ids`, unpacks each layer once into a directory that
//! serves as an overlayfs lower dir (whiteouts as 0/0 character devices, opaque directories
//! as `trusted.overlay.opaque=y`), shares layers between images, coalesces concurrent pulls,
//! collects garbage, and loads `docker save` and OCI archives.
//!
//! **Architecture Invariant**: knows images, registries and files; nothing of tasks,
//! services or mounts. Callers decide which images are in use ([`Store::prune`]'s `keep`).

#![forbid(unsafe_code)]

mod archive;
pub mod digest;
mod error;
mod fsutil;
mod init;
pub mod login;
pub mod manifest;
mod reference;
mod registry;
mod store;
pub mod unpack;

pub use error::ImageError;
pub use manifest::{Healthcheck, ImageConfig};
pub use reference::{Reference, DOCKER_HUB};
pub use store::{Credentials, Image, ImageSummary, PruneReport, RemoveReport, Store, StoreConfig};

#[cfg(test)]
mod tests {
    use super::*;

    /// The node agent keeps a `Store` in shared state and spawns its pulls on tokio.
    #[test]
    fn store_and_its_futures_are_send() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>(_: T) {}
        send_sync::<Store>();
        send_sync::<ImageError>();
        let store = Store::open(StoreConfig {
            root: std::env::temp_dir().join(format!("mesh-image-send-{}", std::process::id())),
            ..StoreConfig::default()
        })
        .unwrap();
        let r = Reference::parse("busybox").unwrap();
        send(store.pull(&r, None));
        send(store.resolve(&r, None));
        let _ = std::fs::remove_dir_all(store.root());
    }
}
