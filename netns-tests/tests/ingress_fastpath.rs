//! The routing mesh's eBPF fast path (`ebpf/nodeport.c`) on the real kernel, through h3, a
//! node without a task: downloads arrive whole (their replies take the GSO path through h3's
//! sandbox); connections keep flowing, none failing, while backends are added and
//! while h3's daemon is SIGKILLed and restarted (the restarted one adopts the programs and
//! their flow tables: an open connection keeps its task), and then h2's, which runs tasks
//! (its fast path hands them the VXLAN from h3 past the overlay); a UDP client whose task is killed
//! moves to another task at once (the fast path forgets a removed backend's flows); a daemon
//! restarted over the programs of another build (an upgrade) puts its own in their place and
//! keeps every held connection on its task; connections handed to a local task stay there
//! when the backends change and while that node is upgraded (its local tasks' veths carried
//! over); a node leaving the swarm takes its filters away,
//! also when it left while its daemon was down. And a task's node behind a router (its VTEP
//! not on the entry node's link) is reached by the route.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use mesh_netns::swarm::swarm_cluster;
use mesh_netns::{wait_for, Cluster, Host};

/// A TCP server answering each connection with its hostname.
const TCP_SERVER: &str = "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',8080))\ns.listen(128)\nwhile True:\n c,a=s.accept()\n c.sendall(socket.gethostname().encode())\n c.close()";
/// A TCP echo server (one thread per connection); `who` is answered with its hostname.
const ECHO_SERVER: &str = "import socket,threading\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',9090))\ns.listen(16)\ndef h(c):\n while True:\n  d=c.recv(100)\n  if not d:\n   break\n  c.sendall(socket.gethostname().encode() if d==b'who' else d)\nwhile True:\n c,a=s.accept()\n threading.Thread(target=h,args=(c,),daemon=True).start()";
/// A UDP server answering each datagram with its hostname.
const UDP_SERVER: &str = "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',5353))\nwhile True:\n d,a=s.recvfrom(100)\n s.sendto(socket.gethostname().encode(),a)";
/// A TCP server that reads 16 MiB of the repeated bytes 0..=255 from each connection, and
/// answers `ok` and the same 16 MiB if they were those, else `no`.
const BULK_SERVER: &str = "import socket,threading\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',7070))\ns.listen(16)\nb=bytes(range(256))*65536\ndef h(c):\n d=bytearray()\n while len(d)<len(b):\n  x=c.recv(1<<20)\n  if not x:\n   break\n  d+=x\n c.sendall(b'ok'+b if d==b else b'no')\n c.close()\nwhile True:\n c,a=s.accept()\n threading.Thread(target=h,args=(c,),daemon=True).start()";
/// Uploads BULK_SERVER's 16 MiB to ADDR:7070 and downloads its answer; prints `ok BYTES` if
/// the answer was `ok` and the same bytes, else `bad BYTES`.
const BULK_CLIENT: &str = "import socket,sys\nb=bytes(range(256))*65536\nc=socket.create_connection((sys.argv[1],7070),timeout=10)\nc.sendall(b)\nd=bytearray()\nwhile True:\n x=c.recv(1<<20)\n if not x:\n  break\n d+=x\nprint('ok' if d==b'ok'+b else 'bad',len(d))";
/// N connections to ADDR:9090 held open for SECS seconds, each asking `who` every 100 ms.
/// Prints `held OK FAIL` (FAIL: an error, or an answer from another task than the
/// connection's first), `failed SECONDS CONNECTION WHAT` for each failure, and `start` once
/// all are open.
const HELD: &str = "import socket,sys,time\naddr,n,secs=sys.argv[1],int(sys.argv[2]),float(sys.argv[3])\nt0=time.time()\ncs=[socket.create_connection((addr,9090),timeout=3) for _ in range(n)]\nfirst=[None]*n;live=set(range(n));ok=0;bad=[]\nprint('start',flush=True)\nwhile time.time()<t0+secs and live:\n for i in sorted(live):\n  try:\n   cs[i].sendall(b'who');d=cs[i].recv(100).decode()\n   first[i]=first[i] or d\n   if d==first[i]:\n    ok+=1\n   else:\n    bad.append((time.time()-t0,i,first[i]+' -> '+d));live.discard(i)\n  except OSError as e:\n   bad.append((time.time()-t0,i,repr(e)));live.discard(i)\n time.sleep(0.1)\nprint('held',ok,len(bad))\nfor b in bad:\n print('failed %.3f %d %s'%b)";
/// COUNT new connections to ADDR:9090, one `who` each; prints the distinct answers.
const WHO: &str = "import socket,sys\nseen=set()\nfor _ in range(int(sys.argv[2])):\n try:\n  c=socket.create_connection((sys.argv[1],9090),timeout=3);c.sendall(b'who');seen.add(c.recv(100).decode());c.close()\n except OSError:\n  pass\nprint(' '.join(sorted(seen)))";
/// For SECS seconds: new connections to ADDR:8080 one after another, and one echo connection
/// to ADDR:9090 kept open, pinged every 100 ms. Prints `conns OK FAIL`, `echo OK FAIL`, and
/// `failed SECONDS CLIENT_PORT WHAT` for each failed connection.
const LOAD: &str = "import socket,sys,time,threading\naddr,secs=sys.argv[1],float(sys.argv[2])\nt0=time.time();end=t0+secs\nr={'c':[0,0],'e':[0,0]};bad=[]\ndef conns():\n while time.time()<end:\n  p=0\n  try:\n   c=socket.create_connection((addr,8080),timeout=3);p=c.getsockname()[1];d=c.recv(100);c.close()\n   r['c'][0 if d else 1]+=1\n   if not d:\n    bad.append((time.time()-t0,p,'empty'))\n  except OSError as e:\n   r['c'][1]+=1;bad.append((time.time()-t0,p,repr(e)))\nt=threading.Thread(target=conns);t.start()\ne=socket.create_connection((addr,9090),timeout=3)\nwhile time.time()<end:\n try:\n  e.sendall(b'ping');d=e.recv(100)\n  r['e'][0 if d==b'ping' else 1]+=1\n except OSError:\n  r['e'][1]+=1\n  break\n time.sleep(0.1)\nt.join()\nprint('conns',*r['c']);print('echo',*r['e'])\nfor b in bad:\n print('failed %.3f %d %s'%b)";
/// One UDP socket bound to port 40555, a datagram to ADDR:PORT every 50 ms for SECS seconds
/// (or one answer when SECS is 0); prints `TIME HOSTNAME` per answer.
const UDP_CLIENT: &str = "import socket,sys,time\naddr,port,secs=sys.argv[1],int(sys.argv[2]),float(sys.argv[3])\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('',40555));s.settimeout(0.05)\nt0=time.time()\nwhile True:\n s.sendto(b'x',(addr,port))\n try:\n  d=s.recv(100);print('%.3f %s'%(time.time()-t0,d.decode()),flush=True)\n  if secs==0:\n   break\n except OSError:\n  pass\n if secs and time.time()-t0>secs:\n  break\n time.sleep(0.05)";

