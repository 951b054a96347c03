//! Encrypted overlays (`network create --opt encrypted`) on a real cluster (h1 manager, h2
//! worker), with the userspace tunnel this kernel needs (no ESP, no WireGuard):
//!
//! - a task on h1 sends 256 KiB carrying a known text to a task on h2 over an encrypted
//!   network, by service name, and gets the byte count back: while it does, a raw socket on
//!   h2's underlay interface sees the tunnel's datagrams and not one copy of the text, nor a
//!   VXLAN packet;
//! - the same over a plain network: the capture does see the text, so the check can fail;
//! - `network inspect` (mesh and docker) shows the option; an unknown option is refused;
//! - with h1's daemon SIGKILLed (its tunnel device gone with it), a connection from h1's
//!   task fails and nothing of the encrypted network leaves h1, in the clear or not; the
//!   restarted daemon carries it again.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mesh_netns::swarm::{
    expect_err, field, form_swarm, network_tasks, service_ps, sleep_pids, task_exec,
};
use mesh_netns::{require_root, wait_for, Cluster, ClusterOpts, Host};

const SECRET: &str = "MESH-KNOWN-PLAINTEXT-7f3a9c";

/// Echo of the byte count on TCP 8080.
const SERVER: &str = "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',8080))\ns.listen(16)\nwhile True:\n c,_=s.accept()\n n=0\n while True:\n  b=c.recv(65536)\n  if not b: break\n  n+=len(b)\n c.sendall(str(n).encode())\n c.close()";

/// Captures on `eth0` for the given seconds; prints `frames tunnel vxlan found`.
const CAPTURE: &str = "import socket,sys,time\nsecret=sys.argv[1].encode()\ns=socket.socket(socket.AF_PACKET,socket.SOCK_RAW,socket.htons(3))\ns.bind(('eth0',0))\ns.settimeout(0.2)\nend=time.time()+float(sys.argv[2])\nframes=tun=vx=found=0\nwhile time.time()<end:\n try:\n  f=s.recv(65535)\n except socket.timeout:\n  continue\n frames+=1\n if secret in f: found+=1\n if len(f)>=38 and f[12:14]==b'\\x08\\x00' and f[23]==17:\n  ihl=(f[14]&15)*4\n  d=int.from_bytes(f[14+ihl+2:14+ihl+4],'big')\n  if d==4791: tun+=1\n  if d in (4789,4790): vx+=1\nprint(frames,tun,vx,found)";

/// The client: sends 256 KiB made of the secret to `name`:8080, prints the answer.
fn client(name: &str) -> String {
    client_within(name, 10)
}

fn client_within(name: &str, secs: u32) -> String {
    format!(
        "import socket\nc=socket.create_connection(('{name}',8080),timeout={secs})\nd=(b'{SECRET} '*10000)[:262144]\nc.sendall(d)\nc.shutdown(socket.SHUT_WR)\nprint(c.recv(100).decode())"
    )
}

/// Client task commands: a sleep of its own per network, to find its process.
fn client_sleep(net: &str) -> u32 {
    if net == "sec" {
        100_611
    } else {
        100_612
    }
}

