//! Smoke test of the multi-host harness itself (no daemons): underlay
//! connectivity, cutting and healing a host's cable, and cleanup on drop.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mesh_netns::{binaries, require_root, wait_for, Cluster, ClusterOpts};

/// Names of the network namespaces that exist right now.
fn netns_list() -> Result<BTreeSet<String>> {
    let out = Command::new("ip").args(["netns", "list"]).output()?;
    ensure!(out.status.success(), "ip netns list failed");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// Interface names of the root namespace (the harness must not add any).
fn root_links() -> Result<BTreeSet<String>> {
    let out = Command::new("ip").args(["-o", "link", "show"]).output()?;
    ensure!(out.status.success(), "ip link show failed");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .collect())
}

#[test]
fn underlay_cut_heal_and_cleanup() -> Result<()> {
    if !require_root()? {
        return Ok(());
    }
    let links_before = root_links()?;
    let cluster = Cluster::new(ClusterOpts {
        hosts: 3,
        start_daemons: false,
        name_hint: "smoke",
    })?;
    assert_eq!(root_links()?, links_before, "root namespace was modified");

    let namespaces = cluster.namespaces().to_vec();
    let base = cluster.base_dir().to_path_buf();
    assert_eq!(namespaces.len(), 4);
    assert_eq!(namespaces[0], cluster.underlay_ns());
    let listed = netns_list()?;
    for ns in &namespaces {
        assert!(listed.contains(ns), "{ns} missing from {listed:?}");
    }
    for (i, h) in cluster.hosts().iter().enumerate() {
        assert_eq!(h.name(), format!("h{}", i + 1));
        assert_eq!(h.addr().octets(), [10, 99, 0, 11 + i as u8]);
        assert!(h.data_dir().is_dir() && h.exec_root().is_dir());
        assert!(h.log_path().is_file());
        assert_eq!(h.socket(), h.exec_root().join("meshd.sock"));
        assert!(!h.daemon_running());
    }

    let (h1, h2, h3) = (cluster.host(1), cluster.host(2), cluster.host(3));
    assert!(h1.ping(h2.addr())?, "h1 -> h2");
    assert!(h1.ping(h3.addr())?, "h1 -> h3");
    let out = cluster.client_exec(&["ping", "-c1", "-W1", &h3.addr().to_string()])?;
    assert!(out.status.success(), "client -> h3: {out:?}");
    let out = h3.exec(&["ping", "-c1", "-W1", &cluster.client_addr().to_string()])?;
    assert!(out.status.success(), "h3 -> client: {out:?}");

    h3.cut_link()?;
    wait_for(
        "h1 -> h3 to fail",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || Ok((!h1.ping(h3.addr())?).then_some(())),
    )?;
    assert!(h1.ping(h2.addr())?, "h1 -> h2 must survive cutting h3");
    h3.heal_link()?;
    wait_for(
        "h1 -> h3 to work again",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || Ok(h1.ping(h3.addr())?.then_some(())),
    )?;

    drop(cluster);
    let listed = netns_list()?;
    for ns in &namespaces {
        assert!(!listed.contains(ns), "{ns} still exists after drop");
    }
    // With MESH_KEEP_LOGS set, the temp dir is kept on purpose.
    if std::env::var_os("MESH_KEEP_LOGS").is_none() {
        assert!(!base.exists(), "{} still exists after drop", base.display());
    }
    assert_eq!(root_links()?, links_before, "root namespace was modified");
    Ok(())
}

/// `binaries()` builds meshd and mesh on demand and finds them.
#[test]
fn binaries_are_built_and_found() -> Result<()> {
    let bins = binaries()?;
    for p in [&bins.meshd, &bins.mesh] {
        ensure!(p.is_file(), "{} missing", p.display());
    }
    let again = binaries().context("second call")?;
    assert!(std::ptr::eq(bins, again), "binaries() must be cached");
    Ok(())
}
