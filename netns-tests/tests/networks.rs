//! Overlay networks on a real cluster: the control plane (create, allocation of subnets, VNIs
//! and task addresses, inspect, removal rules).

use std::time::Duration;

use anyhow::{ensure, Result};
use mesh_netns::swarm::{expect_err, swarm_cluster};
use mesh_netns::wait_for;
use serde_json::Value;

fn inspect(h: &mesh_netns::Host, net: &str) -> Result<Value> {
    let v: Value = serde_json::from_str(&h.mesh_ok(&["network", "inspect", net])?)?;
    Ok(v[0].clone())
}

#[test]
fn networks_are_allocated_and_guarded() -> Result<()> {
    let Some(c) = swarm_cluster(2, 1, "net")? else {
        return Ok(());
    };
    let h1 = c.host(1);

    // Every swarm has ingress.
    let ls = h1.mesh_json(&["network", "ls"])?;
    ensure!(
        ls.as_array().is_some_and(|a| a.len() == 1) && ls[0]["Name"] == "ingress",
        "{ls}"
    );
    let ingress = inspect(h1, "ingress")?;
    ensure!(
        ingress["Ingress"] == true && ingress["IPAM"]["Config"][0]["Subnet"] == "10.0.0.0/24",
        "{ingress}"
    );

    // Allocation: the next free /24, the next VNI, the first address as gateway.
    h1.mesh_ok(&["network", "create", "-d", "overlay", "appnet"])?;
    let app = inspect(h1, "appnet")?;
    ensure!(app["IPAM"]["Config"][0]["Subnet"] == "10.0.1.0/24", "{app}");
    ensure!(app["IPAM"]["Config"][0]["Gateway"] == "10.0.1.1", "{app}");
    ensure!(
        app["Options"]["com.docker.network.driver.overlay.vxlanid_list"] == "4097",
        "{app}"
    );
    h1.mesh_ok(&[
        "network",
        "create",
        "--subnet",
        "10.20.0.0/16",
        "--attachable",
        "other",
    ])?;
    let other = inspect(h1, "other")?;
    ensure!(
        other["Attachable"] == true && other["IPAM"]["Config"][0]["Gateway"] == "10.20.0.1",
        "{other}"
    );

    // Bad input.
    expect_err(h1, &["network", "create", "appnet"], "already exists")?;
    expect_err(
        h1,
        &["network", "create", "--subnet", "10.0.1.128/25", "x"],
        "overlaps with network appnet",
    )?;
    expect_err(
        h1,
        &["network", "create", "--subnet", "10.0.1.5/24", "x"],
        "host bits set",
    )?;
    expect_err(
        h1,
        &["network", "create", "--subnet", "banana", "x"],
        "invalid subnet",
    )?;
    expect_err(
        h1,
        &["network", "create", "-d", "bridge", "x"],
        "unsupported network driver",
    )?;
    expect_err(h1, &["network", "inspect", "nope"], "no such network: nope")?;
    expect_err(
        h1,
        &[
            "service",
            "create",
            "--name",
            "s",
            "--network",
            "nope",
            "--",
            "true",
        ],
        "no such network: nope",
    )?;
    expect_err(
        h1,
        &[
            "service",
            "create",
            "--name",
            "s",
            "--network",
            "ingress",
            "--",
            "true",
        ],
        "ingress",
    )?;

    // Tasks get addresses on their networks; removal is refused while they use it.
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        "3",
        "--network",
        "appnet",
        "--network",
        "other",
        "--",
        "sleep",
        "86407",
    ])?;
    let app = wait_for(
        "three addresses on appnet",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || {
            let v = inspect(h1, "appnet")?;
            Ok((v["Tasks"].as_array().map(|a| a.len()) == Some(3)).then_some(v))
        },
    )?;
    let mut addrs: Vec<String> = app["Tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["IPv4Address"].as_str().unwrap_or("").to_string())
        .collect();
    addrs.sort();
    // The service's VIP takes the first free address; tasks get the next ones.
    let web: Value = serde_json::from_str(&h1.mesh_ok(&["service", "inspect", "web"])?)?;
    let vips = web[0]["Endpoint"]["VirtualIPs"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    ensure!(
        vips.len() == 2 && vips[0]["Addr"] == "10.0.1.2/24",
        "{vips:?}"
    );
    ensure!(
        addrs == ["10.0.1.3/24", "10.0.1.4/24", "10.0.1.5/24"],
        "{addrs:?}"
    );
    let other = inspect(h1, "other")?;
    ensure!(
        other["Tasks"].as_array().map(|a| a.len()) == Some(3),
        "{other}"
    );
    expect_err(h1, &["network", "rm", "appnet"], "in use by service web")?;
    // Scale down then up: freed addresses are reused, never duplicated.
    h1.mesh_ok(&["service", "scale", "web=1"])?;
    h1.mesh_ok(&["service", "scale", "web=4"])?;
    let app = wait_for(
        "four addresses on appnet",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || {
            let v = inspect(h1, "appnet")?;
            Ok((v["Tasks"].as_array().map(|a| a.len()) == Some(4)).then_some(v))
        },
    )?;
    let mut addrs: Vec<String> = app["Tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["IPv4Address"].as_str().unwrap_or("").to_string())
        .collect();
    addrs.sort();
    addrs.dedup();
    ensure!(addrs.len() == 4, "duplicate addresses: {addrs:?}");
    ensure!(
        !addrs.contains(&"10.0.1.2/24".to_string()),
        "a task got the VIP: {addrs:?}"
    );
    h1.mesh_ok(&["service", "rm", "web"])?;
    wait_for(
        "appnet removable",
        Duration::from_secs(15),
        Duration::from_millis(250),
        || {
            Ok(h1
                .mesh(&["network", "rm", "appnet"])?
                .success()
                .then_some(()))
        },
    )?;
    h1.mesh_ok(&["network", "rm", "other"])?;
    let ls = h1.mesh_json(&["network", "ls"])?;
    ensure!(ls.as_array().is_some_and(|a| a.len() == 1), "{ls}");
    Ok(())
}
