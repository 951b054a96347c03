//! `cargo xtask tidy`'s structural checks, run by an ordinary test too (`workspace_is_tidy`),
//! so that `cargo test` enforces them:
//!
//! - **layering**: the workspace's crate graph (`cargo metadata --no-deps`, normal
//!   dependencies, followed transitively within the workspace) against [`LAYERS`], the layers
//!   of `docs/ARCHITECTURE.md`. The node side (kernel plumbing, data plane) and the control
//!   side (control plane, front doors, the CLI) never depend on each other, and the control
//!   side links no kernel crate ([`KERNEL_EXTERNALS`]); only `meshd` wires both together; a
//!   lower layer never depends on an upper one; nothing depends on a binary;
//! - **`unsafe`**: a crate whose sources use no `unsafe` says so with
//!   `#![forbid(unsafe_code)]` in each of its roots, and every crate takes the workspace lints
//!   (`[lints] workspace = true`, which deny `unsafe_op_in_unsafe_fn`);
//! - **docs**: every `.rs` file under a workspace crate's `src/` begins with a `//!` module doc.
//!
//! Every violation is one line.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde_json::Value;

/// The layers of `docs/ARCHITECTURE.md` ("Layers"), from the bottom up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layer {
    /// 1. Kernel and host plumbing: processes, namespaces, cgroups, netlink and `nft`, and the
    ///    node's image store (host files; ARCHITECTURE.md's layer list does not name it, its
    ///    invariant is the executor's: nothing of tasks or services).
    Kernel,
    /// 2. The data plane, consuming a desired state it is given.
    DataPlane,
    /// 3. The control plane and its vocabulary: decides and records, never touches the kernel.
    ControlPlane,
    /// 4. The node agent (`mesh-agent`): the daemon core, the agent loop and the seams' real
    ///    implementations; it uses both sides, and neither depends on it.
    Agent,
    /// 4. Front doors over the local API's requests.
    FrontDoor,
    /// 5. The `mesh` CLI: a client of the local API.
    Client,
    /// 5. `meshd`: parses flags and wires both sides together.
    Daemon,
    /// Outside the product: the multi-host test harness, benchmarks, this task runner.
    Tooling,
}

/// Which half of the product a layer belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Node,
    Control,
    Both,
    Outside,
}

impl Layer {
    fn rank(self) -> u8 {
        match self {
            Layer::Kernel => 1,
            Layer::DataPlane => 2,
            Layer::ControlPlane => 3,
            Layer::Agent => 4,
            Layer::FrontDoor => 5,
            Layer::Client | Layer::Daemon => 6,
            Layer::Tooling => 7,
        }
    }

    fn side(self) -> Side {
        match self {
            Layer::Kernel | Layer::DataPlane => Side::Node,
            Layer::ControlPlane | Layer::FrontDoor | Layer::Client => Side::Control,
            Layer::Agent | Layer::Daemon => Side::Both,
            Layer::Tooling => Side::Outside,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Layer::Kernel => "kernel plumbing",
            Layer::DataPlane => "data plane",
            Layer::ControlPlane => "control plane",
            Layer::Agent => "node agent",
            Layer::FrontDoor => "front door",
            Layer::Client => "CLI",
            Layer::Daemon => "daemon",
            Layer::Tooling => "tooling",
        }
    }
}

/// Every workspace crate's layer. A new crate must be placed here (an unplaced crate is a
/// violation).
const LAYERS: &[(&str, Layer)] = &[
    ("mesh-executor", Layer::Kernel),
    ("mesh-netlink", Layer::Kernel),
    ("mesh-image", Layer::Kernel),
    ("mesh-overlay", Layer::DataPlane),
    ("mesh-lb", Layer::DataPlane),
    ("mesh-ingress", Layer::DataPlane),
    ("mesh-dns", Layer::DataPlane),
    ("mesh-gossip", Layer::DataPlane),
    ("mesh-api", Layer::ControlPlane),
    ("mesh-ca", Layer::ControlPlane),
    ("mesh-rpc", Layer::ControlPlane),
    ("mesh-scheduler", Layer::ControlPlane),
    ("mesh-manager", Layer::ControlPlane),
    ("mesh-compose", Layer::ControlPlane),
    ("mesh-agent", Layer::Agent),
    ("mesh-engine", Layer::FrontDoor),
    ("mesh-cli", Layer::Client),
    ("meshd", Layer::Daemon),
    ("mesh-netns", Layer::Tooling),
    ("mesh-bench", Layer::Tooling),
    ("xtask", Layer::Tooling),
];

