//! The merged compose tree to the stack's objects, as Docker's CLI converts them
//! (`cli/compose/convert`): every key is checked against what the section accepts, every
//! value against the type the field expects, and whatever mesh cannot honour is refused by
//! name rather than dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use mesh_api::{
    BlobKind, BlobReference, BlobSpec, EndpointMode, FailureAction, HealthConfig, Mount, MountType,
    NetworkSpec, PortConfig, Protocol, PublishMode, Resources, RestartCondition, RestartPolicy,
    RollbackConfig, ServiceMode, ServiceSpec, UpdateConfig, UpdateOrder,
};

use crate::yaml::{Node, Value};
use crate::{
    Error, Options, Stack, StackBlob, StackNetwork, StackVolume, IMAGE_LABEL, NAMESPACE_LABEL,
};

type R<T> = Result<T, Error>;

/// Service keys Docker's `stack deploy` ignores with a warning (its `UnsupportedProperties`
/// and deprecated ones, and `depends_on`, which Swarm has no use for).
const IGNORED_SERVICE_KEYS: &[&str] = &[
    "build",
    "cgroup_parent",
    "cgroupns_mode",
    "container_name",
    "depends_on",
    "devices",
    "domainname",
    "expose",
    "external_links",
    "ipc",
    "links",
    "mac_address",
    "network_mode",
    "pid",
    "privileged",
    "restart",
    "security_opt",
    "shm_size",
    "userns_mode",
];

/// Service keys of the compose file format that mesh has no equivalent for yet: refused.
const UNSUPPORTED_SERVICE_KEYS: &[&str] = &[
    "cap_add",
    "cap_drop",
    "credential_spec",
    "dns",
    "dns_opt",
    "dns_search",
    "extra_hosts",
    "isolation",
    "logging",
    "platform",
    "stdin_open",
    "sysctls",
    "tmpfs",
    "tty",
    "ulimits",
];

const SERVICE_KEYS: &[&str] = &[
    "image",
    "command",
    "entrypoint",
    "environment",
    "env_file",
    "ports",
    "networks",
    "volumes",
    "deploy",
    "healthcheck",
    "secrets",
    "configs",
    "hostname",
    "user",
    "working_dir",
    "stop_grace_period",
    "stop_signal",
    "init",
    "read_only",
    "labels",
];

struct Ctx<'a> {
    ns: &'a str,
    base_dir: &'a Path,
    env: &'a BTreeMap<String, String>,
    /// Declared key -> (real name, external).
    networks: BTreeMap<String, (NetworkSpec, bool)>,
    volumes: BTreeMap<String, StackVolume>,
    secrets: BTreeMap<String, StackBlob>,
    configs: BTreeMap<String, StackBlob>,
    ignored: BTreeSet<String>,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Checks a mapping's keys: `x-*` always passes, `known` keys pass, `unsupported` ones are
/// refused as not supported by mesh, anything else is unknown.
fn check_keys(n: &Node, path: &str, known: &[&str], unsupported: &[&str]) -> R<()> {
    if let Value::Map(entries) = &n.value {
        for (k, _) in entries {
            if k.text.starts_with("x-") || known.contains(&k.text.as_str()) {
                continue;
            }
            let msg = if unsupported.contains(&k.text.as_str()) {
                "not supported by mesh"
            } else {
                "unknown key (additional property not allowed)"
            };
            return Err(Error::at(&n.file, k.line, &join(path, &k.text), msg));
        }
    }
    Ok(())
}

fn type_err(n: &Node, path: &str, expected: &str) -> Error {
    n.err(
        path,
        format!("invalid type: {}, expected {expected}", n.describe()),
    )
}

fn map<'n>(n: &'n Node, path: &str) -> R<&'n [(crate::yaml::Key, Node)]> {
    match &n.value {
        Value::Map(e) => Ok(e),
        Value::Null => Ok(&[]),
        _ => Err(type_err(n, path, "a mapping")),
    }
}

fn string(n: &Node, path: &str) -> R<String> {
    match &n.value {
        Value::Str { text, .. } => Ok(text.clone()),
        _ => Err(type_err(n, path, "a string")),
    }
}

/// go-yaml's integers: decimal, `0x`, `0o` and a leading `0` for octal (so `mode: 0444`).
fn parse_int(s: &str) -> Option<i64> {
    let (neg, d) = match s.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let d = d.replace('_', "");
    let v = if let Some(h) = d.strip_prefix("0x") {
        i64::from_str_radix(h, 16).ok()?
    } else if let Some(o) = d.strip_prefix("0o") {
        i64::from_str_radix(o, 8).ok()?
    } else if d.len() > 1 && d.starts_with('0') {
        i64::from_str_radix(&d[1..], 8).ok()?
    } else {
        d.parse().ok()?
    };
    Some(if neg { -v } else { v })
}

fn int(n: &Node, path: &str) -> R<i64> {
    match &n.value {
        Value::Str { text, .. } => {
            parse_int(text.trim()).ok_or_else(|| type_err(n, path, "an integer"))
        }
        _ => Err(type_err(n, path, "an integer")),
    }
}

fn uint(n: &Node, path: &str) -> R<u64> {
    let v = int(n, path)?;
    u64::try_from(v).map_err(|_| n.err(path, format!("invalid value: {v}, expected 0 or more")))
}

fn float(n: &Node, path: &str) -> R<f64> {
    match &n.value {
        Value::Str { text, .. } => text
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .ok_or_else(|| type_err(n, path, "a number")),
        _ => Err(type_err(n, path, "a number")),
    }
}

fn boolean(n: &Node, path: &str) -> R<bool> {
    match &n.value {
        Value::Str { text, .. } => match text.to_ascii_lowercase().as_str() {
            "true" | "yes" | "y" | "on" => Ok(true),
            "false" | "no" | "n" | "off" => Ok(false),
            _ => Err(type_err(n, path, "a boolean")),
        },
        _ => Err(type_err(n, path, "a boolean")),
    }
}

/// A list of strings (a lone string counts as a list of one where `single` allows it).
fn strings(n: &Node, path: &str, single: bool) -> R<Vec<String>> {
    match &n.value {
        Value::Seq(items) => items
            .iter()
            .enumerate()
            .map(|(i, it)| string(it, &format!("{path}[{i}]")))
            .collect(),
        Value::Str { text, .. } if single => Ok(vec![text.clone()]),
        Value::Null => Ok(Vec::new()),
        _ => Err(type_err(n, path, "a list of strings")),
    }
}

