//! A task that joins a VIP on another node is reachable from the first connection a client
//! makes to it: the node of the client programs the overlay's ARP and FDB entries of a new
//! remote endpoint before its balancer may send a connection there.
//!
//! The overlay runs with learning off and answers ARP from its static entries only (proxy
//! ARP), so a SYN sent to an address those entries do not hold yet waits for the task's ARP
//! retry, a second later (or is lost, when the task is gone by then: a failed call in the
//! 30-minute soak, seed 20261209). A client on h3 calls the VIP of a service on h2 in a tight
//! loop while the service is scaled up and down several times: every scale-up adds endpoints
//! with addresses never used before (the allocator hands them out serially), and the client
//! picks them at once. No call may take a second; the check is run with each balancer.
//!
//! The other way round: a new task's first call to a service on another node is answered at
//! once. The server's answer needs the client's address in the server node's overlay, and
//! the client's node announces it (flagged starting: no name or VIP leads there yet) while
//! the task's start is still in its network gate, before the command runs. Eight client
//! tasks on h3 each time their first call to the service on h2.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Result};
use mesh_netns::swarm::{swarm_cluster_with, vip_of};
use mesh_netns::wait_for;

/// Answers each connection on 8080 with its hostname and closes it.
const SERVER: &str = "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',8080))\ns.listen(512)\nh=socket.gethostname().encode()\nwhile True:\n c,_=s.accept()\n try:\n  c.sendall(h)\n except OSError:\n  pass\n c.close()";

/// `python3 -c CLIENT OUT VIP`: connects to VIP:8080 every 2 ms (at most 100,000 calls or 10
/// minutes) and writes one line per call to OUT: `ok SECONDS HOSTNAME START`,
/// `refused SECONDS START` (the new task's process does not listen yet: retried by the next
/// call), or `fail SECONDS ERROR START`. SECONDS is how long the call took, START when it
/// began (Unix time, to match the daemons' logs).
const CLIENT: &str = r#"import socket,sys,time
out,vip=sys.argv[1],sys.argv[2]
f=open(out,'w',buffering=1)
end=time.time()+600
n=0
while n<100000 and time.time()<end:
 n+=1
 t=time.time()
 try:
  c=socket.create_connection((vip,8080),timeout=3);c.settimeout(3);b=c.recv(200);c.close()
  if not b:
   raise OSError('empty answer')
  f.write('ok %.3f %s %.3f\n'%(time.time()-t,b.decode(),t))
 except ConnectionRefusedError:
  f.write('refused %.3f %.3f\n'%(time.time()-t,t))
 except Exception as e:
  f.write('fail %.3f %s %.3f\n'%(time.time()-t,repr(e).replace(' ','_'),t))
 time.sleep(0.002)
"#;

/// `python3 -c FIRST OUT VIP`: times one call to VIP:8080 made as soon as the task runs
/// (retrying a refused connect, 5 ms apart, 100 times at most), appends `first SECONDS` (or
/// `fail SECONDS ERROR`) to OUT, then sleeps.
const FIRST: &str = r#"import socket,sys,time
out,vip=sys.argv[1],sys.argv[2]
t=time.time()
line=None
for i in range(100):
 try:
  c=socket.create_connection((vip,8080),timeout=3);c.settimeout(3);b=c.recv(200);c.close()
  line='first %.3f\n'%(time.time()-t)
  break
 except ConnectionRefusedError:
  time.sleep(0.005)
 except Exception as e:
  line='fail %.3f %s\n'%(time.time()-t,repr(e).replace(' ','_'))
  break
open(out,'a').write(line or 'fail %.3f refused\n'%(time.time()-t))
time.sleep(100000)
"#;
/// How many client tasks time their first call.
const FRESH: usize = 8;

/// How many times the service goes from 1 replica to [`UP`] and back.
const CYCLES: usize = 4;
const UP: &str = "6";
/// A call slower than this waited for an ARP or SYN retry (one second): a local call over
/// the overlay takes a millisecond or two, a few tens on a loaded machine.
const SLOW: f64 = 0.8;