/// External crates the control side must not link, directly or through a workspace crate: the
/// kernel's networking (netlink, nftables, BPF) and raw system calls. A name ending in `*` is a
/// prefix.
const KERNEL_EXTERNALS: &[&str] = &["rtnetlink", "netlink-*", "aya", "aya-*", "nftables", "libc"];

/// Known, dated departures from the rules: (crate, external dependency, why). An exception
/// the crate no longer needs is a violation, so that it goes with its reason.
const EXCEPTIONS: &[Exception] = &[];

/// (crate, external dependency, why).
type Exception = (&'static str, &'static str, &'static str);

/// The workspace as `cargo metadata` describes it.
#[derive(Debug)]
struct Workspace {
    root: PathBuf,
    packages: Vec<Package>,
}

#[derive(Debug)]
struct Package {
    name: String,
    manifest: PathBuf,
    deps: Vec<Dep>,
    /// The library and binary targets' root files.
    roots: Vec<PathBuf>,
}

#[derive(Debug)]
struct Dep {
    /// The package's name (not the name it is renamed to).
    name: String,
    /// A `[dependencies]` one (not dev or build).
    normal: bool,
}

impl Package {
    fn dir(&self) -> &Path {
        self.manifest.parent().unwrap_or(Path::new("."))
    }
}

impl Workspace {
    fn rel(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .display()
            .to_string()
    }
}

/// Runs the checks on this workspace, prints every violation and fails if there is one.
pub fn run() -> anyhow::Result<()> {
    let violations = violations(&workspace()?)?;
    for v in &violations {
        println!("{v}");
    }
    if !violations.is_empty() {
        bail!("tidy: {} violation(s)", violations.len());
    }
    Ok(())
}

/// The violations in `ws`, one line each.
fn violations(ws: &Workspace) -> anyhow::Result<Vec<String>> {
    let mut v = check_layers(ws, EXCEPTIONS);
    v.extend(check_sources(ws)?);
    Ok(v)
}

/// This workspace, from `cargo metadata`.
fn workspace() -> anyhow::Result<Workspace> {
    let out = crate::cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("cannot run cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_metadata(&String::from_utf8_lossy(&out.stdout))
}

fn parse_metadata(json: &str) -> anyhow::Result<Workspace> {
    let m: Value = serde_json::from_str(json).context("cargo metadata's output")?;
    let str_of = |v: &Value, key: &str| -> anyhow::Result<String> {
        v[key]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("cargo metadata: no string {key:?}"))
    };
    let members: BTreeSet<&str> = m["workspace_members"]
        .as_array()
        .context("cargo metadata: no workspace_members")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let mut packages = Vec::new();
    for p in m["packages"]
        .as_array()
        .context("cargo metadata: no packages")?
    {
        if !members.contains(p["id"].as_str().unwrap_or_default()) {
            continue;
        }
        let mut deps = Vec::new();
        for d in p["dependencies"].as_array().into_iter().flatten() {
            deps.push(Dep {
                name: str_of(d, "name")?,
                normal: d["kind"].is_null(),
            });
        }
        let mut roots = Vec::new();
        for t in p["targets"].as_array().into_iter().flatten() {
            let kinds = t["kind"].as_array().into_iter().flatten();
            if kinds.filter_map(Value::as_str).any(|k| {
                matches!(
                    k,
                    "lib" | "rlib" | "dylib" | "cdylib" | "staticlib" | "proc-macro" | "bin"
                )
            }) {
                roots.push(PathBuf::from(str_of(t, "src_path")?));
            }
        }
        packages.push(Package {
            name: str_of(p, "name")?,
            manifest: PathBuf::from(str_of(p, "manifest_path")?),
            deps,
            roots,
        });
    }
    packages.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Workspace {
        root: PathBuf::from(str_of(&m, "workspace_root")?),
        packages,
    })
}

fn layer_of(name: &str) -> Option<Layer> {
    LAYERS.iter().find(|(n, _)| *n == name).map(|(_, l)| *l)
}