/// `environment` / `labels`: a list of `K=V` (or `K`) or a mapping (values may be null).
fn keyed(n: &Node, path: &str) -> R<Vec<(String, Option<String>)>> {
    match &n.value {
        Value::Seq(items) => items
            .iter()
            .enumerate()
            .map(|(i, it)| {
                let s = string(it, &format!("{path}[{i}]"))?;
                Ok(match s.split_once('=') {
                    Some((k, v)) => (k.to_string(), Some(v.to_string())),
                    None => (s, None),
                })
            })
            .collect(),
        Value::Map(entries) => entries
            .iter()
            .map(|(k, v)| {
                let p = join(path, &k.text);
                Ok((
                    k.text.clone(),
                    match &v.value {
                        Value::Null => None,
                        Value::Str { text, .. } => Some(text.clone()),
                        _ => return Err(type_err(v, &p, "a string, number or boolean")),
                    },
                ))
            })
            .collect(),
        Value::Null => Ok(Vec::new()),
        _ => Err(type_err(n, path, "a list or a mapping")),
    }
}

fn labels(n: &Node, path: &str) -> R<BTreeMap<String, String>> {
    Ok(keyed(n, path)?
        .into_iter()
        .map(|(k, v)| (k, v.unwrap_or_default()))
        .collect())
}

/// Go durations (`10s`, `1m30s`, `1.5h`, `300ms`), in whole milliseconds.
pub(crate) fn duration_ms(n: &Node, path: &str) -> R<u64> {
    let s = string(n, path)?;
    let bad = || {
        n.err(
            path,
            format!("invalid duration {s:?} (e.g. 500ms, 10s, 1m30s)"),
        )
    };
    let ns = mesh_api::human::go_duration_ns(&s).ok_or_else(bad)?;
    if !ns.is_multiple_of(1_000_000) {
        return Err(n.err(
            path,
            format!("{s:?}: mesh keeps durations in whole milliseconds"),
        ));
    }
    Ok(ns / 1_000_000)
}

/// Docker's `RAMInBytes`: `128M`, `1g`, `512mb`, `64KiB`, or plain bytes.
fn bytes(n: &Node, path: &str) -> R<u64> {
    let s = string(n, path)?;
    let bad = || n.err(path, format!("invalid size {s:?} (e.g. 128M, 1G)"));
    let t = s.trim().to_ascii_lowercase();
    let num_end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let v: f64 = t[..num_end].parse().map_err(|_| bad())?;
    let unit = t[num_end..].trim();
    let unit = unit.strip_suffix('b').unwrap_or(unit);
    let unit = unit.strip_suffix('i').unwrap_or(unit);
    let mult: u64 = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        "p" => 1 << 50,
        _ => return Err(bad()),
    };
    Ok((v * mult as f64) as u64)
}

/// Splits a command line as a POSIX shell would (quotes and backslashes), as Docker's
/// `shellwords` does for `command: a string`.
fn shell_words(n: &Node, path: &str, s: &str) -> R<Vec<String>> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut have = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                have = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err(n.err(path, "unterminated quote in command")),
                    }
                }
            }
            '"' => {
                have = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => cur.push(c),
                            Some(c) => {
                                cur.push('\\');
                                cur.push(c)
                            }
                            None => return Err(n.err(path, "unterminated quote in command")),
                        },
                        Some(c) => cur.push(c),
                        None => return Err(n.err(path, "unterminated quote in command")),
                    }
                }
            }
            '\\' => {
                have = true;
                if let Some(c) = chars.next() {
                    cur.push(c);
                }
            }
            c if c.is_whitespace() => {
                if have {
                    out.push(std::mem::take(&mut cur));
                    have = false;
                }
            }
            c => {
                have = true;
                cur.push(c);
            }
        }
    }
    if have {
        out.push(cur);
    }
    Ok(out)
}

/// `command` / `entrypoint`: a list, or a string split as a shell would.
fn command(n: &Node, path: &str) -> R<Vec<String>> {
    match &n.value {
        Value::Str { text, .. } => shell_words(n, path, text),
        _ => strings(n, path, false),
    }
}

fn expand_path(base: &Path, p: &str) -> PathBuf {
    if let Some(rest) = p.strip_prefix("~/") {
        if let Some(home) = std::env::var_os("HOME") {
            return PathBuf::from(home).join(rest);
        }
    }
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        normalize(&base.join(p))
    }
}

/// `a/./b/../c` to `a/c`, without touching the filesystem.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

fn external(n: &Node, path: &str) -> R<(bool, Option<String>)> {
    match n.get("external") {
        None => Ok((false, None)),
        Some(e) => match &e.value {
            Value::Map(_) => {
                check_keys(e, &join(path, "external"), &["name"], &[])?;
                let name = e
                    .get("name")
                    .map(|v| string(v, &join(path, "external.name")))
                    .transpose()?;
                Ok((true, name))
            }
            _ => Ok((boolean(e, &join(path, "external"))?, None)),
        },
    }
}

