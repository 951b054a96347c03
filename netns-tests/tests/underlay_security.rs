//! The underlay closed to strangers, and gossip sealed, on the real kernel: a VXLAN frame
//! crafted with an overlay network's VNI reaches a task when a member sends it and not when
//! a host outside the swarm does (and does again once the filter is deleted, so the frame
//! itself is good); gossip on the wire is sealed, and a captured packet with one bit
//! flipped, sent from a member's address, is dropped and counted; a SIGKILLed daemon keeps
//! its filter while down and gossips again once restarted; after `node rm --force` of a
//! worker its address leaves the other nodes' filters and the keys it knew are retired; a
//! joining node is let through the leader's filter before its join returns.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use mesh_netns::swarm::{form_swarm, info, network_tasks, task_exec, vni_of};
use mesh_netns::{require_root, wait_for, Cluster, ClusterOpts, Host};

/// The stranger's address on the underlay (not a node).
const STRANGER: &str = "10.99.0.250";
/// The UDP port the sink task listens on.
const SINK_PORT: &str = "9999";
/// Key rotation period given to the daemons (seconds).
const ROTATION: &str = "5";

/// A namespace on the underlay bridge with [`STRANGER`] as its address; deleted on drop.
struct Stranger {
    ns: String,
}

impl Stranger {
    fn new(c: &Cluster) -> Result<Stranger> {
        let ns = format!("{}-x", c.prefix());
        let s = Stranger { ns: ns.clone() };
        let ul = c.underlay_ns();
        let (a, b) = (format!("{}xa", c.prefix()), format!("{}xb", c.prefix()));
        let run = |args: &[&str]| -> Result<()> {
            let out = Command::new("ip").args(args).output()?;
            ensure!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        };
        run(&["netns", "add", &ns])?;
        run(&[
            "-n", ul, "link", "add", &a, "type", "veth", "peer", "name", &b, "netns", &ns,
        ])?;
        run(&["-n", ul, "link", "set", &a, "master", "br0", "up"])?;
        run(&["-n", &ns, "link", "set", &b, "name", "eth0"])?;
        run(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{STRANGER}/24"),
            "dev",
            "eth0",
        ])?;
        run(&["-n", &ns, "link", "set", "eth0", "up"])?;
        run(&["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(s)
    }

    fn exec(&self, argv: &[&str]) -> Result<std::process::Output> {
        Ok(Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(argv)
            .output()?)
    }
}

impl Drop for Stranger {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// Sends `count` VXLAN frames to `target:4789`: VNI `vni`, inner Ethernet to `mac`, IPv4
/// from an unused overlay address to `ip`, UDP to [`SINK_PORT`] carrying `payload`.
const SEND_VXLAN: &str = r#"
import socket, struct, sys, time
vni, mac, dst, src, port, payload, target, count = sys.argv[1:9]
payload = payload.encode()
udp = struct.pack('!HHHH', 40000, int(port), 8 + len(payload), 0) + payload
def csum(b):
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
hdr = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                  socket.inet_aton(src), socket.inet_aton(dst))
hdr = hdr[:10] + struct.pack('!H', csum(hdr)) + hdr[12:]
eth = bytes.fromhex(mac.replace(':', '')) + bytes.fromhex('02aabbccddee') + b'\x08\x00'
frame = struct.pack('!II', 0x08000000, int(vni) << 8) + eth + hdr + udp
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(count)):
    s.sendto(frame, (target, 4789))
    time.sleep(0.05)
"#;

/// Captures one gossip UDP packet (to port `argv[1]`) on the underlay bridge port `argv[2]`
/// and prints its payload in hex.
const CAPTURE_GOSSIP: &str = r#"
import socket, struct, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
s.bind((sys.argv[2], 0))
s.settimeout(1.0)
end = time.time() + 10
while time.time() < end:
    try:
        f = s.recv(65535)
    except socket.timeout:
        continue
    if len(f) < 42 or f[12:14] != b'\x08\x00' or f[23] != 17:
        continue
    ihl = (f[14] & 0x0f) * 4
    dport = struct.unpack('!H', f[14 + ihl + 2:14 + ihl + 4])[0]
    if dport == int(sys.argv[1]):
        print(f[14 + ihl + 8:].hex())
        sys.exit(0)
sys.exit(3)
"#;

/// Sends the hex payload `argv[1]` with bit 2 of byte `argv[2]` flipped to `argv[3]:argv[4]`,
/// from `argv[5]`.
const SEND_FLIPPED: &str = r#"
import socket, sys
p = bytearray(bytes.fromhex(sys.argv[1]))
p[int(sys.argv[2])] ^= 0x04
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[5], 0))
for i in range(3):
    s.sendto(bytes(p), (sys.argv[3], int(sys.argv[4])))
"#;