/// Parses the capture's `frames tunnel vxlan found`.
fn counts(out: &std::process::Output) -> Result<(u64, u64, u64, u64)> {
    ensure!(out.status.success(), "capture: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let n: Vec<u64> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("capture said {text:?}"))?;
    ensure!(n.len() == 4, "capture said {text:?}");
    Ok((n[0], n[1], n[2], n[3]))
}

fn running_on(h1: &Host, svc: &str) -> Result<String> {
    wait_for(
        &format!("{svc} running"),
        Duration::from_secs(30),
        Duration::from_millis(250),
        || {
            Ok(service_ps(h1, svc)?
                .iter()
                .find(|t| field(t, "CurrentState").starts_with("Running"))
                .map(|t| field(t, "ID").to_string()))
        },
    )
}

/// Sends the secret from the client task to the server over `net`, capturing on h2
/// meanwhile: the capture's counts.
fn send_captured(h1: &Host, h2: &Host, net: &str) -> Result<(u64, u64, u64, u64)> {
    let client_task = running_on(h1, &format!("cli-{net}"))?;
    let server = format!("srv-{net}");
    // The server answers by name before anything is captured (names, ARP, first packets).
    wait_for(
        &format!("{server} answering over {net}"),
        Duration::from_secs(40),
        Duration::from_millis(500),
        || {
            let code = client_within(&server, 3);
            let out = task_exec(h1, &client_task, &["python3", "-c", &code]);
            Ok(out.ok().filter(|o| o.trim() == "262144"))
        },
    )?;
    let (captured, sent) = std::thread::scope(|s| {
        let cap = s.spawn(|| {
            h2.exec_timeout(
                &["python3", "-c", CAPTURE, SECRET, "4"],
                Duration::from_secs(15),
            )
        });
        std::thread::sleep(Duration::from_millis(1000));
        let sent = task_exec(h1, &client_task, &["python3", "-c", &client(&server)]);
        (cap.join(), sent)
    });
    let sent = sent?;
    ensure!(sent.trim() == "262144", "the server counted {sent:?}");
    let n = counts(&captured.map_err(|_| anyhow::anyhow!("capture panicked"))??)?;
    eprintln!(
        "{net}: frames {} tunnel {} vxlan {} with the text {}",
        n.0, n.1, n.2, n.3
    );
    Ok(n)
}

#[test]
fn encrypted_networks_carry_no_plaintext_on_the_underlay() -> Result<()> {
    if !require_root()? {
        return Ok(());
    }
    let c = Cluster::new(ClusterOpts {
        hosts: 2,
        start_daemons: true,
        name_hint: "encov",
    })?;
    form_swarm(&c, 1)?;
    let (h1, h2) = (c.host(1), c.host(2));
    expect_err(
        h1,
        &[
            "network", "create", "-d", "overlay", "--opt", "mtu=1400", "bad",
        ],
        "invalid option \"mtu\"",
    )?;
    h1.mesh_ok(&[
        "network",
        "create",
        "-d",
        "overlay",
        "--opt",
        "encrypted",
        "sec",
    ])?;
    h1.mesh_ok(&["network", "create", "-d", "overlay", "plain"])?;
    let inspect = h1.mesh_ok(&["network", "inspect", "sec"])?;
    ensure!(inspect.contains("\"encrypted\": \"\""), "{inspect}");
    let docker = h1.docker_ok(&["network", "inspect", "--format", "{{json .Options}}", "sec"])?;
    ensure!(docker.contains("\"encrypted\":\"\""), "{docker}");
    for net in ["sec", "plain"] {
        for (svc, node, cmd) in [
            (
                format!("srv-{net}"),
                "h2",
                vec!["python3".to_string(), "-c".into(), SERVER.into()],
            ),
            (
                format!("cli-{net}"),
                "h1",
                vec!["sleep".to_string(), client_sleep(net).to_string()],
            ),
        ] {
            let mut args = vec![
                "service".to_string(),
                "create".into(),
                "--name".into(),
                svc,
                "--network".into(),
                net.into(),
                "--constraint".into(),
                format!("node.hostname=={node}"),
                "--".into(),
            ];
            args.extend(cmd);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            h1.mesh_ok(&args)?;
        }
    }

    let (frames, tunnel, vxlan, found) = send_captured(h1, h2, "sec")?;
    ensure!(
        frames > 0 && tunnel > 100,
        "no tunnel traffic seen: {frames} frames, {tunnel} tunnel"
    );
    ensure!(
        vxlan == 0,
        "{vxlan} VXLAN packets of the encrypted network on the underlay"
    );
    ensure!(
        found == 0,
        "{found} frames with the plaintext on the underlay"
    );

    let (_, tunnel, vxlan, found) = send_captured(h1, h2, "plain")?;
    // (Few, big segments: the plain overlay is offloaded, the tunnel is not.)
    ensure!(
        vxlan > 0 && tunnel == 0,
        "plain network: vxlan {vxlan}, tunnel {tunnel}"
    );
    ensure!(found > 0, "the capture does not see a plain network's text");

    // h1's daemon down: its tunnel device is gone, the blackhole takes the packets.
    let srv_ip = network_tasks(h1, "sec", Some("srv-sec"))?
        .first()
        .context("no srv-sec task")?
        .ip
        .clone();
    let cli_pid = *sleep_pids(client_sleep("sec"))
        .first()
        .context("no cli-sec process")?;
    h1.kill_daemon()?;
    let (captured, sent) = std::thread::scope(|s| {
        let cap = s.spawn(|| {
            h1.exec_timeout(
                &["python3", "-c", CAPTURE, SECRET, "4"],
                Duration::from_secs(15),
            )
        });
        std::thread::sleep(Duration::from_millis(1000));
        let pid = cli_pid.to_string();
        let code = client_within(&srv_ip, 2);
        let sent = std::process::Command::new("nsenter")
            .args(["-t", &pid, "-n", "python3", "-c", &code])
            .output();
        (cap.join(), sent)
    });
    let sent = sent?;
    ensure!(
        !sent.status.success(),
        "a connection over the encrypted network worked with the daemon down: {sent:?}"
    );
    let (_, _, vxlan, found) =
        counts(&captured.map_err(|_| anyhow::anyhow!("capture panicked"))??)?;
    ensure!(
        vxlan == 0 && found == 0,
        "with the daemon down: {vxlan} VXLAN packets, {found} with the text"
    );
    h1.start_daemon()?;
    let (_, tunnel, vxlan, found) = send_captured(h1, h2, "sec")?;
    ensure!(
        tunnel > 20 && vxlan == 0 && found == 0,
        "after the restart: tunnel {tunnel}, vxlan {vxlan}, text {found}"
    );
    Ok(())
}