/// The top-level `networks`, `volumes`, `secrets` and `configs`, then every service.
pub fn stack(root: &Node, opts: &Options) -> R<Stack> {
    check_keys(
        root,
        "",
        &[
            "version", "services", "networks", "volumes", "secrets", "configs",
        ],
        &[],
    )?;
    if let Some(v) = root.get("version") {
        string(v, "version")?;
    }
    let ns = opts.namespace.as_str();
    let mut ctx = Ctx {
        ns,
        base_dir: &opts.base_dir,
        env: &opts.env,
        networks: BTreeMap::new(),
        volumes: BTreeMap::new(),
        secrets: BTreeMap::new(),
        configs: BTreeMap::new(),
        ignored: BTreeSet::new(),
    };
    let ns_labels = |mut l: BTreeMap<String, String>| {
        l.insert(NAMESPACE_LABEL.into(), ns.into());
        l
    };
    if let Some(nets) = root.get("networks") {
        for (k, n) in map(nets, "networks")? {
            let path = format!("networks.{}", k.text);
            check_keys(
                n,
                &path,
                &[
                    "driver",
                    "attachable",
                    "external",
                    "name",
                    "ipam",
                    "labels",
                    "driver_opts",
                    "internal",
                    "enable_ipv6",
                ],
                &[],
            )?;
            map(n, &path)?;
            let (ext, ext_name) = external(n, &path)?;
            let name = match n.get("name") {
                Some(v) => string(v, &join(&path, "name"))?,
                None if ext => ext_name.unwrap_or_else(|| k.text.clone()),
                None => format!("{ns}_{}", k.text),
            };
            let driver = match n.get("driver") {
                Some(d) => string(d, &join(&path, "driver"))?,
                None => "overlay".into(),
            };
            if driver != "overlay" && !ext {
                return Err(n.get("driver").unwrap_or(n).err(
                    &join(&path, "driver"),
                    format!("driver {driver:?} is not supported by mesh (only overlay)"),
                ));
            }
            for (key, what) in [("internal", "internal networks"), ("enable_ipv6", "IPv6")] {
                if let Some(v) = n.get(key) {
                    if boolean(v, &join(&path, key))? {
                        return Err(v.err(
                            &join(&path, key),
                            format!("{what} are not supported by mesh"),
                        ));
                    }
                }
            }
            let mut encrypted = false;
            if let Some(o) = n.get("driver_opts") {
                let opts = map(o, &join(&path, "driver_opts"))?;
                encrypted =
                    mesh_api::overlay_driver_options(opts.iter().map(|(k, _)| k.text.as_str()))
                        .map_err(|e| o.err(&join(&path, "driver_opts"), e))?;
            }
            let mut subnet = None;
            if let Some(ipam) = n.get("ipam") {
                let ip = join(&path, "ipam");
                check_keys(ipam, &ip, &["driver", "config"], &["options"])?;
                if let Some(d) = ipam.get("driver") {
                    let d = string(d, &join(&ip, "driver"))?;
                    if d != "default" {
                        return Err(ipam.err(
                            &join(&ip, "driver"),
                            format!("IPAM driver {d:?} is not supported by mesh"),
                        ));
                    }
                }
                if let Some(cfg) = ipam.get("config") {
                    let Value::Seq(items) = &cfg.value else {
                        return Err(type_err(cfg, &join(&ip, "config"), "a list"));
                    };
                    if items.len() > 1 {
                        return Err(cfg.err(
                            &join(&ip, "config"),
                            "more than one subnet is not supported by mesh",
                        ));
                    }
                    for (i, c) in items.iter().enumerate() {
                        let cp = format!("{ip}.config[{i}]");
                        check_keys(
                            c,
                            &cp,
                            &["subnet"],
                            &["ip_range", "gateway", "aux_addresses"],
                        )?;
                        if let Some(s) = c.get("subnet") {
                            subnet = Some(string(s, &join(&cp, "subnet"))?);
                        }
                    }
                }
            }
            let spec = NetworkSpec {
                name,
                driver: "overlay".into(),
                subnet,
                encrypted,
                attachable: match n.get("attachable") {
                    Some(a) => boolean(a, &join(&path, "attachable"))?,
                    None => false,
                },
                ingress: false,
                labels: ns_labels(match n.get("labels") {
                    Some(l) => labels(l, &join(&path, "labels"))?,
                    None => BTreeMap::new(),
                }),
            };
            ctx.networks.insert(k.text.clone(), (spec, ext));
        }
    }
    if let Some(vols) = root.get("volumes") {
        for (k, n) in map(vols, "volumes")? {
            let path = format!("volumes.{}", k.text);
            check_keys(
                n,
                &path,
                &["driver", "external", "name"],
                &["driver_opts", "labels"],
            )?;
            map(n, &path)?;
            if let Some(d) = n.get("driver") {
                let d = string(d, &join(&path, "driver"))?;
                if d != "local" {
                    return Err(n.err(
                        &join(&path, "driver"),
                        format!("volume driver {d:?} is not supported by mesh (only local)"),
                    ));
                }
            }
            let (ext, ext_name) = external(n, &path)?;
            let name = match n.get("name") {
                Some(v) => string(v, &join(&path, "name"))?,
                None if ext => ext_name.unwrap_or_else(|| k.text.clone()),
                None => format!("{ns}_{}", k.text),
            };
            ctx.volumes.insert(
                k.text.clone(),
                StackVolume {
                    name,
                    external: ext,
                },
            );
        }
    }
    for (section, kind) in [("secrets", BlobKind::Secret), ("configs", BlobKind::Config)] {
        let Some(sec) = root.get(section) else {
            continue;
        };
        for (k, n) in map(sec, section)? {
            let path = format!("{section}.{}", k.text);
            check_keys(
                n,
                &path,
                &["file", "external", "name", "labels", "environment"],
                &["driver", "driver_opts", "template_driver"],
            )?;
            map(n, &path)?;
            let (ext, ext_name) = external(n, &path)?;
            let name = match n.get("name") {
                Some(v) => string(v, &join(&path, "name"))?,
                None if ext => ext_name.unwrap_or_else(|| k.text.clone()),
                None => format!("{ns}_{}", k.text),
            };
            let mut data = Vec::new();
            if !ext {
                if let Some(f) = n.get("file") {
                    let p = expand_path(ctx.base_dir, &string(f, &join(&path, "file"))?);
                    data = std::fs::read(&p).map_err(|e| {
                        f.err(
                            &join(&path, "file"),
                            format!("cannot read {}: {e}", p.display()),
                        )
                    })?;
                } else if let Some(e) = n.get("environment") {
                    let var = string(e, &join(&path, "environment"))?;
                    data = ctx
                        .env
                        .get(&var)
                        .ok_or_else(|| {
                            e.err(
                                &join(&path, "environment"),
                                format!("environment variable {var} is not set"),
                            )
                        })?
                        .clone()
                        .into_bytes();
                } else {
                    return Err(n.err(
                        &path,
                        format!(
                            "a {} needs a file, an environment variable or external: true",
                            kind.word()
                        ),
                    ));
                }
            }
            let spec = BlobSpec {
                name,
                labels: if ext {
                    BTreeMap::new()
                } else {
                    ns_labels(match n.get("labels") {
                        Some(l) => labels(l, &join(&path, "labels"))?,
                        None => BTreeMap::new(),
                    })
                },
                data,
            };
            if !ext {
                spec.validate(kind).map_err(|e| n.err(&path, e))?;
            }
            let blob = StackBlob {
                kind,
                spec,
                external: ext,
            };
            match kind {
                BlobKind::Secret => ctx.secrets.insert(k.text.clone(), blob),
                BlobKind::Config => ctx.configs.insert(k.text.clone(), blob),
            };
        }
    }
    let mut services = Vec::new();
    let mut used_networks = BTreeSet::new();
    let mut used_volumes = BTreeSet::new();
    let svcs = root.get("services").ok_or_else(|| {
        Error::at(
            &root.file,
            root.line,
            "services",
            "a stack needs at least one service",
        )
    })?;
    for (k, n) in map(svcs, "services")? {
        let spec = service(&mut ctx, &k.text, n, &mut used_networks, &mut used_volumes)?;
        services.push(spec);
    }
    services.sort_by(|a, b| a.name.cmp(&b.name));
    let mut networks = Vec::new();
    for key in &used_networks {
        let (spec, external) = match ctx.networks.get(key) {
            Some((spec, ext)) => (spec.clone(), *ext),
            None => (
                NetworkSpec {
                    name: format!("{ns}_default"),
                    driver: "overlay".into(),
                    subnet: None,
                    encrypted: false,
                    attachable: false,
                    ingress: false,
                    labels: ns_labels(BTreeMap::new()),
                },
                false,
            ),
        };
        networks.push(StackNetwork { spec, external });
    }
    networks.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
    let mut warnings = Vec::new();
    if !ctx.ignored.is_empty() {
        warnings.push(format!(
            "Ignoring unsupported options: {}",
            ctx.ignored.iter().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    let volumes = used_volumes
        .iter()
        .filter_map(|k| ctx.volumes.get(k).cloned())
        .collect();
    let mut secrets: Vec<_> = ctx.secrets.into_values().collect();
    secrets.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
    let mut configs: Vec<_> = ctx.configs.into_values().collect();
    configs.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
    Ok(Stack {
        namespace: ns.to_string(),
        networks,
        services,
        secrets,
        configs,
        volumes,
        warnings,
    })
}

fn service(
    ctx: &mut Ctx,
    key: &str,
    n: &Node,
    used_networks: &mut BTreeSet<String>,
    used_volumes: &mut BTreeSet<String>,
) -> R<ServiceSpec> {
    let path = format!("services.{key}");
    let p = |k: &str| join(&path, k);
    let mut known: Vec<&str> = SERVICE_KEYS.to_vec();
    known.extend(IGNORED_SERVICE_KEYS);
    check_keys(n, &path, &known, UNSUPPORTED_SERVICE_KEYS)?;
    let Value::Map(entries) = &n.value else {
        return Err(type_err(n, &path, "a mapping"));
    };
    for (k, _) in entries {
        if IGNORED_SERVICE_KEYS.contains(&k.text.as_str()) {
            ctx.ignored.insert(k.text.clone());
        }
    }
    let ns = ctx.ns;
    let image = n.get("image").map(|v| string(v, &p("image"))).transpose()?;
    let image = image.filter(|i| !i.is_empty());
    let cmd = n
        .get("command")
        .map(|v| command(v, &p("command")))
        .transpose()?;
    if image.is_none() {
        if cmd.as_ref().is_none_or(|c| c.is_empty()) {
            return Err(n.err(
                &path,
                format!("service {key} has neither an image nor a command (a command without an image runs as a host process)"),
            ));
        }
        for k in [
            "entrypoint",
            "user",
            "working_dir",
            "volumes",
            "read_only",
            "init",
        ] {
            if let Some(v) = n.get(k) {
                return Err(v.err(
                    &p(k),
                    "needs an image (a service without one runs its command as a host process)",
                ));
            }
        }
    }
    let mut spec = ServiceSpec {
        name: format!("{ns}_{key}"),
        image: image.clone().unwrap_or_default(),
        command: cmd.unwrap_or_default(),
        ..Default::default()
    };
    if let Some(v) = n.get("entrypoint") {
        spec.entrypoint = command(v, &p("entrypoint"))?;
    }
    // Environment: env_file first, `environment` over it; sorted as Docker sends it.
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    if let Some(v) = n.get("env_file") {
        for (i, f) in strings(v, &p("env_file"), true)?.iter().enumerate() {
            let fp = expand_path(ctx.base_dir, f);
            let text = std::fs::read_to_string(&fp).map_err(|e| {
                v.err(
                    &format!("{}[{i}]", p("env_file")),
                    format!("cannot read {}: {e}", fp.display()),
                )
            })?;
            for line in text.lines() {
                let line = line.trim_start();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                match line.split_once('=') {
                    Some((k, val)) => {
                        env.insert(k.to_string(), val.to_string());
                    }
                    None => {
                        if let Some(val) = ctx.env.get(line.trim()) {
                            env.insert(line.trim().to_string(), val.clone());
                        }
                    }
                }
            }
        }
    }
    if let Some(v) = n.get("environment") {
        for (k, val) in keyed(v, &p("environment"))? {
            match val.or_else(|| ctx.env.get(&k).cloned()) {
                Some(val) => {
                    env.insert(k, val);
                }
                None => {
                    env.remove(&k);
                }
            }
        }
    }
    spec.env = env.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    if let Some(v) = n.get("ports") {
        spec.ports = ports(v, &p("ports"))?;
    }
    // Networks: each declared one, the short name as an alias; `default` when none.
    let mut nets: Vec<(String, Vec<String>)> = Vec::new();
    match n.get("networks") {
        None => nets.push(("default".into(), Vec::new())),
        Some(v) => match &v.value {
            Value::Seq(_) => {
                for s in strings(v, &p("networks"), false)? {
                    nets.push((s, Vec::new()));
                }
            }
            Value::Map(es) => {
                for (k, nv) in es {
                    let np = format!("{}.{}", p("networks"), k.text);
                    check_keys(
                        nv,
                        &np,
                        &["aliases"],
                        &["ipv4_address", "ipv6_address", "priority", "link_local_ips"],
                    )?;
                    map(nv, &np)?;
                    let aliases = match nv.get("aliases") {
                        Some(a) => strings(a, &join(&np, "aliases"), false)?,
                        None => Vec::new(),
                    };
                    nets.push((k.text.clone(), aliases));
                }
            }
            _ => return Err(type_err(v, &p("networks"), "a list or a mapping")),
        },
    }
    for (net, mut aliases) in nets {
        let name = match ctx.networks.get(&net) {
            Some((spec, _)) => spec.name.clone(),
            None if net == "default" => format!("{ns}_default"),
            None => {
                return Err(n.get("networks").unwrap_or(n).err(
                    &p("networks"),
                    format!("service {key} refers to undefined network {net:?}"),
                ))
            }
        };
        used_networks.insert(net);
        for a in &aliases {
            mesh_api::validate_dns_name(a)
                .map_err(|e| n.err(&p("networks"), format!("invalid alias {a:?}: {e}")))?;
        }
        aliases.push(key.to_string());
        spec.aliases.insert(name.clone(), aliases);
        spec.networks.push(name);
    }
    spec.networks.sort();
    if let Some(v) = n.get("volumes") {
        spec.mounts = mounts(ctx, v, &p("volumes"), used_volumes)?;
    }
    if let Some(v) = n.get("deploy") {
        deploy(v, &p("deploy"), &mut spec)?;
    } else {
        spec.restart = restart_key(n, &path)?.unwrap_or_default();
    }
    if let Some(v) = n.get("healthcheck") {
        spec.healthcheck = Some(healthcheck(v, &p("healthcheck"))?);
    }
    for (section, kind) in [("secrets", BlobKind::Secret), ("configs", BlobKind::Config)] {
        let Some(v) = n.get(section) else { continue };
        let refs = blob_refs(ctx, kind, key, v, &p(section))?;
        match kind {
            BlobKind::Secret => spec.secrets = refs,
            BlobKind::Config => spec.configs = refs,
        }
    }
    if let Some(v) = n.get("hostname") {
        spec.hostname = string(v, &p("hostname"))?;
    }
    if let Some(v) = n.get("user") {
        spec.user = string(v, &p("user"))?;
    }
    if let Some(v) = n.get("working_dir") {
        spec.workdir = string(v, &p("working_dir"))?;
    }
    if let Some(v) = n.get("stop_grace_period") {
        spec.stop_grace_period_ms = Some(duration_ms(v, &p("stop_grace_period"))?);
    }
    if let Some(v) = n.get("stop_signal") {
        let s = string(v, &p("stop_signal"))?;
        if mesh_api::signal_number(&s).is_none() {
            return Err(v.err(&p("stop_signal"), format!("invalid signal {s:?}")));
        }
        spec.stop_signal = s;
    }
    if let Some(v) = n.get("init") {
        spec.init = boolean(v, &p("init"))?;
    }
    if let Some(v) = n.get("read_only") {
        spec.read_only = boolean(v, &p("read_only"))?;
    }
    let mut container_labels = match n.get("labels") {
        Some(v) => labels(v, &p("labels"))?,
        None => BTreeMap::new(),
    };
    container_labels.insert(NAMESPACE_LABEL.into(), ns.into());
    spec.container_labels = container_labels;
    spec.labels.insert(NAMESPACE_LABEL.into(), ns.into());
    if let Some(i) = &image {
        spec.labels.insert(IMAGE_LABEL.into(), i.clone());
    }
    Ok(spec)
}

/// The service-level `restart` Docker still honours when `deploy.restart_policy` is absent
/// (while warning that it is unsupported).
fn restart_key(n: &Node, path: &str) -> R<Option<RestartPolicy>> {
    let Some(v) = n.get("restart") else {
        return Ok(None);
    };
    let s = string(v, &join(path, "restart"))?;
    let mut r = RestartPolicy::default();
    match s.as_str() {
        "no" => r.condition = RestartCondition::None,
        "always" | "unless-stopped" => r.condition = RestartCondition::Any,
        "on-failure" => r.condition = RestartCondition::OnFailure,
        s if s.starts_with("on-failure:") => {
            r.condition = RestartCondition::OnFailure;
            r.max_attempts = s["on-failure:".len()..].parse().map_err(|_| {
                v.err(
                    &join(path, "restart"),
                    format!("invalid restart policy {s:?}"),
                )
            })?;
        }
        _ => {
            return Err(v.err(
                &join(path, "restart"),
                format!("invalid restart policy {s:?}"),
            ))
        }
    }
    Ok(Some(r))
}

fn port_num(n: &Node, path: &str, s: &str) -> R<u16> {
    s.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| n.err(path, format!("invalid port {s:?}: a number in 1-65535")))
}

/// A port or a range `a-b`, as a list.
fn port_range(n: &Node, path: &str, s: &str) -> R<Vec<u16>> {
    match s.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (port_num(n, path, a)?, port_num(n, path, b)?);
            if b < a {
                return Err(n.err(path, format!("invalid port range {s:?}")));
            }
            Ok((a..=b).collect())
        }
        None => Ok(vec![port_num(n, path, s)?]),
    }
}