/// Creates service `name`: 2 tasks of `server`, off h3. With `listen` (a TCP port), a health
/// check that passes once the server listens on it: a task joins the routing mesh only then
/// (a task without a check joins when it starts, and may refuse the first connections).
fn create(h: &Host, name: &str, publish: &str, server: &str, listen: Option<u16>) -> Result<()> {
    let check = listen.map(|p| format!("grep -q ':{p:04X} 00000000:0000 0A' /proc/net/tcp"));
    let mut argv = vec![
        "service",
        "create",
        "--name",
        name,
        "--replicas",
        "2",
        "--publish",
        publish,
        "--constraint",
        "node.hostname!=h3",
    ];
    if let Some(check) = &check {
        argv.extend(["--health-cmd", check, "--health-interval", "100ms"]);
    }
    argv.extend(["--", "python3", "-c", server]);
    h.mesh_ok(&argv)?;
    Ok(())
}

/// Conntrack entries of connections from `client` to port `port` in the namespaces of `h`: its
/// own and those its daemon holds (the ingress sandbox, the overlays), as `namespace: entry`.
fn tracked_anywhere(h: &Host, client: &str, port: u16) -> Result<Vec<String>> {
    let (src, dport) = (format!(" src={client} "), format!(" dport={port} "));
    let mut tables = vec![(
        "host".to_string(),
        "/proc/self/net/nf_conntrack".to_string(),
    )];
    for (name, pid) in h.held_namespaces() {
        tables.push((name, format!("/proc/{pid}/net/nf_conntrack")));
    }
    ensure!(
        tables.len() > 2,
        "no namespaces held by {}'s daemon: {tables:?}",
        h.name()
    );
    let mut out = Vec::new();
    for (name, table) in tables {
        let text = h.exec(&["cat", &table])?;
        for l in String::from_utf8_lossy(&text.stdout).lines() {
            if l.contains(&src) && l.contains(&dport) {
                out.push(format!("{name}: {l}"));
            }
        }
    }
    Ok(out)
}

/// `(ID, node)` of the running tasks of `svc`.
fn running(c: &Cluster, svc: &str) -> Result<Vec<(String, String)>> {
    let rows = c.host(1).mesh_json(&["service", "ps", svc])?;
    let s = |r: &serde_json::Value, k: &str| r[k].as_str().unwrap_or_default().to_string();
    Ok(rows
        .as_array()
        .context("ps rows")?
        .iter()
        .filter(|r| {
            s(r, "DesiredState") == "Running" && s(r, "CurrentState").starts_with("Running")
        })
        .map(|r| (s(r, "ID"), s(r, "Node")))
        .collect())
}

/// SIGKILLs the processes of task `id` on `h` (its cgroup's); how many.
fn kill_task(h: &Host, id: &str) -> usize {
    h.task_pids(id)
        .iter()
        // SAFETY: kill(2) with pids read from the task's cgroup.
        .filter(|p| unsafe { libc::kill(**p, libc::SIGKILL) } == 0)
        .count()
}

/// SIGKILLs `h`'s daemon and starts it over the state file of a daemon built with other
/// programs (an upgrade); returns once the new daemon has put its own in their place, with
/// the new log's `took over` line (what it carried over from the old maps).
fn upgrade(h: &Host) -> Result<String> {
    h.kill_daemon()?;
    let state = h.exec_root().join(STATE_FILE);
    let mut st: serde_json::Value = serde_json::from_slice(&std::fs::read(&state)?)?;
    let object = st["config"]["object"]
        .as_u64()
        .context("no object fingerprint in the state file")?;
    st["config"]["object"] = (object ^ 1).into();
    std::fs::write(&state, serde_json::to_vec(&st)?)?;
    let log_from = std::fs::metadata(h.log_path())?.len() as usize;
    h.start_daemon()?;
    wait_for(
        &format!("{}'s fast path reloaded", h.name()),
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            let log = std::fs::read(h.log_path())?;
            let log = String::from_utf8_lossy(log.get(log_from..).unwrap_or_default());
            let took = log
                .lines()
                .find(|l| l.contains("took over the previous programs"));
            Ok(
                (log.contains("programs differ") && log.contains("adopted=false"))
                    .then_some(took)
                    .flatten()
                    .map(str::to_string),
            )
        },
    )
}