/// A UDP sink: prints every datagram it gets.
const SINK: &str = "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',9999))\nwhile True:\n d,a=s.recvfrom(4096)\n print('GOT',d.decode(errors='replace'),a[0],flush=True)";

fn gossip(h: &Host) -> Result<serde_json::Value> {
    let v = info(h)?;
    let g = v["gossip"].clone();
    ensure!(g.is_object(), "{}: no gossip in mesh info: {v}", h.name());
    Ok(g)
}

fn counter(h: &Host, what: &str) -> Result<u64> {
    gossip(h)?[what]
        .as_u64()
        .with_context(|| format!("{}: gossip.{what}", h.name()))
}

fn key_ids(h: &Host) -> Result<Vec<u64>> {
    Ok(gossip(h)?["key_ids"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
        .unwrap_or_default())
}

/// The member set of the host's filter, as nftables holds it (`None`: no table).
fn nft_members(h: &Host) -> Result<Option<Vec<String>>> {
    let out = h.exec(&["nft", "-j", "list", "set", "ip", "mesh_underlay", "members"])?;
    if !out.status.success() {
        return Ok(None);
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut found = Vec::new();
    for o in v["nftables"].as_array().cloned().unwrap_or_default() {
        if let Some(e) = o["set"]["elem"].as_array() {
            found.extend(e.iter().filter_map(|x| x.as_str().map(str::to_string)));
        }
    }
    found.sort();
    Ok(Some(found))
}

fn nft_counter(h: &Host, name: &str) -> Result<u64> {
    let out = h.exec(&["nft", "-j", "list", "counter", "ip", "mesh_underlay", name])?;
    ensure!(out.status.success(), "{}: no counter {name}", h.name());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["nftables"]
        .as_array()
        .and_then(|a| a.iter().find_map(|o| o["counter"]["packets"].as_u64()))
        .context("counter packets")
}

fn tables(h: &Host) -> Result<usize> {
    let out = h.exec(&["nft", "list", "tables", "ip"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.trim() == "table ip mesh_underlay")
        .count())
}

fn addr(h: &Host) -> String {
    h.addr().to_string()
}

#[test]
fn the_underlay_answers_members_only_and_gossip_is_sealed() -> Result<()> {
    if !require_root()? {
        return Ok(());
    }
    let c = Cluster::new(ClusterOpts {
        hosts: 3,
        start_daemons: false,
        name_hint: "underlay_security",
    })?;
    for h in c.hosts() {
        h.start_daemon_with(&["--gossip-key-rotation", ROTATION])?;
    }
    form_swarm(&c, 1)?;
    let (h1, h2, h3) = (c.host(1), c.host(2), c.host(3));
    let all: Vec<String> = {
        let mut v: Vec<String> = c.hosts().iter().map(addr).collect();
        v.sort();
        v
    };
    // Every node's filter lets exactly the three nodes through, and each has a key.
    for h in c.hosts() {
        wait_for(
            &format!("{}: filter of the 3 members, and gossip keys", h.name()),
            Duration::from_secs(15),
            Duration::from_millis(200),
            || Ok((nft_members(h)? == Some(all.clone()) && !key_ids(h)?.is_empty()).then_some(())),
        )?;
        ensure!(gossip(h)?["encrypted"] == true);
    }

    // A sink task on h2, on an overlay network.
    h1.mesh_ok(&["network", "create", "secnet"])?;
    let vni = vni_of(h1, "secnet")?;
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "sink",
        "--network",
        "secnet",
        "--constraint",
        "node.hostname==h2",
        "--",
        "python3",
        "-c",
        SINK,
    ])?;
    let task = wait_for(
        "the sink task on h2 with an address",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            Ok(network_tasks(h1, "secnet", Some("sink"))?
                .into_iter()
                .find(|t| t.node == "h2" && !t.ip.is_empty()))
        },
    )?;
    let ifaces = task_exec(h2, &task.name, &["ip", "-o", "-4", "addr", "show"])?;
    let ifname = ifaces
        .lines()
        .find(|l| l.contains(&format!(" {}/", task.ip)))
        .and_then(|l| l.split_whitespace().nth(1))
        .context("the task's overlay interface")?
        .to_string();
    let mac = task_exec(
        h2,
        &task.name,
        &["cat", &format!("/sys/class/net/{ifname}/address")],
    )?
    .trim()
    .to_string();
    // An unused address of the network's subnet as the inner source.
    let src = {
        let mut o: Vec<&str> = task.ip.split('.').collect();
        o[3] = "250";
        o.join(".")
    };
    eprintln!("sink {} at {} ({mac}) on VNI {vni}", task.name, task.ip);
    let logs = || h1.mesh_ok(&["service", "logs", "sink"]);
    // Waits until the sink's port is open (the task may still be starting).
    wait_for(
        "the sink listens",
        Duration::from_secs(15),
        Duration::from_millis(300),
        || {
            let out = task_exec(h2, &task.name, &["ss", "-lun"])?;
            Ok(out.contains(":9999").then_some(()))
        },
    )?;
    let send_from = |who: &dyn Fn(&[&str]) -> Result<std::process::Output>, payload: &str| {
        let out = who(&[
            "python3",
            "-c",
            SEND_VXLAN,
            &vni.to_string(),
            &mac,
            &task.ip,
            &src,
            SINK_PORT,
            payload,
            &addr(h2),
            "5",
        ])?;
        ensure!(
            out.status.success(),
            "sending VXLAN frames: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };

    // (a) From a stranger on the underlay: dropped before the VXLAN socket sees it.
    let stranger = Stranger::new(&c)?;
    let dropped_before = nft_counter(h2, "vxlan_dropped")?;
    send_from(&|a| stranger.exec(a), "from-the-stranger")?;
    // Then the same frame from a member (h3): it reaches the task.
    send_from(&|a| h3.exec(a), "from-a-member")?;
    wait_for(
        "the member's frame reaches the sink",
        Duration::from_secs(10),
        Duration::from_millis(300),
        || Ok(logs()?.contains("GOT from-a-member").then_some(())),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let l = logs()?;
    ensure!(
        !l.contains("from-the-stranger"),
        "a stranger's VXLAN frame reached the task:\n{l}"
    );
    let dropped = nft_counter(h2, "vxlan_dropped")? - dropped_before;
    ensure!(dropped >= 5, "the filter counted {dropped} dropped frames");
    // The stranger cannot reach the gossip port either.
    let g_before = nft_counter(h1, "gossip_dropped")?;
    let out = stranger.exec(&[
        "python3",
        "-c",
        "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nfor i in range(3): s.sendto(b'MG\\x81hello',(sys.argv[1],7946))",
        &addr(h1),
    ])?;
    ensure!(out.status.success());
    wait_for(
        "h1 drops the stranger's gossip packets",
        Duration::from_secs(5),
        Duration::from_millis(100),
        || Ok((nft_counter(h1, "gossip_dropped")? >= g_before + 3).then_some(())),
    )?;

    // (b) Gossip on the wire is sealed; a captured packet with one bit flipped, sent from a
    // member's address (h3) to h1, is dropped and counted.
    let out = c.client_exec(&["python3", "-c", CAPTURE_GOSSIP, "7946", "v1"])?;
    ensure!(
        out.status.success(),
        "no gossip packet captured: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let captured = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(
        captured.starts_with("4d4781"),
        "gossip on the wire is not sealed: {captured}"
    );
    let bad_before = counter(h1, "bad_tag")?;
    let out = h3.exec(&[
        "python3",
        "-c",
        SEND_FLIPPED,
        &captured,
        "30",
        &addr(h1),
        "7946",
        &addr(h3),
    ])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(
        "h1 counts the tampered packets",
        Duration::from_secs(5),
        Duration::from_millis(100),
        || Ok((counter(h1, "bad_tag")? >= bad_before + 3).then_some(())),
    )?;
    eprintln!("h1 gossip after tampering: {}", gossip(h1)?);

    // Keys rotate on schedule and gossip goes on: a newer key, and syncs still succeed.
    let first = *key_ids(h1)?.last().context("a key")?;
    let syncs = counter(h2, "syncs")?;
    wait_for(
        "a key rotation reaches every node",
        Duration::from_secs(20),
        Duration::from_millis(300),
        || {
            let mut ok = true;
            for h in c.hosts() {
                ok &= key_ids(h)?.last().is_some_and(|k| *k > first);
            }
            Ok(ok.then_some(()))
        },
    )?;
    ensure!(key_ids(h1)?.len() <= 3, "at most three keys kept");
    wait_for(
        "h2 still syncs after rotations",
        Duration::from_secs(15),
        Duration::from_millis(300),
        || Ok((counter(h2, "syncs")? > syncs).then_some(())),
    )?;

    // SIGKILL and restart of h2's daemon: the filter stays while it is down, it is taken
    // over (not duplicated), and the node gets keys and gossips again.
    h2.kill_daemon()?;
    ensure!(
        nft_members(h2)? == Some(all.clone()),
        "h2's filter is gone while its daemon is down"
    );
    h2.restart_daemon()?;
    wait_for(
        "h2 has keys again and syncs",
        Duration::from_secs(20),
        Duration::from_millis(300),
        || Ok((!key_ids(h2)?.is_empty() && counter(h2, "syncs")? > 0).then_some(())),
    )?;
    ensure!(tables(h2)? == 1, "one filter table on h2");
    ensure!(nft_members(h2)? == Some(all.clone()));
    send_from(&|a| h3.exec(a), "after-the-restart")?;
    wait_for(
        "frames from a member still reach the sink after h2's restart",
        Duration::from_secs(10),
        Duration::from_millis(300),
        || Ok(logs()?.contains("GOT after-the-restart").then_some(())),
    )?;

    // (c) A worker removed: its address leaves the others' filters, and the keys it knew
    // are retired at once (a single new key).
    let before = *key_ids(h1)?.last().context("a key")?;
    h1.mesh_ok(&["node", "rm", "--force", "h3"])?;
    let remaining = vec![addr(h1), addr(h2)];
    for h in [h1, h2] {
        wait_for(
            &format!("{}: h3 leaves the filter", h.name()),
            Duration::from_secs(10),
            Duration::from_millis(200),
            || {
                let g = gossip(h)?;
                let members: Vec<String> = g["members"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                Ok(
                    (nft_members(h)? == Some(remaining.clone()) && members == remaining)
                        .then_some(()),
                )
            },
        )?;
        wait_for(
            &format!("{}: the keys h3 knew are retired", h.name()),
            Duration::from_secs(10),
            Duration::from_millis(200),
            || {
                let ids = key_ids(h)?;
                Ok((ids.first().is_some_and(|k| *k > before)).then_some(()))
            },
        )?;
    }
    // h3 learnt it was removed and left: its filter is gone with the swarm.
    wait_for(
        "h3 removes its filter when it leaves",
        Duration::from_secs(15),
        Duration::from_millis(300),
        || Ok((tables(h3)? == 0).then_some(())),
    )?;
    // h3's frames are now a stranger's.
    let dropped_before = nft_counter(h2, "vxlan_dropped")?;
    send_from(&|a| h3.exec(a), "from-the-removed-node")?;
    wait_for(
        "h2 drops the removed node's frames",
        Duration::from_secs(5),
        Duration::from_millis(100),
        || Ok((nft_counter(h2, "vxlan_dropped")? >= dropped_before + 5).then_some(())),
    )?;

    // The control: without the filter, the stranger's very frame reaches the task (so the
    // test above could fail).
    let out = h2.exec(&["nft", "delete", "table", "ip", "mesh_underlay"])?;
    ensure!(out.status.success());
    send_from(&|a| stranger.exec(a), "unfiltered-stranger")?;
    let reached = wait_for(
        "without the filter, the stranger's frame reaches the sink",
        Duration::from_secs(10),
        Duration::from_millis(300),
        || Ok(logs()?.contains("GOT unfiltered-stranger").then_some(())),
    );
    if let Err(e) = reached {
        bail!("the crafted frame is not a valid one, the test proves nothing: {e:#}");
    }
    ensure!(
        !logs()?.contains("from-the-removed-node") && !logs()?.contains("from-the-stranger"),
        "filtered frames reached the sink"
    );
    Ok(())
}

/// A node that joins is let through the leader's filter before its join returns: it gossips
/// at once with the managers (the leader first), so a filter applied a moment after the
/// answer dropped its first gossip packets, and a dropped TCP SYN held its plane's start
/// (every pass, the routing mesh included) for the 1 s, 3 s, ... of TCP's SYN backoff.
#[test]
fn a_joining_node_is_let_through_before_its_join_returns() -> Result<()> {
    if !require_root()? {
        return Ok(());
    }
    let c = Cluster::new(ClusterOpts {
        hosts: 5,
        start_daemons: true,
        name_hint: "admit",
    })?;
    let h1 = c.host(1);
    h1.mesh_ok(&["swarm", "init", "--advertise-addr", &addr(h1)])?;
    let worker = h1.mesh_ok(&["swarm", "join-token", "-q", "worker"])?;
    let manager = h1.mesh_ok(&["swarm", "join-token", "-q", "manager"])?;
    let remote = format!("{}:2377", h1.addr());
    for h in &c.hosts()[1..] {
        let token = if h.index() == 2 { &manager } else { &worker };
        h.mesh_ok(&[
            "swarm",
            "join",
            "--advertise-addr",
            &addr(h),
            "--token",
            token.trim(),
            &remote,
        ])?;
        let members = nft_members(h1)?.unwrap_or_default();
        ensure!(
            members.contains(&addr(h)),
            "{} joined, and the leader's filter holds {members:?}",
            h.name()
        );
    }
    // Every node's gossip started (each has its keys and has pushed and pulled): nothing a
    // member sent was dropped by the leader.
    for h in c.hosts() {
        wait_for(
            &format!("{}: gossip keys", h.name()),
            Duration::from_secs(20),
            Duration::from_millis(200),
            || Ok((!key_ids(h)?.is_empty()).then_some(())),
        )?;
    }
    std::thread::sleep(Duration::from_secs(1));
    let dropped = nft_counter(h1, "gossip_dropped")?;
    ensure!(
        dropped == 0,
        "the leader dropped {dropped} gossip packets of members"
    );
    Ok(())
}