fn ports(n: &Node, path: &str) -> R<Vec<PortConfig>> {
    let Value::Seq(items) = &n.value else {
        return Err(type_err(n, path, "a list"));
    };
    let mut out = Vec::new();
    for (i, it) in items.iter().enumerate() {
        let ip = format!("{path}[{i}]");
        match &it.value {
            Value::Map(_) => {
                check_keys(
                    it,
                    &ip,
                    &["target", "published", "protocol", "mode"],
                    &["host_ip", "name", "app_protocol"],
                )?;
                let target = it
                    .get("target")
                    .ok_or_else(|| it.err(&ip, "target is required"))?;
                let target = port_num(
                    target,
                    &join(&ip, "target"),
                    &string(target, &join(&ip, "target"))?,
                )?;
                let published = match it.get("published") {
                    Some(p) => port_num(
                        p,
                        &join(&ip, "published"),
                        &string(p, &join(&ip, "published"))?,
                    )?,
                    None => 0,
                };
                let protocol = match it.get("protocol") {
                    None => Protocol::Tcp,
                    Some(p) => match string(p, &join(&ip, "protocol"))?.as_str() {
                        "tcp" => Protocol::Tcp,
                        "udp" => Protocol::Udp,
                        o => {
                            return Err(p.err(
                                &join(&ip, "protocol"),
                                format!("protocol {o:?} is not supported by mesh (tcp or udp)"),
                            ))
                        }
                    },
                };
                let mode = match it.get("mode") {
                    None => PublishMode::Ingress,
                    Some(m) => match string(m, &join(&ip, "mode"))?.as_str() {
                        "ingress" => PublishMode::Ingress,
                        "host" => PublishMode::Host,
                        o => {
                            return Err(m.err(
                                &join(&ip, "mode"),
                                format!("invalid mode {o:?} (ingress or host)"),
                            ))
                        }
                    },
                };
                let pc = PortConfig {
                    protocol,
                    target,
                    published,
                    mode,
                };
                if !out.contains(&pc) {
                    out.push(pc);
                }
            }
            Value::Str { text, .. } => {
                let (spec, proto) = match text.rsplit_once('/') {
                    Some((s, p)) => (s, p),
                    None => (text.as_str(), "tcp"),
                };
                let protocol = match proto {
                    "tcp" => Protocol::Tcp,
                    "udp" => Protocol::Udp,
                    o => {
                        return Err(it.err(
                            &ip,
                            format!("protocol {o:?} is not supported by mesh (tcp or udp)"),
                        ))
                    }
                };
                let parts: Vec<&str> = spec.split(':').collect();
                let (published, target) = match parts.as_slice() {
                    [t] => (None, *t),
                    [p, t] => (Some(*p).filter(|p| !p.is_empty()), *t),
                    [_, _, _] => return Err(it.err(&ip, "a host IP in a published port is not supported by mesh (a published port listens on every node)")),
                    _ => return Err(it.err(&ip, format!("invalid port {text:?}"))),
                };
                let targets = port_range(it, &ip, target)?;
                let published = match published {
                    Some(p) => port_range(it, &ip, p)?,
                    None => vec![0; targets.len()],
                };
                if published.len() != targets.len() {
                    return Err(it.err(
                        &ip,
                        format!("invalid port {text:?}: the ranges differ in length"),
                    ));
                }
                for (p, t) in published.into_iter().zip(targets) {
                    let pc = PortConfig {
                        protocol,
                        target: t,
                        published: p,
                        mode: PublishMode::Ingress,
                    };
                    // An override file repeating a port does not publish it twice.
                    if !out.contains(&pc) {
                        out.push(pc);
                    }
                }
            }
            _ => return Err(type_err(it, &ip, "a string or a mapping")),
        }
    }
    Ok(out)
}