#[test]
fn fast_path_keeps_flows_through_changes_and_restarts() -> Result<()> {
    let Some(c) = swarm_cluster(3, 1, "ingress-fp")? else {
        return Ok(());
    };
    let (h1, h2, h3) = (c.host(1), c.host(2), c.host(3));
    let via = h3.addr().to_string();
    create(h1, "web", "8080:8080", TCP_SERVER, Some(8080))?;
    create(h1, "echo", "9090:9090", ECHO_SERVER, None)?;
    create(h1, "dns", "5353:5353/udp", UDP_SERVER, None)?;
    create(h1, "bulk", "7070:7070", BULK_SERVER, None)?;
    wait_for(
        "web, echo and dns answer through h3",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || {
            let ok = running(&c, "web")?.len() == 2
                && running(&c, "echo")?.len() == 2
                && running(&c, "dns")?.len() == 2
                && running(&c, "bulk")?.len() == 2
                && c.client_exec(&["python3", "-c", LOAD, &via, "0.3"])
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("echo 3 0"));
            Ok(ok.then_some(()))
        },
    )?;

    // Bulk both ways through h3. Segments merged into one GSO packet take the kernel's VXLAN
    // device: the client's through h3's sandbox veth (np_sbox_veth_in) to the overlay's
    // bridge, the task's back through the sandbox's leg (np_sbox_in, np_host_veth_in). The
    // bytes arrive whole, and no namespace of h3 tracks the connections.
    for _ in 0..3 {
        let out = c.client_exec_timeout(
            &["python3", "-c", BULK_CLIENT, &via],
            Duration::from_secs(30),
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            text.trim() == format!("ok {}", 2 + (1 << 24)),
            "16 MiB up and down through h3: {text:?} ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let tracked = tracked_anywhere(h3, &c.client_addr().to_string(), 7070)?;
    ensure!(
        tracked.is_empty(),
        "h3 tracks bulk connections that took the fast path: {tracked:?}"
    );

    // Under load through h3: h3's daemon SIGKILLed and restarted, then web scaled 2 -> 4.
    let (out, marks) = std::thread::scope(|s| -> Result<(std::process::Output, String)> {
        let t0 = Instant::now();
        let load = s.spawn(|| {
            c.client_exec_timeout(
                &["python3", "-c", LOAD, &via, "12"],
                Duration::from_secs(60),
            )
        });
        // SIGKILLs h's daemon, starts it again after `down`, then waits `after`; says when.
        let bounce = |h: &Host, down: Duration, after: Duration| -> Result<String> {
            let killed = t0.elapsed().as_secs_f64();
            h.kill_daemon()?;
            std::thread::sleep(down);
            let restarting = t0.elapsed().as_secs_f64();
            h.start_daemon()?;
            let restarted = t0.elapsed().as_secs_f64();
            std::thread::sleep(after);
            Ok(format!(
                "{} killed at {killed:.3} s, restarted from {restarting:.3} to {restarted:.3} s",
                h.name()
            ))
        };
        std::thread::sleep(Duration::from_secs(2));
        let b3 = bounce(h3, Duration::from_secs(1), Duration::from_secs(1))?;
        // h2 runs a task: its fast path hands it the VXLAN from h3 past the overlay
        // (`np_local`), which a restarted daemon keeps.
        let b2 = bounce(h2, Duration::from_millis(500), Duration::from_secs(2))?;
        let scaling = t0.elapsed().as_secs_f64();
        h1.mesh_ok(&["service", "scale", "web=4"])?;
        let marks = format!("{b3}, {b2}, web scaled at {scaling:.3} s");
        Ok((load.join().expect("load thread")?, marks))
    })?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let nums = |what: &str| -> Result<(u64, u64)> {
        let l = text
            .lines()
            .find(|l| l.starts_with(what))
            .with_context(|| format!("no {what} line in {text:?} ({:?})", out.stderr))?;
        let v: Vec<u64> = l
            .split_whitespace()
            .skip(1)
            .filter_map(|n| n.parse().ok())
            .collect();
        Ok((v[0], v[1]))
    };
    let ((c_ok, c_fail), (e_ok, e_fail)) = (nums("conns")?, nums("echo")?);
    eprintln!("through h3 under changes: {c_ok} connections ({c_fail} failed), echo {e_ok} ({e_fail} failed)");
    ensure!(
        c_fail == 0 && c_ok > 50,
        "new connections through h3: {c_ok} answered, {c_fail} failed ({marks}):\n{}",
        text.lines()
            .filter(|l| l.starts_with("failed"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    ensure!(
        e_fail == 0 && e_ok > 60,
        "the open connection through h3: {e_ok} echoes, {e_fail} failed"
    );
    let log = std::fs::read_to_string(h3.log_path())?;
    ensure!(
        log.contains("routing mesh fast path attached") && log.contains("adopted=true"),
        "h3's restarted daemon did not adopt the fast path"
    );
    let log = std::fs::read_to_string(h2.log_path())?;
    ensure!(
        log.contains("routing mesh fast path attached") && log.contains("adopted=true"),
        "h2's restarted daemon did not adopt the fast path"
    );
    ensure!(running(&c, "web")?.len() == 4, "web did not scale to 4");

    // A UDP client keeps its socket; its task is killed: the next datagrams reach another
    // task at once.
    let first = c.client_exec(&["python3", "-c", UDP_CLIENT, &via, "5353", "0"])?;
    let host = String::from_utf8_lossy(&first.stdout)
        .split_whitespace()
        .nth(1)
        .context("no UDP answer")?
        .to_string();
    let tasks = running(&c, "dns")?;
    let (id, node) = tasks
        .iter()
        .find(|(id, _)| id.starts_with(&host))
        .with_context(|| format!("no dns task {host} in {tasks:?}"))?;
    let victim = c
        .hosts()
        .iter()
        .find(|h| h.name() == node)
        .context("node")?;
    let (out, killed_at) = std::thread::scope(|s| -> Result<(std::process::Output, f64)> {
        let start = Instant::now();
        let client = s.spawn(|| {
            c.client_exec_timeout(
                &["python3", "-c", UDP_CLIENT, &via, "5353", "6"],
                Duration::from_secs(30),
            )
        });
        std::thread::sleep(Duration::from_secs(2));
        let killed_at = start.elapsed().as_secs_f64();
        ensure!(kill_task(victim, id) > 0, "no process of task {id} to kill");
        let out = client.join().expect("client thread")?;
        Ok((out, killed_at))
    })?;
    let answers: Vec<(f64, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (t, h) = l.split_once(' ')?;
            Some((t.parse().ok()?, h.to_string()))
        })
        .collect();
    let others: BTreeSet<&str> = answers
        .iter()
        .filter(|(_, h)| *h != host)
        .map(|(_, h)| h.as_str())
        .collect();
    let moved_at = answers
        .iter()
        .find(|(_, h)| *h != host)
        .map(|(t, _)| *t)
        .with_context(|| format!("the UDP flow never left {host}: {answers:?}"))?;
    eprintln!(
        "UDP: task {host} killed at about {killed_at:.2} s, answered by {others:?} from {moved_at:.2} s"
    );
    ensure!(
        answers.iter().all(|(t, h)| *h != host || *t < moved_at),
        "{host} answered again after the flow moved: {answers:?}"
    );
    ensure!(
        moved_at - killed_at < 3.0,
        "the UDP flow moved {:.2} s after its task was killed",
        moved_at - killed_at
    );

    // h3 restarted over the state file of a daemon built with other programs (an upgrade):
    // it loads its own, carries the old maps' ports, backends and flows over, and puts its
    // programs in place of the old ones on all four interfaces. Connections opened through
    // h3 while echo had 2 tasks, then echo scaled to 4 (so a re-balanced flow would move
    // with even odds): every one keeps its task across the upgrade.
    let before = fast_path_filters(h3)?;
    ensure!(
        before.len() == 4 && before.iter().all(|(_, id)| id.is_some()),
        "h3's fast path: {before:?}"
    );
    const HELD_SECS: f64 = 25.0;
    let (out, marks, upgraded_at) = std::thread::scope(|s| -> Result<_> {
        let t0 = Instant::now();
        let held = s.spawn(|| hold(&c, &via, 8, HELD_SECS));
        std::thread::sleep(Duration::from_secs(1));
        scale_echo(&c, &via, 4)?;
        let scaled = t0.elapsed().as_secs_f64();
        upgrade(h3)?;
        let upgraded = t0.elapsed().as_secs_f64();
        let marks = format!("echo at 4 tasks at {scaled:.3} s, h3 upgraded at {upgraded:.3} s");
        Ok((held.join().expect("held thread")?, marks, upgraded))
    })?;
    let (ok, failed, failures) = held_result(&out)?;
    eprintln!("held through h3's upgrade: {ok} answers, {failed} failed ({marks})");
    ensure!(
        upgraded_at + 3.0 < HELD_SECS,
        "h3 upgraded too late for the held connections to see it ({marks})"
    );
    ensure!(
        failed == 0 && ok >= 8 * 20,
        "connections held through h3's upgrade: {ok} answers, {failed} failed ({marks}):\n{failures}"
    );
    let after = fast_path_filters(h3)?;
    ensure!(
        after.len() == 4
            && after
                .iter()
                .zip(&before)
                .all(|((_, a), (_, b))| a.is_some() && a != b),
        "h3's filters after the reload: {after:?}, before: {before:?}"
    );
    wait_for(
        "web and echo answer through the reloaded h3",
        Duration::from_secs(20),
        Duration::from_millis(300),
        || {
            Ok(c.client_exec(&["python3", "-c", LOAD, &via, "0.3"])
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("echo 3 0"))
                .then_some(()))
        },
    )?;
    let out = c.client_exec_timeout(
        &["python3", "-c", BULK_CLIENT, &via],
        Duration::from_secs(30),
    )?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).trim() == format!("ok {}", 2 + (1 << 24)),
        "16 MiB up and down through the reloaded h3: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Through a node with tasks of its own (h1, two of echo's four): a connection whose hash
    // named a local task is handed into it by the fast path and recorded so, and stays there
    // when the backends change. Only hashed again, its next segments went to whatever task
    // the new slots named, on h2 half of the time, which reset it (2 of 16 connections, about
    // 6 of them local; 24 make a miss unlikely). Then h1 is upgraded under them: the new
    // programs find the local tasks' veths in the maps carried over (a flow handed to a local
    // task whose veth they did not know would go to the nftables path mid-stream, which
    // balances it anew: a reset).
    let via1 = h1.addr().to_string();
    const HELD1_SECS: f64 = 16.0;
    let (out, marks, took) = std::thread::scope(|s| -> Result<_> {
        let t0 = Instant::now();
        let held = s.spawn(|| hold(&c, &via1, 24, HELD1_SECS));
        std::thread::sleep(Duration::from_secs(1));
        scale_echo(&c, &via1, 6)?;
        let scaled = t0.elapsed().as_secs_f64();
        let took = upgrade(h1)?;
        let upgraded = t0.elapsed().as_secs_f64();
        ensure!(
            upgraded + 2.0 < HELD1_SECS,
            "echo scaled ({scaled:.3} s) and h1 upgraded ({upgraded:.3} s) too late for the \
             held connections to see it"
        );
        let marks = format!("echo at 6 tasks at {scaled:.3} s, h1 upgraded at {upgraded:.3} s");
        Ok((held.join().expect("held thread")?, marks, took))
    })?;
    let (ok, failed, failures) = held_result(&out)?;
    eprintln!("held through h1 while echo scaled and h1 upgraded: {ok} answers, {failed} failed ({marks})");
    ensure!(
        failed == 0 && ok >= 24 * 40,
        "connections held through h1 while echo scaled and h1 upgraded: {ok} answers, {failed} \
         failed ({marks}):\n{failures}"
    );
    let local_tasks: usize = took
        .split_once("local_tasks=")
        .and_then(|(_, n)| n.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    ensure!(
        local_tasks >= 2,
        "h1's upgraded fast path carried over {local_tasks} local tasks (echo has 2 or more on \
         h1): {took:?}"
    );

    // h2 leaves the swarm: its filters go, with the programs and maps.
    ensure!(
        fast_path_filters(h2)?.len() == 4,
        "h2's fast path: {:?}",
        fast_path_filters(h2)?
    );
    h2.mesh_ok(&["swarm", "leave"])?;
    wait_for(
        "h2's fast path gone",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || Ok(fast_path_filters(h2)?.is_empty().then_some(())),
    )?;
    ensure!(
        !h2.exec_root().join(STATE_FILE).exists(),
        "h2 kept its fast path state file"
    );

    // h3 leaves the swarm while its daemon is down (its membership removed from the data
    // directory, as `swarm leave` would): the daemon started out of a swarm removes the
    // filters the killed one left.
    h3.kill_daemon()?;
    std::fs::remove_file(h3.data_dir().join("node.json"))?;
    h3.start_daemon()?;
    wait_for(
        "h3's leftover fast path gone",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || Ok(fast_path_filters(h3)?.is_empty().then_some(())),
    )
    .with_context(|| format!("h3's filters: {:?}", fast_path_filters(h3)))?;
    ensure!(
        !h3.exec_root().join(STATE_FILE).exists(),
        "h3 kept its fast path state file"
    );
    // With the namespaces the swarm held (the sandbox's with its filters, the overlays') and
    // the routing mesh's rules in the host namespace.
    let held = h3.held_namespaces();
    ensure!(held.is_empty(), "h3 still holds namespaces: {held:?}");
    let table = h3.exec(&["nft", "list", "table", "ip", "mesh_ingress"])?;
    ensure!(
        !table.status.success(),
        "h3 kept the routing mesh's rules: {}",
        String::from_utf8_lossy(&table.stdout)
    );
    Ok(())
}

/// N connections to ADDR:8080, each reading the answering task's hostname; prints `OK FAILED
/// HOSTNAMES` and the first failures.
const CONNS: &str = "import socket,sys\naddr,n=sys.argv[1],int(sys.argv[2])\nok=0;bad=[];seen=set()\nfor _ in range(n):\n try:\n  c=socket.create_connection((addr,8080),timeout=2);d=c.recv(100);c.close()\n  if d:\n   ok+=1;seen.add(d.decode())\n  else:\n   bad.append('empty')\n except OSError as e:\n  bad.append(repr(e))\nprint(ok,len(bad),' '.join(sorted(seen)))\nfor b in bad[:5]:\n print(b)";
/// From 20 client ports, one datagram each to ADDR:5353; prints `ANSWERS HOSTNAMES`.
const UDP_PORTS: &str = "import socket,sys\nok=0;seen=set()\nfor p in range(40600,40620):\n s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('',p));s.settimeout(1)\n try:\n  s.sendto(b'x',(sys.argv[1],5353));seen.add(s.recv(100).decode());ok+=1\n except OSError:\n  pass\n s.close()\nprint(ok,' '.join(sorted(seen)))";

/// `CONNS` through `via`: (answers, failures, hostnames seen, output).
fn conns(c: &Cluster, via: &str, n: usize) -> Result<(usize, usize, BTreeSet<String>, String)> {
    let out = c.client_exec_timeout(
        &["python3", "-c", CONNS, via, &n.to_string()],
        Duration::from_secs(60),
    )?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut w = text.lines().next().unwrap_or_default().split_whitespace();
    let ok = w.next().and_then(|x| x.parse().ok()).unwrap_or(0);
    let failed = w.next().and_then(|x| x.parse().ok()).unwrap_or(n);
    Ok((ok, failed, w.map(str::to_string).collect(), text))
}

/// A VTEP behind a router: h1 and h3 no longer reach each other on the underlay's link (its
/// bridge drops what passes between their ports) and route to each other through h2. The
/// fast path on h3 sends a packet for a task on h1 to h1's VTEP by the route (the kernel's
/// FIB lookup, so to h2), TCP and UDP. It used to take the VTEP for a neighbour on the link:
/// h3 asked ARP for h1 itself, nobody answered, and every connection given to h1 hung.
#[test]
fn fast_path_reaches_a_vtep_behind_a_router() -> Result<()> {
    let Some(c) = swarm_cluster(3, 1, "ingress-routed")? else {
        return Ok(());
    };
    let (h1, h2, h3) = (c.host(1), c.host(2), c.host(3));
    let via = h3.addr().to_string();
    create(h1, "web", "8080:8080", TCP_SERVER, Some(8080))?;
    create(h1, "bulk", "7070:7070", BULK_SERVER, None)?;
    create(h1, "dns", "5353:5353/udp", UDP_SERVER, None)?;
    // web's task on h1, by its hostname (the first 12 characters of its ID).
    let on_h1 = wait_for(
        "web, bulk and dns running on h1 and h2 and answering through h3",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || {
            let web = running(&c, "web")?;
            if web.len() != 2 || running(&c, "bulk")?.len() != 2 || running(&c, "dns")?.len() != 2 {
                return Ok(None);
            }
            let Some((id, _)) = web.iter().find(|(_, node)| node == "h1") else {
                return Ok(None);
            };
            let (_, failed, seen, _) = conns(&c, &via, 20)?;
            let host: String = id.chars().take(12).collect();
            Ok((failed == 0 && seen.contains(&host)).then_some(host))
        },
    )?;

    let run = |h: &Host, argv: &[&str]| -> Result<()> {
        let out = h.exec(argv)?;
        ensure!(
            out.status.success(),
            "{} on {}: {}",
            argv.join(" "),
            h.name(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    };
    for rule in [
        "add table bridge routed",
        "add chain bridge routed between { type filter hook forward priority 0; }",
        "add rule bridge routed between iifname v1 oifname v3 drop",
        "add rule bridge routed between iifname v3 oifname v1 drop",
    ] {
        let out = c.client_exec(&["nft", rule])?;
        ensure!(
            out.status.success(),
            "nft {rule} in the underlay: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    run(
        h2,
        &[
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.eth0.send_redirects=0",
        ],
    )?;
    for (h, peer) in [(h1, h3), (h3, h1)] {
        let peer = peer.addr().to_string();
        run(
            h,
            &[
                "ip",
                "route",
                "add",
                &format!("{peer}/32"),
                "via",
                &h2.addr().to_string(),
            ],
        )?;
        run(h, &["ip", "neigh", "flush", "to", &peer, "dev", "eth0"])?;
    }
    // Through h2 it answers; on the link (`ping -r`: no route, ARP on eth0) it does not.
    run(h3, &["ping", "-c", "1", "-W", "2", &h1.addr().to_string()])?;
    let direct = h3.exec(&[
        "ping",
        "-r",
        "-I",
        "eth0",
        "-c",
        "1",
        "-W",
        "1",
        &h1.addr().to_string(),
    ])?;
    ensure!(!direct.status.success(), "h3 still reaches h1 on the link");

    let (ok, failed, seen, text) = conns(&c, &via, 60)?;
    ensure!(
        failed == 0 && ok == 60 && seen.contains(&on_h1),
        "60 connections through h3, with h1 behind h2: {text}"
    );
    for _ in 0..3 {
        let out = c.client_exec_timeout(
            &["python3", "-c", BULK_CLIENT, &via],
            Duration::from_secs(30),
        )?;
        ensure!(
            String::from_utf8_lossy(&out.stdout).trim() == format!("ok {}", 2 + (1 << 24)),
            "16 MiB up and down through h3, with h1 behind h2: {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let out =
        c.client_exec_timeout(&["python3", "-c", UDP_PORTS, &via], Duration::from_secs(60))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut w = text.split_whitespace();
    ensure!(
        w.next() == Some("20") && w.count() == 2,
        "20 datagrams through h3 from 20 ports, to dns's 2 tasks: {text:?}"
    );
    // They took the fast path: none went through a namespace of h3 that tracks connections.
    let tracked = tracked_anywhere(h3, &c.client_addr().to_string(), 8080)?;
    ensure!(
        tracked.is_empty(),
        "h3 tracks connections the fast path should have taken: {tracked:?}"
    );
    Ok(())
}

/// `HELD`: `n` connections to `via`:9090 held for `secs` seconds.
fn hold(c: &Cluster, via: &str, n: usize, secs: f64) -> Result<std::process::Output> {
    c.client_exec_timeout(
        &[
            "python3",
            "-c",
            HELD,
            via,
            &n.to_string(),
            &secs.to_string(),
        ],
        Duration::from_secs(60),
    )
}

/// Scales echo to `replicas` and waits until new connections through `via` reach them all
/// (so a flow balanced anew would move with the odds of the new slots).
fn scale_echo(c: &Cluster, via: &str, replicas: usize) -> Result<()> {
    c.host(1)
        .mesh_ok(&["service", "scale", &format!("echo={replicas}")])?;
    wait_for(
        &format!("new connections through {via} reach {replicas} echo tasks"),
        Duration::from_secs(15),
        Duration::from_millis(300),
        || {
            let tries = (replicas * 6).to_string();
            let o = c.client_exec(&["python3", "-c", WHO, via, &tries])?;
            let n = String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .count();
            Ok((n == replicas).then_some(()))
        },
    )
}

/// What `HELD` printed: answers, failed connections, and the failures' lines.
fn held_result(out: &std::process::Output) -> Result<(u64, u64, String)> {
    let text = String::from_utf8_lossy(&out.stdout);
    let (ok, failed) = text
        .lines()
        .find_map(|l| {
            let mut w = l.strip_prefix("held ")?.split_whitespace();
            Some((
                w.next()?.parse::<u64>().ok()?,
                w.next()?.parse::<u64>().ok()?,
            ))
        })
        .with_context(|| format!("no held line in {text:?} ({:?})", out.stderr))?;
    let failures = text
        .lines()
        .filter(|l| l.starts_with("failed"))
        .collect::<Vec<_>>()
        .join("\n");
    Ok((ok, failed, failures))
}

/// The fast path's state file in a daemon's exec root.
const STATE_FILE: &str = "ingress-fastpath.json";

/// The fast path's filters on `h` as `(interface, program ID)`, for each of the four
/// interfaces that has one: the underlay and the host end of the sandbox's veth in the host
/// namespace, the sandbox's end and its overlay leg in the sandbox (if it is still held).
fn fast_path_filters(h: &Host) -> Result<Vec<(String, Option<u32>)>> {
    let mut out = Vec::new();
    let mut show = |label: &str, argv: &[&str]| -> Result<()> {
        let o = h.exec(argv)?;
        let text = String::from_utf8_lossy(&o.stdout);
        if let Some(l) = text.lines().find(|l| l.contains(" np_")) {
            let id = l
                .split_whitespace()
                .skip_while(|w| *w != "id")
                .nth(1)
                .and_then(|n| n.parse().ok());
            out.push((label.to_string(), id));
        }
        Ok(())
    };
    for dev in ["eth0", "mesh_ingr0"] {
        show(dev, &["tc", "filter", "show", "dev", dev, "ingress"])?;
    }
    if let Some(pid) = h.held_namespaces().get("ingress_sbox") {
        let ns = format!("--net=/proc/{pid}/ns/net");
        for dev in ["mi0", "eth0"] {
            let label = format!("sandbox {dev}");
            show(
                &label,
                &[
                    "nsenter", &ns, "tc", "filter", "show", "dev", dev, "ingress",
                ],
            )?;
        }
    }
    Ok(out)
}

/// A TCP sink: reads each connection to its end and answers the number of bytes read.
const SINK_SERVER: &str = "import socket,threading\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',7171))\ns.listen(16)\ndef h(c):\n n=0\n while True:\n  x=c.recv(1<<20)\n  if not x:\n   break\n  n+=len(x)\n c.sendall(str(n).encode())\n c.close()\nwhile True:\n c,a=s.accept()\n threading.Thread(target=h,args=(c,),daemon=True).start()";
/// Uploads 32 MiB to ADDR:7171 and prints the sink's answer (the bytes it read).
const UPLOAD: &str = "import socket,sys\nc=socket.create_connection((sys.argv[1],7171),timeout=10)\nb=bytes(1<<20)\nfor _ in range(32):\n c.sendall(b)\nc.shutdown(socket.SHUT_WR)\nprint(c.recv(100).decode())";

/// A TCP source: sends 32 MiB on each connection, then closes it.
const SOURCE_SERVER: &str = "import socket,threading\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',7272))\ns.listen(16)\nb=bytes(1<<20)\ndef h(c):\n for _ in range(32):\n  c.sendall(b)\n c.close()\nwhile True:\n c,a=s.accept()\n threading.Thread(target=h,args=(c,),daemon=True).start()";
/// Downloads from ADDR:7272 to its end and prints the bytes read.
const DOWNLOAD: &str = "import socket,sys\nc=socket.create_connection((sys.argv[1],7272),timeout=10)\nn=0\nwhile True:\n x=c.recv(1<<20)\n if not x:\n  break\n n+=len(x)\nprint(n)";
/// The client's nftables table counting the bytes that come in from `ADDR:7272` by their
/// TTL: 63 (`hop`) or any other (`other`).
const TTL_TABLE: &str = "mesh_test_ttl";

/// A UDP server answering each datagram with the TTL it arrived with.
const TTL_SERVER: &str = "import socket,struct\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.setsockopt(socket.SOL_IP,12,1)\ns.bind(('0.0.0.0',5454))\nwhile True:\n d,anc,_,a=s.recvmsg(100,256)\n t=[struct.unpack('i',c[2][:4])[0] for c in anc if c[0]==socket.SOL_IP and c[1]==socket.IP_TTL]\n s.sendto(str(t[0] if t else -1).encode(),a)";
/// To ADDR:5454, one datagram with TTL 5, then one with TTL 1. Prints `answer TTL_AT_TASK
/// TTL_OF_REPLY` for the first, then `expired ICMP_TYPE FROM` for the error the second got
/// back (`expired none` if none came) and `late ANSWER` if it was answered after all.
const TTL_CLIENT: &str = "import socket,struct,sys,time\naddr=sys.argv[1]\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.setsockopt(socket.SOL_IP,11,1)\ns.setsockopt(socket.SOL_IP,12,1)\ns.settimeout(2)\ns.setsockopt(socket.SOL_IP,socket.IP_TTL,5)\ns.sendto(b't',(addr,5454))\nd,anc,_,_=s.recvmsg(100,256)\nt=[struct.unpack('i',c[2][:4])[0] for c in anc if c[0]==socket.SOL_IP and c[1]==socket.IP_TTL]\nprint('answer',d.decode(),t[0] if t else -1,flush=True)\ns.setsockopt(socket.SOL_IP,socket.IP_TTL,1)\ns.sendto(b't',(addr,5454))\ns.settimeout(0)\nerr='none';end=time.time()+2\nwhile time.time()<end and err=='none':\n try:\n  _,anc,_,_=s.recvmsg(100,512,0x2000)\n  for c in anc:\n   if c[1]==11:\n    e=c[2];err='%d %s'%(e[5],socket.inet_ntoa(e[20:24]))\n except BlockingIOError:\n  time.sleep(0.05)\nprint('expired',err,flush=True)\ns.settimeout(1);end=time.time()+1\nwhile time.time()<end:\n try:\n  print('late',s.recv(100).decode());break\n except socket.timeout:\n  break\n except OSError:\n  pass";

/// Bytes received on all interfaces but `lo` in the network namespace of task `id` on `h`.
fn task_rx_bytes(h: &Host, id: &str) -> Result<u64> {
    Ok(task_rx(h, id)?
        .iter()
        .filter(|(dev, _)| *dev != "lo")
        .map(|(_, b)| b)
        .sum())
}

/// Bytes received per interface in the network namespace of task `id` on `h`.
fn task_rx(h: &Host, id: &str) -> Result<std::collections::BTreeMap<String, u64>> {
    let pid = *h.task_pids(id).first().context("the task's process")?;
    let out = h.exec(&[
        "nsenter",
        "-t",
        &pid.to_string(),
        "-n",
        "cat",
        "/proc/net/dev",
    ])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rx = std::collections::BTreeMap::new();
    for l in text.lines().filter(|l| l.contains(':')) {
        let (dev, counters) = l.split_once(':').unwrap_or_default();
        let bytes = counters
            .split_whitespace()
            .next()
            .and_then(|b| b.parse::<u64>().ok())
            .unwrap_or(0);
        rx.insert(dev.trim().to_string(), bytes);
    }
    Ok(rx)
}

/// Uploads through h1 to a task on h2 that answer nothing but their ACKs: merged segments take
/// h1's sandbox and ingress bridge to the VXLAN device, and the bridge knows where the remote
/// task is although no frame of it ever crossed (the ACKs come back on the fast path). It used
/// to flood each upload to every local port, so another service's task on h1 received a copy
/// of every byte. A connection through h1 to its own task (quiet) takes the fast path too,
/// tracked by none of h1's namespaces. And h1 forwards as a router does: one TTL less each way (the merged replies
/// of a download too, which its sandbox takes off the VXLAN device), and a datagram
/// whose TTL expires at h1 is answered with ICMP time exceeded from h1 and goes no further
/// (the fast path used to pass it on with TTL 1).
#[test]
fn fast_path_floods_no_local_task_and_forwards_as_a_router() -> Result<()> {
    let Some(c) = swarm_cluster(2, 1, "ingress-flood")? else {
        return Ok(());
    };
    let h1 = c.host(1);
    let via = h1.addr().to_string();
    for (name, publish, server, node) in [
        ("sink", "7171:7171", SINK_SERVER, "h2"),
        ("ttl", "5454:5454/udp", TTL_SERVER, "h2"),
        ("source", "7272:7272", SOURCE_SERVER, "h2"),
        ("quiet", "8080:8080", TCP_SERVER, "h1"),
    ] {
        let constraint = format!("node.hostname=={node}");
        h1.mesh_ok(&[
            "service",
            "create",
            "--name",
            name,
            "--publish",
            publish,
            "--constraint",
            &constraint,
            "--",
            "python3",
            "-c",
            server,
        ])?;
    }
    let quiet = wait_for(
        "sink on h2 answers an upload through h1, quiet runs on h1",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || {
            let quiet = running(&c, "quiet")?;
            if running(&c, "sink")?.len() != 1 || quiet.len() != 1 {
                return Ok(None);
            }
            let out =
                c.client_exec_timeout(&["python3", "-c", UPLOAD, &via], Duration::from_secs(30))?;
            let ok = String::from_utf8_lossy(&out.stdout).trim() == (32u64 << 20).to_string();
            Ok(ok.then(|| quiet[0].0.clone()))
        },
    )?;
    let before = task_rx_bytes(h1, &quiet)?;
    let sink = running(&c, "sink")?[0].0.clone();
    let h2 = c.host(2);
    let sink_before = task_rx(h2, &sink)?;
    for _ in 0..3 {
        let out =
            c.client_exec_timeout(&["python3", "-c", UPLOAD, &via], Duration::from_secs(30))?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            text.trim() == (32u64 << 20).to_string(),
            "32 MiB uploaded through h1 to sink: {text:?} ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let got = task_rx_bytes(h1, &quiet)? - before;
    ensure!(
        got < 1 << 20,
        "quiet's task on h1 received {got} bytes while 96 MiB were uploaded through h1 to sink's \
         task on h2: h1's ingress bridge flooded them"
    );
    // On h2, the fast path takes the VXLAN from h1 past the VXLAN device and the overlay's
    // bridge: into the task through its gateway interface (eth1; eth0 is on the ingress
    // overlay), whole segments and merged ones alike.
    let sink_after = task_rx(h2, &sink)?;
    let delta = |dev: &str| {
        sink_after.get(dev).copied().unwrap_or(0) - sink_before.get(dev).copied().unwrap_or(0)
    };
    ensure!(
        delta("eth1") >= 96 << 20 && delta("eth0") < 1 << 20,
        "sink's task on h2 received {} bytes on its gateway interface and {} on the ingress \
         overlay during 96 MiB of uploads through h1: the fast path on h2 must hand them in \
         past the overlay",
        delta("eth1"),
        delta("eth0")
    );

    // TTL 5 from the client arrives as 4 (h1 is the one router on the way: the overlay is a
    // link), the reply's 64 as 63. The kernel's path would route twice (host, sandbox): 3.
    let text = wait_for(
        "ttl on h2 answers through h1's fast path",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || {
            if running(&c, "ttl")?.len() != 1 {
                return Ok(None);
            }
            let out = c.client_exec_timeout(
                &["python3", "-c", TTL_CLIENT, &via],
                Duration::from_secs(20),
            )?;
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            // 3: the kernel's path, until the fast path has the port.
            let answered = text.starts_with("answer ") && !text.starts_with("answer 3 ");
            Ok(answered.then_some(text))
        },
    )?;
    ensure!(
        text.lines().next() == Some("answer 4 63"),
        "TTL at the task and of the reply through h1: {text:?}"
    );
    ensure!(
        text.lines().nth(1) == Some(&format!("expired 11 {via}")),
        "a datagram with TTL 1 through h1 must get ICMP time exceeded (type 11) from h1: \
         {text:?}"
    );
    ensure!(
        !text.contains("late"),
        "a datagram with TTL 1 reached the task through h1: {text:?}"
    );

    // The same holds for merged replies (a download): h1 takes them off its VXLAN device in
    // its sandbox (the GSO path), and rewrites them there with one TTL less too.
    let rules = format!(
        "add table ip {TTL_TABLE}; add counter ip {TTL_TABLE} hop; \
         add counter ip {TTL_TABLE} other; \
         add chain ip {TTL_TABLE} input {{ type filter hook input priority 0; }}; \
         add rule ip {TTL_TABLE} input ip saddr {via} tcp sport 7272 ip ttl 63 counter name hop; \
         add rule ip {TTL_TABLE} input ip saddr {via} tcp sport 7272 ip ttl != 63 \
         counter name other"
    );
    let out = c.client_exec(&["nft", &rules])?;
    ensure!(
        out.status.success(),
        "nft in the client's namespace: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let download = || -> Result<(u64, u64)> {
        let count = |name: &str| -> Result<u64> {
            let out = c.client_exec(&["nft", "list", "counter", "ip", TTL_TABLE, name])?;
            let text = String::from_utf8_lossy(&out.stdout);
            text.split_whitespace()
                .skip_while(|w| *w != "bytes")
                .nth(1)
                .and_then(|b| b.parse().ok())
                .with_context(|| format!("counter {name}: {text:?}"))
        };
        let before = (count("hop")?, count("other")?);
        let out =
            c.client_exec_timeout(&["python3", "-c", DOWNLOAD, &via], Duration::from_secs(30))?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            text.trim() == (32u64 << 20).to_string(),
            "32 MiB downloaded through h1 from source: {text:?} ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok((count("hop")? - before.0, count("other")? - before.1))
    };
    // Until the fast path has the port, the kernel's path routes the replies twice (TTL 62).
    wait_for(
        "source on h2 answers a download through h1's fast path",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || Ok((running(&c, "source")?.len() == 1 && download()?.0 > 0).then_some(())),
    )?;
    let (hop, other) = download()?;
    ensure!(
        hop >= 32 << 20 && other == 0,
        "a 32 MiB download through h1 came in with {hop} bytes at TTL 63 and {other} at \
         another TTL: h1 must take one off every reply, merged or not"
    );

    // A task on the node that took the connection (quiet on h1) gets it from the fast path
    // too, through its gateway veth, and answers through the sandbox's leg: neither h1's
    // namespace nor its sandbox tracks it (the nftables path's two DNATs would).
    let (ok, failed, seen, text) = conns(&c, &via, 20)?;
    ensure!(
        ok == 20 && failed == 0 && seen.len() == 1,
        "20 connections through h1 to quiet, its task on h1: {text:?}"
    );
    let tracked = tracked_anywhere(h1, &c.client_addr().to_string(), 8080)?;
    ensure!(
        tracked.is_empty(),
        "h1 tracks connections to its own task that took the fast path: {tracked:?}"
    );
    Ok(())
}