fn is_kernel_external(name: &str) -> bool {
    KERNEL_EXTERNALS
        .iter()
        .any(|pat| match pat.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == *pat,
        })
}

fn excepted(exceptions: &[Exception], krate: &str, dep: &str) -> bool {
    exceptions.iter().any(|(c, d, _)| *c == krate && *d == dep)
}

/// The layering rules over the workspace's crate graph.
fn check_layers(ws: &Workspace, exceptions: &[Exception]) -> Vec<String> {
    let mut v = Vec::new();
    let by_name: BTreeMap<&str, &Package> =
        ws.packages.iter().map(|p| (p.name.as_str(), p)).collect();
    // Normal dependencies within the workspace.
    let edges: BTreeMap<&str, Vec<&str>> = ws
        .packages
        .iter()
        .map(|p| {
            let deps = p.deps.iter().filter(|d| d.normal);
            let internal = deps.map(|d| d.name.as_str());
            (
                p.name.as_str(),
                internal.filter(|d| by_name.contains_key(d)).collect(),
            )
        })
        .collect();

    for p in &ws.packages {
        let Some(layer) = layer_of(&p.name) else {
            v.push(format!(
                "layering: {} is in no layer: place it in xtask/src/tidy.rs's LAYERS \
                 (docs/ARCHITECTURE.md's layers)",
                p.name
            ));
            continue;
        };

        // Nothing depends on a binary, whatever the kind of dependency.
        for d in &p.deps {
            if let Some(dl @ (Layer::Daemon | Layer::Client)) = layer_of(&d.name) {
                if by_name.contains_key(d.name.as_str()) {
                    v.push(format!(
                        "layering: {} -> {}: nothing may depend on a binary ({})",
                        p.name,
                        d.name,
                        dl.name()
                    ));
                }
            }
        }

        // A lower layer never knows the upper ones (direct edges; the sides are below).
        for &d in &edges[p.name.as_str()] {
            let Some(dl) = layer_of(d) else { continue };
            if sides_conflict(layer.side(), dl.side())
                || matches!(dl, Layer::Daemon | Layer::Client)
            {
                continue;
            }
            if dl.rank() > layer.rank() {
                v.push(format!(
                    "layering: {} -> {d}: {} ({}) must not depend on {d} ({}): a lower layer \
                     never knows the upper ones",
                    p.name,
                    p.name,
                    layer.name(),
                    dl.name()
                ));
            }
        }

        // The sides never meet below meshd: transitively within the workspace.
        if !matches!(layer.side(), Side::Node | Side::Control) {
            continue;
        }
        let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue = VecDeque::from([p.name.as_str()]);
        let mut seen = BTreeSet::from([p.name.as_str()]);
        let mut reached = vec![p.name.as_str()];
        while let Some(cur) = queue.pop_front() {
            for &d in &edges[cur] {
                if seen.insert(d) {
                    parent.insert(d, cur);
                    queue.push_back(d);
                    reached.push(d);
                }
            }
        }
        let path_to = |to: &str| -> String {
            let mut chain = vec![to];
            let mut cur = to;
            while let Some(up) = parent.get(cur) {
                chain.push(up);
                cur = up;
            }
            chain.reverse();
            chain.join(" -> ")
        };
        for &d in &reached[1..] {
            let Some(dl) = layer_of(d) else { continue };
            if sides_conflict(layer.side(), dl.side()) {
                v.push(format!(
                    "layering: {}: {} ({}) must not depend on {d} ({}): {}",
                    path_to(d),
                    p.name,
                    layer.name(),
                    dl.name(),
                    match layer.side() {
                        Side::Control =>
                            "the control side never links kernel or data-plane code (meshd wires them)",
                        _ => "kernel plumbing and the data plane know nothing of the control plane",
                    }
                ));
            }
        }
        if layer.side() == Side::Control {
            for &x in &reached {
                for e in &by_name[x].deps {
                    if e.normal
                        && !by_name.contains_key(e.name.as_str())
                        && is_kernel_external(&e.name)
                        && !excepted(exceptions, x, &e.name)
                    {
                        v.push(format!(
                            "layering: {} -> {}: {} ({}) must not link {}: the control side \
                             never touches kernel networking",
                            path_to(x),
                            e.name,
                            p.name,
                            layer.name(),
                            e.name
                        ));
                    }
                }
            }
        }
    }

    for (krate, dep, why) in exceptions {
        if let Some(p) = by_name.get(krate) {
            if !p.deps.iter().any(|d| d.normal && d.name == *dep) {
                v.push(format!(
                    "layering: {krate} no longer depends on {dep}: remove its exception from \
                     xtask/src/tidy.rs's EXCEPTIONS ({why})"
                ));
            }
        }
    }
    v
}