fn mounts(ctx: &Ctx, n: &Node, path: &str, used: &mut BTreeSet<String>) -> R<Vec<Mount>> {
    let Value::Seq(items) = &n.value else {
        return Err(type_err(n, path, "a list"));
    };
    let mut out: Vec<Mount> = Vec::new();
    for (i, it) in items.iter().enumerate() {
        let ip = format!("{path}[{i}]");
        let (kind, source, target, readonly) = match &it.value {
            Value::Str { text, .. } => {
                let parts: Vec<&str> = text.split(':').collect();
                let (src, dst, mode) = match parts.as_slice() {
                    [d] => ("", *d, ""),
                    [s, d] => (*s, *d, ""),
                    [s, d, m] => (*s, *d, *m),
                    _ => return Err(it.err(&ip, format!("invalid volume specification {text:?}"))),
                };
                let mut ro = false;
                for m in mode.split(',').filter(|m| !m.is_empty()) {
                    match m {
                        "ro" => ro = true,
                        "rw" => ro = false,
                        o => {
                            return Err(it.err(
                                &ip,
                                format!("volume option {o:?} is not supported by mesh (ro or rw)"),
                            ))
                        }
                    }
                }
                let kind = if src.is_empty() {
                    MountType::Volume
                } else if src.starts_with(['/', '.', '~']) {
                    MountType::Bind
                } else {
                    MountType::Volume
                };
                (kind, src.to_string(), dst.to_string(), ro)
            }
            Value::Map(_) => {
                check_keys(
                    it,
                    &ip,
                    &["type", "source", "target", "read_only", "consistency"],
                    &["bind", "volume", "tmpfs", "image", "npipe", "cluster"],
                )?;
                let kind = match it.get("type") {
                    None => return Err(it.err(&ip, "type is required")),
                    Some(t) => match string(t, &join(&ip, "type"))?.as_str() {
                        "bind" => MountType::Bind,
                        "volume" => MountType::Volume,
                        "tmpfs" => MountType::Tmpfs,
                        o => {
                            return Err(t.err(
                                &join(&ip, "type"),
                                format!(
                                "mount type {o:?} is not supported by mesh (bind, volume or tmpfs)"
                            ),
                            ))
                        }
                    },
                };
                let source = it
                    .get("source")
                    .map(|s| string(s, &join(&ip, "source")))
                    .transpose()?
                    .unwrap_or_default();
                let target = it
                    .get("target")
                    .map(|s| string(s, &join(&ip, "target")))
                    .transpose()?
                    .ok_or_else(|| it.err(&ip, "target is required"))?;
                let ro = it
                    .get("read_only")
                    .map(|v| boolean(v, &join(&ip, "read_only")))
                    .transpose()?
                    .unwrap_or(false);
                (kind, source, target, ro)
            }
            _ => return Err(type_err(it, &ip, "a string or a mapping")),
        };
        let source = match kind {
            MountType::Bind => expand_path(ctx.base_dir, &source).display().to_string(),
            MountType::Volume if source.is_empty() => source,
            MountType::Volume => {
                let v = ctx.volumes.get(&source).ok_or_else(|| {
                    it.err(&ip, format!("named volume {source:?} is used but no declaration was found in the volumes section"))
                })?;
                used.insert(source.clone());
                v.name.clone()
            }
            MountType::Tmpfs => source,
        };
        let m = Mount {
            kind,
            source,
            target,
            readonly,
        };
        m.validate().map_err(|e| it.err(&ip, e))?;
        out.retain(|o| o.target != m.target);
        out.push(m);
    }
    Ok(out)
}

