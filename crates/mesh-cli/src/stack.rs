//! `mesh stack deploy | ls | services | ps | rm`: compose files (read by `mesh-compose`)
//! deployed as Docker's `docker stack` does. Objects are named `STACK_key` and labelled
//! `com.docker.stack.namespace=STACK`; that label is how `ls`, `services`, `ps`, `rm` and
//! `deploy --prune` find a stack's objects. A redeploy creates what is new and replaces the
//! spec (`ServiceReplace`, at the version read) only of the services whose spec changed, so
//! the others keep their tasks.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Subcommand, ValueEnum};
use mesh_api::{Blob, BlobKind, ClusterObjects, Request, Service, ServiceSpec};
use mesh_compose::{Stack, NAMESPACE_LABEL};
use serde_json::json;

use crate::client::Client;
use crate::service::{print_services, print_tasks};
use crate::{table, Failure, Format, Result};

#[derive(Subcommand, Debug)]
pub enum StackCmd {
    /// Deploy a new stack or update an existing stack.
    #[command(alias = "up")]
    Deploy {
        /// Path to a compose file (repeat to merge several, later ones override).
        #[arg(short = 'c', long = "compose-file", required = true)]
        files: Vec<PathBuf>,
        /// Prune services that are no longer referenced.
        #[arg(long)]
        prune: bool,
        /// Query the registry to resolve image digest and supported platforms.
        #[arg(long, value_enum, default_value = "always")]
        resolve_image: ResolveImage,
        /// Send this node's registry login (`mesh login`) to the nodes that pull the images.
        #[arg(long)]
        with_registry_auth: bool,
        /// The stack's name.
        name: String,
    },
    /// List stacks.
    #[command(alias = "list")]
    Ls(crate::FormatArg),
    /// List the services in the stack.
    Services {
        #[command(flatten)]
        list: crate::ListArgs,
        /// The stack.
        name: String,
    },
    /// List the tasks in the stack.
    Ps {
        #[command(flatten)]
        list: crate::ListArgs,
        /// Do not truncate output.
        #[arg(long)]
        no_trunc: bool,
        /// The stack.
        name: String,
    },
    /// Remove one or more stacks.
    #[command(aliases = ["remove", "down"])]
    Rm {
        /// Do not wait for the stack's tasks to be gone.
        #[arg(short, long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
        detach: bool,
        /// Stacks.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

/// Docker's `--resolve-image`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ResolveImage {
    /// Ask the registry for the tag's digest at every deploy: a moved tag rolls the service.
    Always,
    /// Ask only when the image named in the file changed.
    Changed,
    /// Never ask: an unchanged name keeps the digest the service runs.
    Never,
}

pub fn run(c: &Client, cmd: StackCmd) -> Result<()> {
    match cmd {
        StackCmd::Deploy {
            files,
            prune,
            resolve_image,
            with_registry_auth,
            name,
        } => {
            let stack =
                mesh_compose::load_files(&files, &name).map_err(|e| Failure(e.to_string()))?;
            let auth = with_registry_auth.then_some(mesh_api::RegistryAuth::NodeLogin);
            deploy(c, &stack, prune, resolve_image, auth)
        }
        StackCmd::Ls(f) => ls(c, &f.format),
        StackCmd::Services { list, name } => {
            // The stack's services are those with its namespace label, as Docker's CLI
            // asks for them.
            let mut filters = list.filters()?;
            filters.check_services().map_err(Failure)?;
            let any = c.call(Request::ServiceLs {
                filters: namespace_filter(&name),
            })?;
            if any.as_array().is_none_or(|a| a.is_empty()) {
                // Docker says so on stderr and exits 0.
                eprintln!("Nothing found in stack: {name}");
                return Ok(());
            }
            filters.add("label", format!("{NAMESPACE_LABEL}={name}"));
            let v = c.call(Request::ServiceLs { filters })?;
            let rows = v.as_array().cloned().unwrap_or_default();
            print_services(&rows, &list.format, list.quiet)
        }
        StackCmd::Ps {
            list,
            no_trunc,
            name,
        } => {
            let mut filters = list.filters()?;
            filters.check_tasks().map_err(Failure)?;
            let any = c.call(Request::ServiceLs {
                filters: namespace_filter(&name),
            })?;
            if any.as_array().is_none_or(|a| a.is_empty()) {
                return Err(Failure(format!("nothing found in stack: {name}")));
            }
            filters.add("label", format!("{NAMESPACE_LABEL}={name}"));
            let v = c.call(Request::TaskLs { filters })?;
            let rows = v.as_array().cloned().unwrap_or_default();
            print_tasks(&rows, &list.format, list.quiet, no_trunc)
        }
        StackCmd::Rm { detach, names } => {
            let mut failed = false;
            for name in names {
                failed |= !rm(c, &name, detach)?;
            }
            if failed {
                return Err(Failure(
                    "failed to remove some resources from the stack".into(),
                ));
            }
            Ok(())
        }
    }
}

/// The filter picking a stack's objects: its namespace label.
fn namespace_filter(stack: &str) -> mesh_api::Filters {
    let mut f = mesh_api::Filters::default();
    f.add("label", format!("{NAMESPACE_LABEL}={stack}"));
    f
}

fn objects(c: &Client) -> Result<ClusterObjects> {
    let v = c.call(Request::Objects { service: None })?;
    Ok(serde_json::from_value(v)?)
}

fn labelled(labels: &BTreeMap<String, String>, stack: &str) -> bool {
    labels.get(NAMESPACE_LABEL).is_some_and(|n| n == stack)
}

fn in_stack<'a>(services: &'a [Service], stack: &'a str) -> impl Iterator<Item = &'a Service> {
    services
        .iter()
        .filter(move |s| labelled(&s.spec.labels, stack))
}

/// The secrets or configs the daemon holds; `None` when it cannot list them (a daemon
/// without secrets and configs yet), which only matters if the stack has some.
fn blobs(c: &Client, kind: BlobKind) -> Option<Vec<Blob>> {
    let v = c
        .call(Request::BlobLs {
            kind,
            filters: Default::default(),
        })
        .ok()?;
    serde_json::from_value(v).ok()
}

fn deploy(
    c: &Client,
    stack: &Stack,
    prune: bool,
    resolve: ResolveImage,
    registry_auth: Option<mesh_api::RegistryAuth>,
) -> Result<()> {
    for w in &stack.warnings {
        eprintln!("{w}\n");
    }
    let ns = &stack.namespace;
    let o = objects(c)?;
    // Everything external must exist before anything is created.
    for n in stack.networks.iter().filter(|n| n.external) {
        if !o.networks.iter().any(|x| x.spec.name == n.spec.name) {
            return Err(Failure(format!(
                "network {:?} is declared as external, but could not be found. You need to create a swarm-scoped network before the stack is deployed",
                n.spec.name
            )));
        }
    }
    for (kind, list) in [
        (BlobKind::Secret, &stack.secrets),
        (BlobKind::Config, &stack.configs),
    ] {
        if list.is_empty() {
            continue;
        }
        let have = match blobs(c, kind) {
            Some(h) => h,
            None => {
                // Let the daemon say why it cannot list them.
                c.call(Request::BlobLs {
                    kind,
                    filters: Default::default(),
                })?;
                Vec::new()
            }
        };
        for b in list {
            let exists = have.iter().any(|h| h.spec.name == b.spec.name);
            if b.external {
                if !exists {
                    return Err(Failure(format!(
                        "{kind} not found: {} (declared as external)",
                        b.spec.name
                    )));
                }
                continue;
            }
            if exists {
                // Docker would update its labels; the data of a secret or config cannot change.
                continue;
            }
            println!("Creating {kind} {}", b.spec.name);
            c.call(Request::BlobCreate {
                kind,
                spec: b.spec.clone(),
            })?;
        }
    }
    for n in stack.networks.iter().filter(|n| !n.external) {
        if o.networks.iter().any(|x| x.spec.name == n.spec.name) {
            continue;
        }
        println!("Creating network {}", n.spec.name);
        c.call(Request::NetworkCreate {
            spec: n.spec.clone(),
        })?;
    }
    let mut resolved = BTreeMap::new();
    for spec in &stack.services {
        match o.services.iter().find(|s| s.spec.name == spec.name) {
            Some(old) => {
                let mut spec = spec.clone();
                carry_over(c, &mut spec, old, resolve, &mut resolved);
                if same(&spec, &old.spec) {
                    continue;
                }
                println!("Updating service {} (id: {})", spec.name, old.id);
                let v: mesh_api::IdAnswer = c.call_as(Request::ServiceReplace {
                    service: old.id.clone(),
                    version: old.version,
                    spec,
                    rollback: false,
                    registry_auth: registry_auth.clone(),
                })?;
                crate::service::print_warnings(&v);
            }
            None => {
                println!("Creating service {}", spec.name);
                let v: mesh_api::IdAnswer = c.call_as(Request::ServiceCreate {
                    spec: spec.clone(),
                    registry_auth: registry_auth.clone(),
                })?;
                crate::service::print_warnings(&v);
            }
        }
    }
    if prune {
        let keep: BTreeSet<&str> = stack.services.iter().map(|s| s.name.as_str()).collect();
        for s in in_stack(&o.services, ns) {
            if !keep.contains(s.spec.name.as_str()) {
                println!("Removing service {}", s.spec.name);
                c.call(Request::ServiceRm {
                    service: s.id.clone(),
                })?;
            }
        }
    }
    Ok(())
}

/// `name:tag` without the registry's default prefixes, with `:latest` when no tag or digest.
fn familiar(image: &str) -> String {
    let f = mesh_api::familiar_image(image);
    let last = f.rsplit('/').next().unwrap_or(&f);
    if last.contains(':') {
        f
    } else {
        format!("{f}:latest")
    }
}

/// What the daemon filled in when it stored the service (the image's digest, assigned
/// published ports, secret and config IDs, the force counter) is carried over to the new
/// spec where the file asks for the same thing, so an unchanged service compares equal and
/// keeps its tasks.
fn carry_over(
    c: &Client,
    spec: &mut ServiceSpec,
    old: &Service,
    resolve: ResolveImage,
    resolved: &mut BTreeMap<String, Option<String>>,
) {
    let prev = &old.spec;
    if !spec.image.is_empty() && familiar(&spec.image) == familiar(&prev.image) {
        let keep = match resolve {
            ResolveImage::Never | ResolveImage::Changed => true,
            ResolveImage::Always => {
                let digest = resolved
                    .entry(spec.image.clone())
                    .or_insert_with(|| {
                        c.call(Request::ImageResolve {
                            reference: spec.image.clone(),
                        })
                        .ok()
                        .and_then(|v| v["digest"].as_str().map(str::to_string))
                    })
                    .clone();
                // A registry that does not answer keeps the digest the service runs.
                digest.is_none_or(|d| prev.image.ends_with(&format!("@{d}")))
            }
        };
        if keep {
            spec.image = prev.image.clone();
        }
    }
    for p in spec.ports.iter_mut().filter(|p| p.published == 0) {
        if let Some(q) = prev
            .ports
            .iter()
            .find(|q| q.target == p.target && q.protocol == p.protocol && q.mode == p.mode)
        {
            p.published = q.published;
        }
    }
    for (new, old) in [
        (&mut spec.secrets, &prev.secrets),
        (&mut spec.configs, &prev.configs),
    ] {
        for r in new.iter_mut() {
            if let Some(o) = old
                .iter()
                .find(|o| o.source == r.source && o.target == r.target)
            {
                r.id = o.id.clone();
            }
        }
    }
    spec.force_update = prev.force_update;
    if spec.platforms.is_empty() {
        spec.platforms = prev.platforms.clone();
    }
}

/// Whether two specs ask for the same thing.
fn same(new: &ServiceSpec, old: &ServiceSpec) -> bool {
    new == old
}

fn ls(c: &Client, format: &Format) -> Result<()> {
    let o = objects(c)?;
    let mut stacks: BTreeMap<String, usize> = BTreeMap::new();
    for s in &o.services {
        if let Some(ns) = s.spec.labels.get(NAMESPACE_LABEL) {
            *stacks.entry(ns.clone()).or_default() += 1;
        }
    }
    let rows: Vec<crate::format::Row> = stacks
        .iter()
        .map(|(n, k)| crate::row(json!({"Name": n, "Services": k.to_string()})))
        .collect();
    crate::format::print(format, false, crate::format::STACK, &rows, &[], || {
        let rows = stacks
            .iter()
            .map(|(n, k)| vec![n.clone(), k.to_string()])
            .collect();
        table::print(&["NAME", "SERVICES"], rows);
    })
}

/// Removes a stack's services, then its secrets and configs (never external ones: they do
/// not carry the stack's label), then its networks, with Docker's lines. `false` when
/// something could not be removed (said on stderr).
fn rm(c: &Client, name: &str, detach: bool) -> Result<bool> {
    let o = objects(c)?;
    let mut services: Vec<&Service> = in_stack(&o.services, name).collect();
    services.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
    let mut blobs_of = Vec::new();
    for kind in [BlobKind::Secret, BlobKind::Config] {
        for b in blobs(c, kind).unwrap_or_default() {
            if labelled(&b.spec.labels, name) {
                blobs_of.push(b);
            }
        }
    }
    let mut networks: Vec<_> = o
        .networks
        .iter()
        .filter(|n| labelled(&n.spec.labels, name))
        .collect();
    networks.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
    if services.is_empty() && blobs_of.is_empty() && networks.is_empty() {
        eprintln!("Nothing found in stack: {name}");
        return Ok(true);
    }
    let mut ok = true;
    for s in &services {
        println!("Removing service {}", s.spec.name);
        if let Err(Failure(e)) = c.call(Request::ServiceRm {
            service: s.id.clone(),
        }) {
            eprintln!("Failed to remove service {}: {e}", s.spec.name);
            ok = false;
        }
    }
    for b in &blobs_of {
        println!("Removing {} {}", b.kind, b.spec.name);
        if let Err(Failure(e)) = c.call(Request::BlobRm {
            kind: b.kind,
            name: b.id.clone(),
        }) {
            eprintln!("Failed to remove {} {}: {e}", b.kind, b.spec.name);
            ok = false;
        }
    }
    for n in &networks {
        println!("Removing network {}", n.spec.name);
        if let Err(Failure(e)) = c.call(Request::NetworkRm {
            network: n.id.clone(),
        }) {
            eprintln!("Failed to remove network {}: {e}", n.spec.name);
            ok = false;
        }
    }
    if !detach {
        let ids: BTreeSet<&str> = services.iter().map(|s| s.id.as_str()).collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let o = objects(c)?;
            if !o.tasks.iter().any(|t| ids.contains(t.service_id.as_str())) {
                break;
            }
            if Instant::now() > deadline {
                return Err(Failure(format!(
                    "the tasks of stack {name} were not gone within 60s"
                )));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_compare_by_familiar_name_and_tag() {
        assert_eq!(familiar("nginx"), "nginx:latest");
        assert_eq!(
            familiar("docker.io/library/nginx:latest@sha256:abc"),
            "nginx:latest"
        );
        assert_eq!(familiar("127.0.0.1:5000/web:v1"), "127.0.0.1:5000/web:v1");
        assert_eq!(familiar("127.0.0.1:5000/web"), "127.0.0.1:5000/web:latest");
    }

    fn stored(spec: &ServiceSpec) -> Service {
        let mut spec = spec.clone();
        spec.image = "docker.io/library/nginx:1.25@sha256:abc".into();
        spec.ports[0].published = 30001;
        spec.secrets[0].id = "secretid".into();
        Service {
            id: "svcid".into(),
            spec,
            previous_spec: None,
            version: 3,
            created_at: 0,
            updated_at: 0,
            update_status: None,
            vips: Vec::new(),
            registry_auth: Vec::new(),
        }
    }

    fn from_file(env: &str) -> ServiceSpec {
        let text = format!(
            "services:\n  web:\n    image: nginx:1.25\n    ports: [\"80\"]\n    environment: [{env}]\n    secrets: [pw]\nsecrets:\n  pw:\n    external: true\n"
        );
        let s = mesh_compose::load(
            &[mesh_compose::Source {
                name: "c.yml".into(),
                text,
            }],
            &mesh_compose::Options {
                namespace: "st".into(),
                ..Default::default()
            },
        )
        .unwrap();
        s.services[0].clone()
    }

    #[test]
    fn an_unchanged_service_compares_equal_to_what_the_daemon_stored() {
        // No daemon: `always` cannot resolve, and keeps the digest the service runs.
        let c = Client::new("unix:///nonexistent/meshd.sock").unwrap();
        let old = stored(&from_file("A=1"));
        for resolve in [
            ResolveImage::Always,
            ResolveImage::Changed,
            ResolveImage::Never,
        ] {
            let mut spec = from_file("A=1");
            carry_over(&c, &mut spec, &old, resolve, &mut BTreeMap::new());
            assert!(same(&spec, &old.spec), "{resolve:?}: {spec:?}");
        }
        let mut spec = from_file("A=2");
        carry_over(
            &c,
            &mut spec,
            &old,
            ResolveImage::Never,
            &mut BTreeMap::new(),
        );
        assert!(!same(&spec, &old.spec));
        // A new tag is sent as written, for the daemon to pin.
        let mut spec = from_file("A=1");
        spec.image = "nginx:1.26".into();
        carry_over(
            &c,
            &mut spec,
            &old,
            ResolveImage::Never,
            &mut BTreeMap::new(),
        );
        assert_eq!(spec.image, "nginx:1.26");
        assert!(!same(&spec, &old.spec));
    }
}