fn sides_conflict(a: Side, b: Side) -> bool {
    matches!(
        (a, b),
        (Side::Node, Side::Control) | (Side::Control, Side::Node)
    )
}

/// The `unsafe`, lints and module-doc rules over every crate's sources.
fn check_sources(ws: &Workspace) -> anyhow::Result<Vec<String>> {
    let mut v = Vec::new();
    for p in &ws.packages {
        let src = p.dir().join("src");
        let mut files = Vec::new();
        rs_files(&src, &mut files)?;
        for r in &p.roots {
            if !files.contains(r) {
                files.push(r.clone());
            }
        }
        let mut uses_unsafe_in = None;
        for f in &files {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read {}", f.display()))?;
            if uses_unsafe_in.is_none() && uses_unsafe(&text) {
                uses_unsafe_in = Some(f);
            }
            if f.starts_with(&src) && !begins_with_module_doc(&text) {
                v.push(format!(
                    "docs: {}: does not begin with a `//!` module doc",
                    ws.rel(f)
                ));
            }
        }
        let manifest = std::fs::read_to_string(&p.manifest)
            .with_context(|| format!("cannot read {}", p.manifest.display()))?;
        if !has_workspace_lints(&manifest) {
            v.push(format!(
                "lints: {}: no `[lints] workspace = true`{}",
                ws.rel(&p.manifest),
                match uses_unsafe_in {
                    Some(f) => format!(
                        " (it uses unsafe, in {}: the workspace lints deny \
                         unsafe_op_in_unsafe_fn)",
                        ws.rel(f)
                    ),
                    None => String::new(),
                }
            ));
        }
        if uses_unsafe_in.is_none() {
            for r in &p.roots {
                let text = std::fs::read_to_string(r)
                    .with_context(|| format!("cannot read {}", r.display()))?;
                if !has_forbid_unsafe(&text) {
                    v.push(format!(
                        "unsafe: {}: {} uses no unsafe: add #![forbid(unsafe_code)]",
                        ws.rel(r),
                        p.name
                    ));
                }
            }
        }
    }
    Ok(v)
}