fn blob_refs(ctx: &Ctx, kind: BlobKind, svc: &str, n: &Node, path: &str) -> R<Vec<BlobReference>> {
    let Value::Seq(items) = &n.value else {
        return Err(type_err(n, path, "a list"));
    };
    let declared = match kind {
        BlobKind::Secret => &ctx.secrets,
        BlobKind::Config => &ctx.configs,
    };
    let mut out: Vec<BlobReference> = Vec::new();
    for (i, it) in items.iter().enumerate() {
        let ip = format!("{path}[{i}]");
        let mut r = BlobReference {
            source: String::new(),
            id: String::new(),
            target: String::new(),
            uid: "0".into(),
            gid: "0".into(),
            mode: 0o444,
        };
        let key = match &it.value {
            Value::Str { text, .. } => text.clone(),
            Value::Map(_) => {
                check_keys(it, &ip, &["source", "target", "uid", "gid", "mode"], &[])?;
                if let Some(v) = it.get("target") {
                    r.target = string(v, &join(&ip, "target"))?;
                }
                if let Some(v) = it.get("uid") {
                    r.uid = string(v, &join(&ip, "uid"))?;
                }
                if let Some(v) = it.get("gid") {
                    r.gid = string(v, &join(&ip, "gid"))?;
                }
                if let Some(v) = it.get("mode") {
                    let m = uint(v, &join(&ip, "mode"))?;
                    r.mode = u32::try_from(m)
                        .ok()
                        .filter(|m| *m <= 0o7777)
                        .ok_or_else(|| v.err(&join(&ip, "mode"), format!("invalid mode {m}")))?;
                }
                it.get("source")
                    .map(|v| string(v, &join(&ip, "source")))
                    .transpose()?
                    .ok_or_else(|| it.err(&ip, "source is required"))?
            }
            _ => return Err(type_err(it, &ip, "a string or a mapping")),
        };
        let blob = declared.get(&key).ok_or_else(|| {
            it.err(
                &ip,
                format!("service {svc} refers to undefined {} {key}", kind.word()),
            )
        })?;
        r.source = blob.spec.name.clone();
        if r.target.is_empty() {
            r.target = match kind {
                BlobKind::Secret => key.clone(),
                BlobKind::Config => format!("/{key}"),
            };
        }
        r.complete(kind).map_err(|e| it.err(&ip, e))?;
        out.retain(|o| o.target != r.target);
        out.push(r);
    }
    Ok(out)
}

