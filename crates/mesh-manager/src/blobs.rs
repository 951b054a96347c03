//! Secrets and configs in the store: lookups, the checks that keep services and their
//! secrets consistent (a service names only existing ones; one in use is not removed), what
//! a node is sent for its tasks, and the sealing of secret data.
//!
//! A secret's data is sealed again, on its own, under the managers' data key (see
//! `datakey`; the Raft store as a whole is sealed under it too), so that it stays sealed in
//! every snapshot and answer that carries the store's objects. Only the leader unseals, to
//! send a node the secrets of the tasks assigned to it (over mutual TLS); workers keep them
//! in memory and in the tasks' tmpfs only. Configs are stored as given.

use std::collections::{BTreeMap, BTreeSet};

use crate::datakey::DataKey;
use crate::state::{StateError, StoreState};
use mesh_api::{ApiError, Blob, BlobKind, BlobReference, ServiceSpec, Task, TaskState};

impl StoreState {
    /// A secret or config by ID, name or unique ID prefix.
    pub fn find_blob(&self, kind: BlobKind, key: &str) -> Result<&Blob, StateError> {
        let of_kind = || self.blobs.values().filter(move |b| b.kind == kind);
        if let Some(b) = self.blobs.get(key).filter(|b| b.kind == kind) {
            return Ok(b);
        }
        if let Some(b) = of_kind().find(|b| b.spec.name == key) {
            return Ok(b);
        }
        let by_prefix: Vec<&Blob> = of_kind()
            .filter(|b| !key.is_empty() && b.id.starts_with(key))
            .collect();
        match by_prefix.len() {
            1 => Ok(by_prefix[0]),
            0 => Err(StateError::NotFound(format!("{kind} {key} not found"))),
            n => Err(StateError::Invalid(format!(
                "{kind} {key} is ambiguous ({n} matches)"
            ))),
        }
    }
}

fn refs(spec: &ServiceSpec, kind: BlobKind) -> &[BlobReference] {
    match kind {
        BlobKind::Secret => &spec.secrets,
        BlobKind::Config => &spec.configs,
    }
}

/// Refused while a service uses it, as Docker words it.
pub fn check_unused(state: &StoreState, blob: &Blob) -> Result<(), String> {
    let users: Vec<&str> = state
        .services
        .values()
        .filter(|s| refs(&s.spec, blob.kind).iter().any(|r| r.id == blob.id))
        .map(|s| s.spec.name.as_str())
        .collect();
    match users.len() {
        0 => Ok(()),
        1 => Err(format!(
            "{} '{}' is in use by the following service: {}",
            blob.kind, blob.spec.name, users[0]
        )),
        _ => Err(format!(
            "{} '{}' is in use by the following services: {}",
            blob.kind,
            blob.spec.name,
            users.join(", ")
        )),
    }
}

/// At apply time: every reference names an existing secret or config of its kind.
pub fn check_references(state: &StoreState, spec: &ServiceSpec) -> Result<(), String> {
    for kind in [BlobKind::Secret, BlobKind::Config] {
        for r in refs(spec, kind) {
            if !state.blobs.get(&r.id).is_some_and(|b| b.kind == kind) {
                return Err(format!("{kind} not found: {}", r.source));
            }
        }
    }
    Ok(())
}

/// At create and update: the references' IDs from their names (a reference whose ID names
/// an existing object keeps it, as the Engine API sends both), defaults filled in, and
/// Docker's checks: known names, no two files at one target, an image to mount them in.
pub fn resolve_references(state: &StoreState, spec: &mut ServiceSpec) -> Result<(), ApiError> {
    let image = !spec.image.is_empty();
    for kind in [BlobKind::Secret, BlobKind::Config] {
        let list = match kind {
            BlobKind::Secret => &mut spec.secrets,
            BlobKind::Config => &mut spec.configs,
        };
        if !list.is_empty() && !image {
            return Err(ApiError::invalid(format!(
                "{kind}s are mounted in an image's filesystem: a service without an image (a host process) cannot use them"
            )));
        }
        let mut targets = BTreeSet::new();
        for r in list.iter_mut() {
            r.complete(kind).map_err(ApiError::invalid)?;
            let found = state
                .blobs
                .get(&r.id)
                .filter(|b| b.kind == kind)
                .or_else(|| {
                    state
                        .blobs
                        .values()
                        .find(|b| b.kind == kind && b.spec.name == r.source)
                })
                .ok_or_else(|| ApiError::not_found(format!("{kind} not found: {}", r.source)))?;
            r.id = found.id.clone();
            r.source = found.spec.name.clone();
            if !targets.insert(r.path(kind)) {
                return Err(ApiError::invalid(format!(
                    "duplicate {kind} target for {} not allowed",
                    r.source
                )));
            }
        }
    }
    Ok(())
}