/// The `.rs` files under `dir`, recursively, sorted; none if it does not exist.
fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let mut paths: Vec<PathBuf> = entries
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("cannot list {}", dir.display()))?;
    paths.sort();
    for p in paths {
        if p.is_dir() {
            rs_files(&p, out)?;
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
    Ok(())
}

/// Whether a manifest takes the workspace lints.
fn has_workspace_lints(manifest: &str) -> bool {
    let mut section = String::new();
    for line in manifest.lines() {
        let line: String = line
            .split('#')
            .next()
            .unwrap_or_default()
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        if line.starts_with('[') {
            section = line;
        } else if (section == "[lints]" && line == "workspace=true")
            || (section.is_empty() && line == "lints.workspace=true")
        {
            return true;
        }
    }
    false
}

/// Whether the first non-blank line is a `//!` doc.
fn begins_with_module_doc(src: &str) -> bool {
    src.lines()
        .find(|l| !l.trim().is_empty())
        .is_some_and(|l| l.trim_start().starts_with("//!"))
}

/// Words that `#![forbid(unsafe_code)]` would refuse: `unsafe` blocks, fns, impls, traits,
/// externs and attributes, and the attributes that are unsafe without the word.
const UNSAFE_WORDS: &[&str] = &["unsafe", "no_mangle", "export_name", "link_section"];

/// Whether code (not comments, strings or char literals) uses unsafe.
fn uses_unsafe(src: &str) -> bool {
    code_only(src)
        .split(|c: char| !is_ident(c))
        .any(|w| UNSAFE_WORDS.contains(&w))
}

/// Whether an inner `#![forbid(...)]` attribute in code lists `unsafe_code`.
fn has_forbid_unsafe(src: &str) -> bool {
    let code: String = code_only(src)
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    code.match_indices("#![forbid(").any(|(i, m)| {
        let args = &code[i + m.len()..];
        args[..args.find(')').unwrap_or(args.len())]
            .split(',')
            .any(|a| a == "unsafe_code")
    })
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// `src` with comments and the insides of string and char literals blanked out (lines kept),
/// as far as a scan without a parser can tell.
fn code_only(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let blank = |out: &mut String, chars: &[char]| {
        out.extend(chars.iter().map(|&ch| if ch == '\n' { '\n' } else { ' ' }))
    };
    let mut i = 0;
    while i < c.len() {
        let next = c.get(i + 1).copied();
        let end = if c[i] == '/' && next == Some('/') {
            // A line comment, docs included.
            c[i..]
                .iter()
                .position(|&ch| ch == '\n')
                .map_or(c.len(), |n| i + n)
        } else if c[i] == '/' && next == Some('*') {
            block_comment_end(&c, i)
        } else if let Some(end) = raw_string_end(&c, i) {
            end
        } else if c[i] == '"' {
            string_end(&c, i)
        } else if c[i] == '\'' {
            match char_literal_end(&c, i) {
                Some(end) => end,
                // A lifetime or a label.
                None => {
                    out.push('\'');
                    i += 1;
                    continue;
                }
            }
        } else {
            out.push(c[i]);
            i += 1;
            continue;
        };
        blank(&mut out, &c[i..end]);
        i = end;
    }
    out
}

/// The end of the (nested) block comment opening at `i`.
fn block_comment_end(c: &[char], mut i: usize) -> usize {
    let mut depth = 0usize;
    while i < c.len() {
        if c[i] == '/' && c.get(i + 1) == Some(&'*') {
            depth += 1;
            i += 2;
        } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            i += 1;
        }
    }
    c.len()
}

/// The end of the string literal whose opening quote is at `i`.
fn string_end(c: &[char], mut i: usize) -> usize {
    i += 1;
    while i < c.len() {
        match c[i] {
            '\\' => i += 2,
            '"' => return i + 1,
            _ => i += 1,
        }
    }
    c.len()
}

/// If a raw string literal (`r"…"`, `r#"…"#`, `br"…"`, `cr"…"`) starts at `i`, its end.
fn raw_string_end(c: &[char], i: usize) -> Option<usize> {
    if i > 0 && is_ident(c[i - 1]) {
        return None;
    }
    let mut j = i;
    if matches!(c[j], 'b' | 'c') {
        j += 1;
    }
    if c.get(j) != Some(&'r') {
        return None;
    }
    j += 1;
    let hashes = c[j..].iter().take_while(|&&ch| ch == '#').count();
    j += hashes;
    if c.get(j) != Some(&'"') {
        return None;
    }
    j += 1;
    while j < c.len() {
        if c[j] == '"' && (1..=hashes).all(|k| c.get(j + k) == Some(&'#')) {
            return Some(j + 1 + hashes);
        }
        j += 1;
    }
    Some(c.len())
}

/// If a char literal (`'x'`, `'\n'`, `'\u{1F600}'`) starts at `i`, its end; `None` for a
/// lifetime or a label.
fn char_literal_end(c: &[char], i: usize) -> Option<usize> {
    if c.get(i + 1) == Some(&'\\') {
        // The escaped character, then up to the closing quote (`\u{...}` is the longest).
        let close = c.iter().skip(i + 3).take(10).position(|&ch| ch == '\'')?;
        return Some(i + 3 + close + 1);
    }
    (c.get(i + 1).is_some_and(|&ch| ch != '\'' && ch != '\n') && c.get(i + 2) == Some(&'\''))
        .then_some(i + 3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The real workspace: this is what makes `cargo test` enforce the rules.
    #[test]
    fn workspace_is_tidy() {
        let ws = workspace().expect("cargo metadata");
        // The checks saw the real graph, not an empty one.
        let meshd = ws.packages.iter().find(|p| p.name == "meshd");
        assert!(
            meshd.is_some_and(|p| p.deps.iter().any(|d| d.normal && d.name == "mesh-api")),
            "cargo metadata shows no meshd -> mesh-api: {ws:#?}"
        );
        let violations = violations(&ws).expect("tidy checks ran");
        assert!(
            violations.is_empty(),
            "cargo xtask tidy found {} violation(s):\n{}",
            violations.len(),
            violations.join("\n")
        );
    }

    /// A synthetic crate: its name and its dependencies (name, kind: `None` for normal,
    /// `Some("dev")`...).
    type Crate<'a> = (&'a str, &'a [(&'a str, Option<&'a str>)]);

    /// `cargo metadata` JSON for crates under `/ws/crates/NAME` with a lib target each.
    fn metadata(packages: &[Crate]) -> String {
        let pkgs: Vec<Value> = packages
            .iter()
            .map(|(name, deps)| {
                json!({
                    "name": name,
                    "id": format!("path+file:///ws/crates/{name}#0.1.0"),
                    "manifest_path": format!("/ws/crates/{name}/Cargo.toml"),
                    "dependencies": deps.iter().map(|(d, kind)| json!({
                        "name": d, "kind": kind, "rename": null, "optional": false,
                    })).collect::<Vec<_>>(),
                    "targets": [{
                        "kind": ["lib"], "name": name,
                        "src_path": format!("/ws/crates/{name}/src/lib.rs"),
                    }],
                })
            })
            .collect();
        let ids: Vec<Value> = pkgs.iter().map(|p| p["id"].clone()).collect();
        json!({"packages": pkgs, "workspace_members": ids, "workspace_root": "/ws", "version": 1})
            .to_string()
    }

    /// The tests' own exception (the workspace's list may be empty).
    const TEST_EXCEPTIONS: &[Exception] = &[("mesh-manager", "libc", "a test's exception")];

    fn layering(packages: &[Crate]) -> Vec<String> {
        check_layers(
            &parse_metadata(&metadata(packages)).expect("parses"),
            TEST_EXCEPTIONS,
        )
    }

    /// A graph shaped as the architecture wants it (the exception used, dev-dependencies on
    /// the harness) passes: the checks below fail for what they name, not for everything.
    #[test]
    fn tidy_accepts_a_layered_graph() {
        let v = layering(&[
            ("mesh-api", &[("serde", None)]),
            ("mesh-compose", &[("mesh-api", None)]),
            ("mesh-cli", &[("mesh-api", None), ("mesh-compose", None)]),
            ("mesh-manager", &[("mesh-api", None), ("libc", None)]),
            ("mesh-engine", &[("mesh-api", None)]),
            ("mesh-netlink", &[("rtnetlink", None), ("libc", None)]),
            ("mesh-lb", &[("mesh-netlink", None), ("aya", None)]),
            (
                "mesh-executor",
                &[("libc", None), ("mesh-netns", Some("dev"))],
            ),
            ("mesh-netns", &[("libc", None)]),
            (
                "mesh-agent",
                &[("mesh-manager", None), ("mesh-lb", None), ("libc", None)],
            ),
            (
                "meshd",
                &[
                    ("mesh-agent", None),
                    ("mesh-manager", None),
                    ("mesh-lb", None),
                    ("mesh-engine", None),
                ],
            ),
            ("xtask", &[("mesh-netns", None)]),
        ]);
        assert_eq!(v, Vec::<String>::new());
    }

    #[test]
    fn tidy_catches_the_control_plane_reaching_a_kernel_crate_transitively() {
        let v = layering(&[
            ("mesh-api", &[]),
            (
                "mesh-compose",
                &[("mesh-api", None), ("mesh-overlay", None)],
            ),
            ("mesh-cli", &[("mesh-compose", None)]),
            ("mesh-netlink", &[]),
            ("mesh-overlay", &[("mesh-netlink", None)]),
        ]);
        for line in [
            "layering: mesh-compose -> mesh-overlay: mesh-compose (control plane) must not depend on mesh-overlay (data plane)",
            "layering: mesh-compose -> mesh-overlay -> mesh-netlink: mesh-compose (control plane) must not depend on mesh-netlink (kernel plumbing)",
            "layering: mesh-cli -> mesh-compose -> mesh-overlay -> mesh-netlink: mesh-cli (CLI) must not depend on mesh-netlink",
        ] {
            assert!(v.iter().any(|l| l.starts_with(line)), "{line:?} not in {v:#?}");
        }
        assert_eq!(v.len(), 4, "{v:#?}");
    }

    #[test]
    fn tidy_catches_a_kernel_external_and_ignores_dev_dependencies() {
        let v = layering(&[
            (
                "mesh-api",
                &[("netlink-packet-route", None), ("aya", Some("dev"))],
            ),
            ("mesh-scheduler", &[("mesh-api", None)]),
            ("mesh-engine", &[("libc", None)]),
        ]);
        assert_eq!(
            v.iter()
                .map(|l| l.split(':').nth(1).unwrap_or_default().trim())
                .collect::<Vec<_>>(),
            [
                "mesh-api -> netlink-packet-route",
                "mesh-engine -> libc",
                "mesh-scheduler -> mesh-api -> netlink-packet-route",
            ],
            "{v:#?}"
        );
    }

    #[test]
    fn tidy_catches_kernel_plumbing_knowing_the_control_plane() {
        let v = layering(&[("mesh-api", &[]), ("mesh-netlink", &[("mesh-api", None)])]);
        assert_eq!(v.len(), 1, "{v:#?}");
        assert!(v[0].starts_with(
            "layering: mesh-netlink -> mesh-api: mesh-netlink (kernel plumbing) must not depend on mesh-api (control plane)"
        ));
    }

    /// The node agent uses both sides; the control plane and the front doors never use it,
    /// and it never uses a front door.
    #[test]
    fn tidy_keeps_the_node_agent_between_the_sides_and_meshd() {
        let v = layering(&[
            ("mesh-api", &[]),
            ("mesh-netlink", &[]),
            ("mesh-manager", &[("mesh-api", None), ("mesh-agent", None)]),
            ("mesh-engine", &[("mesh-api", None), ("mesh-agent", None)]),
            (
                "mesh-agent",
                &[("mesh-netlink", None), ("mesh-engine", None)],
            ),
        ]);
        for line in [
            "layering: mesh-manager -> mesh-agent: mesh-manager (control plane) must not depend on mesh-agent (node agent)",
            "layering: mesh-engine -> mesh-agent -> mesh-netlink: mesh-engine (front door) must not depend on mesh-netlink (kernel plumbing)",
            "layering: mesh-agent -> mesh-engine: mesh-agent (node agent) must not depend on mesh-engine (front door)",
        ] {
            assert!(v.iter().any(|l| l.starts_with(line)), "{line:?} not in {v:#?}");
        }
    }

    #[test]
    fn tidy_catches_binaries_upward_edges_unplaced_crates_and_stale_exceptions() {
        let v = layering(&[
            ("meshd", &[]),
            ("mesh-cli", &[]),
            ("mesh-netns", &[("meshd", Some("dev"))]),
            ("mesh-engine", &[]),
            ("mesh-manager", &[("mesh-engine", None)]),
            ("mesh-netlink", &[("mesh-netns", None)]),
            ("mesh-secrets", &[]),
        ]);
        for line in [
            "layering: mesh-secrets is in no layer",
            "layering: mesh-manager -> mesh-engine: mesh-manager (control plane) must not depend on mesh-engine (front door)",
            "layering: mesh-netlink -> mesh-netns: mesh-netlink (kernel plumbing) must not depend on mesh-netns (tooling)",
            "layering: mesh-netns -> meshd: nothing may depend on a binary",
            "layering: mesh-manager no longer depends on libc",
        ] {
            assert!(v.iter().any(|l| l.starts_with(line)), "{line:?} not in {v:#?}");
        }
        assert_eq!(v.len(), 5, "{v:#?}");
    }

    #[test]
    fn tidy_scan_ignores_comments_strings_and_char_literals() {
        let src = r####"//! Says unsafe in its doc.
/* unsafe /* nested unsafe */ still unsafe */
fn f<'a>(x: &'a str) -> char {
    let _ = "unsafe { }"; let _ = r#"a "quoted" unsafe"#; let _ = br"unsafe";
    let _ = '"'; let _ = '\''; let _ = b'\\'; // unsafe
    'outer: loop { break 'outer; }
    let unsafe_code = 1; let not_unsafe = unsafe_code;
    'x'
}
"####;
        assert!(!uses_unsafe(src), "{}", code_only(src));
        assert_eq!(code_only(src).lines().count(), src.lines().count());
        for code in [
            "fn f() { unsafe { g() } }",
            "unsafe fn g() {}",
            "unsafe impl Send for X {}",
            "let s = \"a\\\"\"; unsafe { g() }",
            "let c = '\"'; unsafe { g() }",
            "#[no_mangle] pub extern \"C\" fn h() {}",
            "#[unsafe(export_name = \"h\")] fn h() {}",
        ] {
            assert!(uses_unsafe(code), "{code}");
        }
    }

    #[test]
    fn tidy_finds_the_forbid_attribute_and_module_docs() {
        assert!(has_forbid_unsafe("//! Doc.\n\n#![forbid(unsafe_code)]\n"));
        assert!(has_forbid_unsafe("#![forbid(missing_docs, unsafe_code)]"));
        assert!(has_forbid_unsafe("#! [ forbid ( unsafe_code ) ]"));
        assert!(!has_forbid_unsafe("// #![forbid(unsafe_code)]\n"));
        assert!(!has_forbid_unsafe(
            "#![deny(unsafe_code)]\n#![forbid(missing_docs)]"
        ));
        assert!(!has_forbid_unsafe(
            "const S: &str = \"#![forbid(unsafe_code)]\";"
        ));
        assert!(begins_with_module_doc("//! Doc.\nfn f() {}"));
        assert!(begins_with_module_doc("\n//! Doc after a blank line."));
        assert!(!begins_with_module_doc("/// An item doc.\nfn f() {}"));
        assert!(!begins_with_module_doc("use std::io;\n//! Too late."));
        assert!(!begins_with_module_doc(""));
        assert!(has_workspace_lints(
            "[package]\nname = \"x\"\n\n[lints]\nworkspace = true\n"
        ));
        assert!(has_workspace_lints("lints.workspace = true\n[package]\n"));
        assert!(!has_workspace_lints("[lints.rust]\nworkspace = true\n"));
        assert!(!has_workspace_lints(
            "[package]\n# [lints]\nworkspace = true\n"
        ));
    }

    /// The source rules on crates written to a temporary directory.
    #[test]
    fn tidy_catches_source_violations() {
        let root = std::env::temp_dir().join(format!("xtask-tidy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let write = |path: &str, text: &str| {
            let path = root.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        let lints = "[package]\nname = \"x\"\n[lints]\nworkspace = true\n";
        // Safe and says so; its comment's `unsafe` does not count.
        write("crates/good/Cargo.toml", lints);
        write(
            "crates/good/src/lib.rs",
            "//! Good.\n#![forbid(unsafe_code)]\nmod m;\n",
        );
        write("crates/good/src/m.rs", "//! M.\n// no unsafe here\n");
        // Safe but does not say so, and a module without its doc.
        write("crates/quiet/Cargo.toml", lints);
        write(
            "crates/quiet/src/main.rs",
            "//! Quiet.\nmod m;\nfn main() {}\n",
        );
        write("crates/quiet/src/m/n.rs", "use std::io;\n");
        // Uses unsafe without the workspace lints.
        write("crates/raw/Cargo.toml", "[package]\nname = \"raw\"\n");
        write(
            "crates/raw/src/lib.rs",
            "//! Raw.\npub fn f() { unsafe { g() } }\n",
        );
        let package = |name: &str, root_file: &str| Package {
            name: name.into(),
            manifest: root.join(format!("crates/{name}/Cargo.toml")),
            deps: Vec::new(),
            roots: vec![root.join(format!("crates/{name}/src/{root_file}"))],
        };
        let ws = Workspace {
            root: root.clone(),
            packages: vec![
                package("good", "lib.rs"),
                package("quiet", "main.rs"),
                package("raw", "lib.rs"),
            ],
        };
        let v = check_sources(&ws).expect("sources read");
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(
            v,
            [
                "docs: crates/quiet/src/m/n.rs: does not begin with a `//!` module doc",
                "unsafe: crates/quiet/src/main.rs: quiet uses no unsafe: add #![forbid(unsafe_code)]",
                "lints: crates/raw/Cargo.toml: no `[lints] workspace = true` (it uses unsafe, in crates/raw/src/lib.rs: the workspace lints deny unsafe_op_in_unsafe_fn)",
            ]
        );
    }
}