fn healthcheck(n: &Node, path: &str) -> R<HealthConfig> {
    check_keys(
        n,
        path,
        &[
            "test",
            "interval",
            "timeout",
            "start_period",
            "retries",
            "disable",
        ],
        &["start_interval"],
    )?;
    map(n, path)?;
    let p = |k: &str| join(path, k);
    if let Some(d) = n.get("disable") {
        if boolean(d, &p("disable"))? {
            return Ok(HealthConfig {
                test: vec!["NONE".into()],
                ..Default::default()
            });
        }
    }
    let mut h = HealthConfig::default();
    if let Some(t) = n.get("test") {
        h.test = match &t.value {
            Value::Str { text, .. } => vec!["CMD-SHELL".into(), text.clone()],
            _ => strings(t, &p("test"), false)?,
        };
        if let Some(first) = h.test.first() {
            if !matches!(first.as_str(), "CMD" | "CMD-SHELL" | "NONE") {
                return Err(t.err(
                    &p("test"),
                    format!("a test list starts with CMD, CMD-SHELL or NONE, not {first:?}"),
                ));
            }
        }
    }
    if let Some(v) = n.get("interval") {
        h.interval_ms = duration_ms(v, &p("interval"))?;
    }
    if let Some(v) = n.get("timeout") {
        h.timeout_ms = duration_ms(v, &p("timeout"))?;
    }
    if let Some(v) = n.get("start_period") {
        h.start_period_ms = duration_ms(v, &p("start_period"))?;
    }
    if let Some(v) = n.get("retries") {
        h.retries = uint(v, &p("retries"))?;
    }
    Ok(h)
}