/// The IDs of the secrets and configs that the node's tasks still to run or running need.
pub fn needed_by<'a>(tasks: impl Iterator<Item = &'a Task>) -> BTreeSet<String> {
    tasks
        .filter(|t| t.desired_state <= TaskState::Running && !t.status.state.is_terminal())
        .flat_map(|t| t.spec.secrets.iter().chain(&t.spec.configs))
        .map(|r| r.id.clone())
        .collect()
}

/// A secret or config as the API shows it: a secret without its data.
pub fn public(b: &Blob) -> Blob {
    let mut b = b.clone();
    if b.kind == BlobKind::Secret {
        b.spec.data.clear();
    }
    b
}

/// The data of the given secrets and configs, secrets unsealed: what a node is sent.
pub fn payload(
    state: &StoreState,
    ids: &BTreeSet<String>,
    key: Option<&DataKey>,
) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let mut out = BTreeMap::new();
    for id in ids {
        let Some(b) = state.blobs.get(id) else {
            continue;
        };
        let data = match b.kind {
            BlobKind::Config => b.spec.data.clone(),
            BlobKind::Secret => key
                .ok_or("this manager does not have the data key")?
                .unseal(&b.spec.data)?,
        };
        out.insert(id.clone(), data);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_api::BlobSpec;

    fn blob(id: &str, kind: BlobKind, name: &str) -> Blob {
        Blob {
            id: id.into(),
            kind,
            spec: BlobSpec {
                name: name.into(),
                labels: Default::default(),
                data: b"x".to_vec(),
            },
            version: 1,
            created_at: 0,
            updated_at: 0,
        }
    }

    #[test]
    fn references_resolve_by_name_and_are_checked() {
        let mut st = StoreState::default();
        st.blobs
            .insert("s1".into(), blob("s1", BlobKind::Secret, "db_pw"));
        st.blobs
            .insert("c1".into(), blob("c1", BlobKind::Config, "db_pw"));
        let mut spec = ServiceSpec {
            image: "busybox".into(),
            secrets: vec![BlobReference::parse(BlobKind::Secret, "db_pw").unwrap()],
            configs: vec![BlobReference::parse(BlobKind::Config, "db_pw").unwrap()],
            ..Default::default()
        };
        resolve_references(&st, &mut spec).unwrap();
        assert_eq!(spec.secrets[0].id, "s1");
        assert_eq!(spec.configs[0].id, "c1");
        assert!(check_references(&st, &spec).is_ok());

        let mut missing = spec.clone();
        missing.secrets[0] = BlobReference::parse(BlobKind::Secret, "nope").unwrap();
        let e = resolve_references(&st, &mut missing).unwrap_err();
        assert_eq!(e.message, "secret not found: nope");

        let mut twice = spec.clone();
        twice.secrets.push(twice.secrets[0].clone());
        assert!(resolve_references(&st, &mut twice)
            .unwrap_err()
            .message
            .starts_with("duplicate secret target"));

        let mut host = spec.clone();
        host.image.clear();
        assert!(resolve_references(&st, &mut host).is_err());

        st.services.insert(
            "svc".into(),
            mesh_api::Service {
                id: "svc".into(),
                spec: ServiceSpec {
                    name: "web".into(),
                    ..spec.clone()
                },
                previous_spec: None,
                version: 1,
                created_at: 0,
                updated_at: 0,
                update_status: None,
                vips: vec![],
                registry_auth: Vec::new(),
            },
        );
        let e = check_unused(&st, &st.blobs["s1"]).unwrap_err();
        assert_eq!(e, "secret 'db_pw' is in use by the following service: web");
        st.blobs.remove("s1");
        assert_eq!(
            check_references(&st, &spec).unwrap_err(),
            "secret not found: db_pw"
        );
    }

    #[test]
    fn lookups_by_name_id_and_prefix_stay_within_a_kind() {
        let mut st = StoreState::default();
        st.blobs
            .insert("s1xy".into(), blob("s1xy", BlobKind::Secret, "a"));
        st.blobs
            .insert("s2xy".into(), blob("s2xy", BlobKind::Config, "b"));
        assert_eq!(st.find_blob(BlobKind::Secret, "s1").unwrap().id, "s1xy");
        assert_eq!(st.find_blob(BlobKind::Secret, "s").unwrap().id, "s1xy");
        assert_eq!(st.find_blob(BlobKind::Config, "b").unwrap().id, "s2xy");
        assert!(st.find_blob(BlobKind::Config, "a").is_err());
        assert!(st.find_blob(BlobKind::Config, "s1xy").is_err());
        assert_eq!(
            st.find_blob(BlobKind::Secret, "zz").unwrap_err(),
            StateError::NotFound("secret zz not found".into())
        );
    }
}