#[test]
fn new_remote_backends_answer_the_first_call_ebpf() -> Result<()> {
    first_calls_answered("auto", "newbe-ebpf")
}

#[test]
fn new_remote_backends_answer_the_first_call_nftables() -> Result<()> {
    first_calls_answered("nftables", "newbe-nft")
}

fn first_calls_answered(lb_backend: &str, name_hint: &'static str) -> Result<()> {
    let Some(c) = swarm_cluster_with(3, 1, name_hint, &["--lb-backend", lb_backend])? else {
        return Ok(());
    };
    let h1 = c.host(1);
    h1.mesh_ok(&["network", "create", "appnet"])?;
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--network",
        "appnet",
        "--constraint",
        "node.hostname==h2",
        "--",
        "python3",
        "-c",
        SERVER,
    ])?;
    let vip = vip_of(h1, "web")?;
    let log = c.base_dir().join("new-backends.log");
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "cli",
        "--network",
        "appnet",
        "--constraint",
        "node.hostname==h3",
        "--",
        "python3",
        "-c",
        CLIENT,
        &log.to_string_lossy(),
        &vip,
    ])?;
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for(
        "the client calling web",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || Ok((read().lines().filter(|l| l.starts_with("ok")).count() > 50).then_some(())),
    )?;
    // Only the calls from here on count: the client's own first calls may wait for its
    // record to reach h2 (the server's answer needs the client's entries there), a
    // different race, which the scaling below does not exercise.
    let warm = read().lines().count();
    for _ in 0..CYCLES {
        h1.mesh_ok(&["service", "scale", &format!("web={UP}")])?;
        std::thread::sleep(Duration::from_secs(1));
        h1.mesh_ok(&["service", "scale", "web=1"])?;
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = read();
    let mut calls = 0;
    let mut slow = Vec::new();
    let mut failed = Vec::new();
    let mut refused = 0;
    let mut hosts = BTreeSet::new();
    for l in out.lines().skip(warm) {
        let w: Vec<&str> = l.split_whitespace().collect();
        let took: f64 = w.get(1).and_then(|s| s.parse().ok()).unwrap_or(0.0);
        calls += 1;
        if took > SLOW {
            slow.push(l);
        }
        match w.first() {
            Some(&"ok") => {
                hosts.extend(w.get(2).map(|s| s.to_string()));
            }
            Some(&"refused") => refused += 1,
            _ => failed.push(l),
        }
    }
    eprintln!(
        "{lb_backend}: {calls} calls, {} answering tasks, {refused} refused (not listening yet), {} slow, {} failed",
        hosts.len(),
        slow.len(),
        failed.len()
    );
    ensure!(
        slow.is_empty(),
        "{} calls waited for a retry (over {SLOW} s): {slow:?}",
        slow.len()
    );
    ensure!(failed.is_empty(), "failed calls: {failed:?}");
    // The client reached the new tasks: the checks could have failed.
    ensure!(
        hosts.len() > CYCLES * 3,
        "the client reached only {} tasks: {hosts:?}",
        hosts.len()
    );

    // New clients: their first calls.
    let first = c.base_dir().join("first-calls.log");
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "fresh",
        "--replicas",
        &FRESH.to_string(),
        "--network",
        "appnet",
        "--constraint",
        "node.hostname==h3",
        "--",
        "python3",
        "-c",
        FIRST,
        &first.to_string_lossy(),
        &vip,
    ])?;
    let lines = wait_for(
        "the new clients' first calls",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let out = std::fs::read_to_string(&first).unwrap_or_default();
            Ok((out.lines().count() >= FRESH).then_some(out))
        },
    )?;
    eprintln!("{lb_backend}: first calls of new clients: {lines:?}");
    let bad: Vec<&str> = lines
        .lines()
        .filter(|l| {
            !l.starts_with("first ")
                || l.split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse::<f64>().ok())
                    .is_none_or(|t| t > SLOW)
        })
        .collect();
    ensure!(
        bad.is_empty(),
        "first calls of new clients that failed or waited for a retry: {bad:?}"
    );
    Ok(())
}