fn deploy(n: &Node, path: &str, spec: &mut ServiceSpec) -> R<()> {
    check_keys(
        n,
        path,
        &[
            "mode",
            "replicas",
            "placement",
            "resources",
            "restart_policy",
            "update_config",
            "rollback_config",
            "endpoint_mode",
            "labels",
        ],
        &[],
    )?;
    map(n, path)?;
    let p = |k: &str| join(path, k);
    let replicas = n
        .get("replicas")
        .map(|v| uint(v, &p("replicas")))
        .transpose()?;
    spec.mode = match n.get("mode") {
        None => ServiceMode::Replicated {
            replicas: replicas.unwrap_or(1),
        },
        Some(m) => match string(m, &p("mode"))?.as_str() {
            "replicated" => ServiceMode::Replicated {
                replicas: replicas.unwrap_or(1),
            },
            "global" => {
                if replicas.is_some() {
                    return Err(n.get("replicas").unwrap_or(m).err(
                        &p("replicas"),
                        "replicas can only be used with replicated mode",
                    ));
                }
                ServiceMode::Global
            }
            o @ ("replicated-job" | "global-job") => {
                return Err(m.err(&p("mode"), format!("mode {o:?} is not supported by mesh")))
            }
            o => {
                return Err(m.err(
                    &p("mode"),
                    format!("invalid mode {o:?} (replicated or global)"),
                ))
            }
        },
    };
    if let Some(pl) = n.get("placement") {
        let pp = p("placement");
        check_keys(
            pl,
            &pp,
            &["constraints", "preferences", "max_replicas_per_node"],
            &[],
        )?;
        map(pl, &pp)?;
        if let Some(c) = pl.get("constraints") {
            spec.constraints = strings(c, &join(&pp, "constraints"), false)?;
        }
        if let Some(pr) = pl.get("preferences") {
            if !matches!(&pr.value, Value::Null)
                && !matches!(&pr.value, Value::Seq(v) if v.is_empty())
            {
                return Err(pr.err(
                    &join(&pp, "preferences"),
                    "placement preferences are not supported by mesh (yet)",
                ));
            }
        }
        if let Some(m) = pl.get("max_replicas_per_node") {
            if uint(m, &join(&pp, "max_replicas_per_node"))? != 0 {
                return Err(m.err(
                    &join(&pp, "max_replicas_per_node"),
                    "not supported by mesh (yet)",
                ));
            }
        }
    }
    if let Some(r) = n.get("resources") {
        let rp = p("resources");
        check_keys(r, &rp, &["limits", "reservations"], &[])?;
        map(r, &rp)?;
        let mut res = Resources::default();
        if let Some(l) = r.get("limits") {
            let lp = join(&rp, "limits");
            check_keys(l, &lp, &["cpus", "memory"], &["pids"])?;
            map(l, &lp)?;
            if let Some(c) = l.get("cpus") {
                res.nano_cpus = (float(c, &join(&lp, "cpus"))? * 1e9).round() as u64;
            }
            if let Some(m) = l.get("memory") {
                res.memory_bytes = bytes(m, &join(&lp, "memory"))?;
            }
        }
        if let Some(rv) = r.get("reservations") {
            let vp = join(&rp, "reservations");
            check_keys(
                rv,
                &vp,
                &["cpus", "memory"],
                &["generic_resources", "devices"],
            )?;
            for (k, v) in map(rv, &vp)? {
                let zero = match k.text.as_str() {
                    "cpus" => float(v, &join(&vp, "cpus"))? == 0.0,
                    _ => bytes(v, &join(&vp, &k.text))? == 0,
                };
                if !zero {
                    return Err(Error::at(
                        &v.file,
                        k.line,
                        &join(&vp, &k.text),
                        "resource reservations are not supported by mesh (yet): only limits",
                    ));
                }
            }
        }
        spec.resources = res;
    }
    if let Some(r) = n.get("restart_policy") {
        let rp = p("restart_policy");
        check_keys(
            r,
            &rp,
            &["condition", "delay", "max_attempts", "window"],
            &[],
        )?;
        map(r, &rp)?;
        let mut rs = RestartPolicy::default();
        if let Some(c) = r.get("condition") {
            let s = string(c, &join(&rp, "condition"))?;
            rs.condition = match s.as_str() {
                "none" | "no" => RestartCondition::None,
                "on-failure" => RestartCondition::OnFailure,
                "any" => RestartCondition::Any,
                _ => {
                    return Err(c.err(
                        &join(&rp, "condition"),
                        format!("invalid restart condition {s:?} (none, on-failure or any)"),
                    ))
                }
            };
        }
        if let Some(d) = r.get("delay") {
            rs.delay_ms = duration_ms(d, &join(&rp, "delay"))?;
        }
        if let Some(m) = r.get("max_attempts") {
            rs.max_attempts = uint(m, &join(&rp, "max_attempts"))?;
        }
        if let Some(w) = r.get("window") {
            if duration_ms(w, &join(&rp, "window"))? != 0 {
                return Err(w.err(
                    &join(&rp, "window"),
                    "a restart window is not supported by mesh (yet)",
                ));
            }
        }
        spec.restart = rs;
    }
    if let Some(u) = n.get("update_config") {
        let (cfg, order) = update_config(u, &p("update_config"), false)?;
        spec.update = cfg;
        spec.update.order = order;
    }
    if let Some(u) = n.get("rollback_config") {
        let (_, order) = update_config(u, &p("rollback_config"), true)?;
        spec.rollback = RollbackConfig { order };
    }
    if let Some(e) = n.get("endpoint_mode") {
        spec.endpoint_mode = match string(e, &p("endpoint_mode"))?.as_str() {
            "vip" => EndpointMode::Vip,
            "dnsrr" => EndpointMode::Dnsrr,
            o => {
                return Err(e.err(
                    &p("endpoint_mode"),
                    format!("invalid endpoint mode {o:?} (vip or dnsrr)"),
                ))
            }
        };
    }
    if let Some(l) = n.get("labels") {
        spec.labels = labels(l, &p("labels"))?;
    }
    Ok(())
}

/// `update_config`, or `rollback_config` (whose only setting of its own in mesh is the
/// order: a rollback uses the restored spec's parallelism, delay and monitor period).
fn update_config(n: &Node, path: &str, rollback: bool) -> R<(UpdateConfig, UpdateOrder)> {
    check_keys(
        n,
        path,
        &[
            "parallelism",
            "delay",
            "failure_action",
            "monitor",
            "max_failure_ratio",
            "order",
        ],
        &[],
    )?;
    map(n, path)?;
    let p = |k: &str| join(path, k);
    let mut u = UpdateConfig::default();
    let only_order = |v: &Node, k: &str| {
        v.err(&p(k), "not supported by mesh in rollback_config (a rollback uses the restored spec's update_config); only order")
    };
    if let Some(v) = n.get("parallelism") {
        u.parallelism = uint(v, &p("parallelism"))?;
        if rollback {
            return Err(only_order(v, "parallelism"));
        }
    }
    if let Some(v) = n.get("delay") {
        u.delay_ms = duration_ms(v, &p("delay"))?;
        if rollback {
            return Err(only_order(v, "delay"));
        }
    }
    if let Some(v) = n.get("failure_action") {
        let s = string(v, &p("failure_action"))?;
        u.failure_action = match s.as_str() {
            "pause" => FailureAction::Pause,
            "continue" => FailureAction::Continue,
            "rollback" if !rollback => FailureAction::Rollback,
            _ => {
                return Err(v.err(
                    &p("failure_action"),
                    format!("invalid failure action {s:?}"),
                ))
            }
        };
        if rollback {
            return Err(only_order(v, "failure_action"));
        }
    }
    if let Some(v) = n.get("monitor") {
        let m = duration_ms(v, &p("monitor"))?;
        if m != 0 {
            u.monitor_ms = m;
        }
        if rollback {
            return Err(only_order(v, "monitor"));
        }
    }
    if let Some(v) = n.get("max_failure_ratio") {
        if float(v, &p("max_failure_ratio"))? != 0.0 {
            return Err(v.err(&p("max_failure_ratio"), "not supported by mesh (yet)"));
        }
    }
    let mut order = UpdateOrder::StopFirst;
    if let Some(v) = n.get("order") {
        let s = string(v, &p("order"))?;
        order = s
            .parse::<UpdateOrder>()
            .map_err(|e| v.err(&p("order"), e))?;
    }
    Ok((u, order))
}
