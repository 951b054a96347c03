//! `raft`: the manager's Raft on a 3-manager cluster (one `meshd` per simulated host).
//!
//! 1. **Leader failover**: SIGKILL the leader's `meshd` `--kills` times (default 7) and time,
//!    from the kill, (a) until a survivor's own Raft state is `Leader` (its `info`, polled
//!    every 10 ms over the API socket) and (b) until a management call (`node_ls`) through a
//!    survivor succeeds. The killed daemon is restarted and the cluster must be healthy again
//!    (3 managers Leader/Reachable, all Ready, one agreed leader) before the next kill.
//! 2. **Committed writes**: `--concurrency` connections (default 8) each send sequential
//!    `node_update` label writes until `--writes` (default 2000) have succeeded, once to the
//!    leader's daemon and once to a follower's (which forwards to the leader). Each write is a
//!    linearizable read plus one Raft entry committed on a majority and fsynced (redb).
//!
//! The API socket is used directly (no CLI processes) so that the numbers are the daemon's.
//! Every wait is bounded.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mesh_netns::swarm::{form_swarm, leader_name, node_ls};
use mesh_netns::{binaries, require_root, wait_for, Cluster, ClusterOpts, Host};
use serde_json::{json, Value};

use crate::api::Client;
use crate::report;
use crate::stats::{median, millis, min_max, percentile, secs};

/// One line for `mesh-bench --help`.
pub const ABOUT: &str = "leader failover time and committed writes/s on 3 managers";

const USAGE: &str =
    "usage: mesh-bench raft [--kills N] [--writes N] [--concurrency C] [--no-write-docs]

  --kills N          leader kills to time (default 7)
  --writes N         committed writes per write run (default 2000)
  --concurrency C    concurrent API connections per write run (default 8)
  --no-write-docs    only print the report; leave docs/benchmarks.md alone";

/// The reproducing command, as documented.
const COMMAND: &str = "cargo xtask bench raft";
/// Number of managers (and hosts).
const MANAGERS: usize = 3;
/// How often survivors are polled during a failover.
const POLL_EVERY: Duration = Duration::from_millis(10);
/// Bound of one failover (kill until a management call succeeds).
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound of the recovery after restarting the killed daemon.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound of one write run.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound of single API calls outside the timed loops.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// The node whose labels the write runs change.
const WRITE_NODE: &str = "h1";

/// Command-line options.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Opts {
    kills: usize,
    writes: usize,
    concurrency: usize,
    write_docs: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            kills: 7,
            writes: 2000,
            concurrency: 8,
            write_docs: true,
        }
    }
}

impl Opts {
    /// Parses the arguments after `raft`; `None` means `--help`.
    fn parse(args: &[String]) -> Result<Option<Opts>> {
        let mut o = Opts::default();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
                _ => (arg.as_str(), None),
            };
            let mut value = |name: &str| -> Result<usize> {
                let v = match &inline {
                    Some(v) => v.clone(),
                    None => it
                        .next()
                        .with_context(|| format!("{name} needs a value\n{USAGE}"))?
                        .clone(),
                };
                let n: usize = v
                    .parse()
                    .with_context(|| format!("{name}: not a number: {v:?}\n{USAGE}"))?;
                ensure!(n > 0, "{name} must be at least 1\n{USAGE}");
                Ok(n)
            };
            match flag {
                "--kills" => o.kills = value(flag)?,
                "--writes" => o.writes = value(flag)?,
                "--concurrency" => o.concurrency = value(flag)?,
                "--no-write-docs" if inline.is_none() => o.write_docs = false,
                "-h" | "--help" => return Ok(None),
                _ => bail!("unknown argument {arg:?}\n{USAGE}"),
            }
        }
        Ok(Some(o))
    }

    /// The command that reproduces this run: [`COMMAND`] plus the non-default options.
    fn command(&self) -> String {
        let d = Opts::default();
        let mut c = COMMAND.to_string();
        for (flag, v, dv) in [
            ("--kills", self.kills, d.kills),
            ("--writes", self.writes, d.writes),
            ("--concurrency", self.concurrency, d.concurrency),
        ] {
            if v != dv {
                c.push_str(&format!(" {flag} {v}"));
            }
        }
        c
    }
}

/// Runs the benchmark with the arguments after `raft`.
pub fn run(args: &[String]) -> Result<()> {
    let Some(opts) = Opts::parse(args)? else {
        println!("{USAGE}");
        return Ok(());
    };
    if !require_root()? {
        bail!("the raft benchmark needs root (it creates network namespaces)");
    }
    let bins = binaries()?;
    eprintln!(
        "raft: meshd {}, mesh {}",
        bins.meshd.display(),
        bins.mesh.display()
    );
    let date = report::utc_now();
    let results = {
        let c = Cluster::new(ClusterOpts {
            hosts: MANAGERS,
            start_daemons: true,
            name_hint: "bench-raft",
        })?;
        eprintln!(
            "raft: cluster {} (logs in {})",
            c.prefix(),
            c.base_dir().display()
        );
        measure(&c, &opts)?
        // The cluster is dropped (daemons killed, namespaces removed) here.
    };
    let text = render(&opts, &date, &report::machine(), &results);
    println!("{text}");
    if opts.write_docs {
        report::write_section("raft", &text)?;
        eprintln!("raft: wrote the raft section of {}", report::DOCS_PATH);
    }
    Ok(())
}

/// Everything one benchmark run measured.
struct Results {
    failovers: Vec<Failover>,
    writes: Vec<WriteRun>,
}

fn measure(c: &Cluster, opts: &Opts) -> Result<Results> {
    form_swarm(c, MANAGERS)?;
    wait_healthy(c)?;
    let mut failovers = Vec::new();
    for round in 1..=opts.kills {
        let f = failover(c).with_context(|| format!("failover round {round}"))?;
        eprintln!(
            "raft: kill {round}/{}: killed leader {} (term {}); {} leads (term {}) after {}, \
             node_ls ok via {} after {}{}",
            opts.kills,
            f.killed,
            f.term_before,
            f.new_leader,
            f.term_after,
            secs(f.elected),
            f.served_by,
            secs(f.served),
            if f.failed_calls.is_empty() {
                String::new()
            } else {
                format!("; failed node_ls calls: {}", f.failed_calls.join("; "))
            }
        );
        failovers.push(f);
        wait_healthy(c).with_context(|| format!("recovery after failover round {round}"))?;
    }
    let mut writes = Vec::new();
    for target in [Target::Leader, Target::Follower] {
        let w = write_run(c, target, opts)
            .with_context(|| format!("write run via the {}", target.word()))?;
        eprintln!(
            "raft: writes via {} {}: {:.0}/s, p50 {}, p99 {}, {} failed",
            target.word(),
            w.host,
            w.per_sec(),
            millis(percentile(&w.latencies, 50.0)),
            millis(percentile(&w.latencies, 99.0)),
            w.failures.len()
        );
        writes.push(w);
        wait_healthy(c)?;
    }
    Ok(Results { failovers, writes })
}

// ---------------------------------------------------------------------------------------
// Cluster state through the API socket and the CLI.

/// A manager's Raft status from its `info`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RaftStatus {
    raft_id: u64,
    term: u64,
    state: String,
    leader: Option<u64>,
    last_applied: Option<u64>,
}

impl RaftStatus {
    fn leads(&self) -> bool {
        self.state == "Leader" && self.leader == Some(self.raft_id)
    }
}

fn raft_status(cl: &mut Client) -> Result<RaftStatus> {
    let info = cl.call_ok(&json!({"method": "info"}))?;
    let r = &info["raft"];
    ensure!(r.is_object(), "info has no raft status: {info}");
    Ok(RaftStatus {
        raft_id: r["raft_id"].as_u64().context("raft.raft_id")?,
        term: r["term"].as_u64().unwrap_or(0),
        state: r["state"].as_str().unwrap_or_default().to_string(),
        leader: r["leader_raft_id"].as_u64(),
        last_applied: r["last_applied"].as_u64(),
    })
}

fn raft_status_of(h: &Host) -> Result<RaftStatus> {
    let mut cl = Client::connect(&h.socket(), CALL_TIMEOUT)?;
    raft_status(&mut cl).with_context(|| format!("{}: info", h.name()))
}

fn host_named<'a>(c: &'a Cluster, name: &str) -> Result<&'a Host> {
    c.hosts()
        .iter()
        .find(|h| h.name() == name)
        .with_context(|| format!("no host named {name:?}"))
}

/// Waits until `mesh node ls` shows all managers Ready with one Leader and the rest
/// Reachable, and every daemon's Raft agrees on that leader and has applied its log.
fn wait_healthy(c: &Cluster) -> Result<()> {
    wait_for(
        "3 managers Ready, one Leader and two Reachable, agreeing on the leader",
        HEALTHY_TIMEOUT,
        Duration::from_millis(200),
        || {
            let rows = node_ls(c.host(1))?;
            let ready = rows.iter().filter(|r| r.status == "Ready").count();
            let leaders = rows.iter().filter(|r| r.manager_status == "Leader").count();
            let reachable = rows
                .iter()
                .filter(|r| r.manager_status == "Reachable")
                .count();
            if rows.len() != MANAGERS
                || ready != MANAGERS
                || leaders != 1
                || reachable != MANAGERS - 1
            {
                return Ok(None);
            }
            let st: Vec<RaftStatus> = c
                .hosts()
                .iter()
                .map(raft_status_of)
                .collect::<Result<_>>()?;
            let Some(leader) = st.iter().find(|s| s.leads()) else {
                return Ok(None);
            };
            let agreed = st.iter().all(|s| {
                s.leader == Some(leader.raft_id)
                    && s.term == leader.term
                    && s.last_applied >= leader.last_applied
            });
            Ok(agreed.then_some(()))
        },
    )
}

// ---------------------------------------------------------------------------------------
// Failover.

/// One timed leader kill.
struct Failover {
    killed: String,
    term_before: u64,
    new_leader: String,
    term_after: u64,
    /// From the kill until a survivor's `info` says it leads.
    elected: Duration,
    /// From the kill until a `node_ls` through a survivor succeeded.
    served: Duration,
    served_by: String,
    /// `node_ls` calls that failed in between (both survivors): who, when, what.
    failed_calls: Vec<String>,
}

fn failover(c: &Cluster) -> Result<Failover> {
    let old = leader_name(c.host(1))?.context("node ls shows no Leader")?;
    let victim = host_named(c, &old)?;
    let before = raft_status_of(victim)?;
    ensure!(
        before.leads(),
        "node ls says {old} leads, but its Raft state is {before:?}"
    );
    let survivors: Vec<&Host> = c.hosts().iter().filter(|h| h.name() != old).collect();
    // Connections are opened, and the management path warmed, before the kill.
    let mut pollers = Vec::new();
    let mut callers = Vec::new();
    for h in &survivors {
        pollers.push((h.name(), Client::connect(&h.socket(), CALL_TIMEOUT)?));
        let mut cl = Client::connect(&h.socket(), CALL_TIMEOUT)?;
        cl.call_ok(&json!({"method": "node_ls"}))
            .with_context(|| format!("{}: node_ls before the kill", h.name()))?;
        callers.push((h.name(), cl));
    }

    let t0 = Instant::now();
    victim.kill_daemon()?;
    let deadline = t0 + FAILOVER_TIMEOUT;
    let served: OnceLock<(Duration, String)> = OnceLock::new();
    let failed: Mutex<Vec<String>> = Mutex::new(Vec::new());

    let (elected, caller_results) = thread::scope(|s| {
        let poll = s.spawn(|| poll_new_leader(pollers, before.raft_id, t0, deadline));
        let calls: Vec<_> = callers
            .into_iter()
            .map(|(name, cl)| {
                let (served, failed) = (&served, &failed);
                s.spawn(move || -> Result<()> {
                    call_until_served(name, cl, t0, deadline, served, failed)
                })
            })
            .collect();
        let elected = poll.join().expect("poller panicked");
        let results: Vec<Result<()>> = calls
            .into_iter()
            .map(|h| h.join().expect("caller panicked"))
            .collect();
        (elected, results)
    });
    // Restart the killed daemon whatever happened, so the next round has 3 managers again.
    let restarted = victim.start_daemon();
    let (elected, new_leader, term_after) = elected?;
    for r in caller_results {
        r?;
    }
    restarted?;
    let failed_calls = failed.into_inner().unwrap_or_else(|p| p.into_inner());
    let Some((served, served_by)) = served.into_inner() else {
        bail!(
            "no node_ls through a survivor succeeded within {FAILOVER_TIMEOUT:?} after the kill; \
             last error: {}",
            failed_calls.last().map(String::as_str).unwrap_or("none")
        );
    };
    Ok(Failover {
        killed: old,
        term_before: before.term,
        new_leader,
        term_after,
        elected,
        served,
        served_by,
        failed_calls,
    })
}

/// Polls the survivors' `info` every [`POLL_EVERY`] until one of them leads (and is not
/// `killed`); returns the time since `t0`, its name and its term.
fn poll_new_leader(
    mut pollers: Vec<(&str, Client)>,
    killed: u64,
    t0: Instant,
    deadline: Instant,
) -> Result<(Duration, String, u64)> {
    let mut next = Instant::now();
    loop {
        for (name, cl) in &mut pollers {
            let st = raft_status(cl).with_context(|| format!("{name}: info"))?;
            if st.state == "Leader" && st.leader.is_some_and(|l| l != killed) {
                return Ok((t0.elapsed(), name.to_string(), st.term));
            }
        }
        let now = Instant::now();
        if now >= deadline {
            bail!("no survivor became leader within {FAILOVER_TIMEOUT:?} after the kill");
        }
        next += POLL_EVERY;
        if next > now {
            thread::sleep(next - now);
        } else {
            next = now;
        }
    }
}

/// Sends `node_ls` to one survivor until a call succeeds (on either survivor: `served` is
/// shared) or the deadline passes.
fn call_until_served(
    name: &str,
    mut cl: Client,
    t0: Instant,
    deadline: Instant,
    served: &OnceLock<(Duration, String)>,
    failed: &Mutex<Vec<String>>,
) -> Result<()> {
    while served.get().is_none() {
        let now = Instant::now();
        if now >= deadline {
            return Ok(());
        }
        cl.set_timeout(deadline - now)?;
        match cl
            .call(&json!({"method": "node_ls"}))
            .with_context(|| format!("{name}: node_ls after the kill"))?
        {
            Ok(_) => {
                let _ = served.set((t0.elapsed(), name.to_string()));
            }
            Err(e) => {
                let msg = format!("{name} at {}: {e}", secs(t0.elapsed()));
                failed.lock().unwrap_or_else(|p| p.into_inner()).push(msg);
                thread::sleep(POLL_EVERY);
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Committed writes.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Leader,
    Follower,
}

impl Target {
    fn word(self) -> &'static str {
        match self {
            Target::Leader => "leader",
            Target::Follower => "follower",
        }
    }
}

/// One write run.
struct WriteRun {
    target: Target,
    host: String,
    wall: Duration,
    latencies: Vec<Duration>,
    /// Failed writes (retried), with when they happened.
    failures: Vec<String>,
    /// Set when the leader or its term changed during the run.
    leader_change: Option<String>,
}

impl WriteRun {
    fn per_sec(&self) -> f64 {
        self.latencies.len() as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

/// What one connection did.
struct Worker {
    latencies: Vec<Duration>,
    failures: Vec<String>,
    /// The value of the last successful write (the label `bench-<conn>`).
    last_value: Option<usize>,
    finished: Duration,
}

fn update_request(conn: usize, value: usize) -> Value {
    let mut labels = serde_json::Map::new();
    labels.insert(format!("bench-{conn}"), json!(value.to_string()));
    json!({
        "method": "node_update",
        "params": {
            "node": WRITE_NODE,
            "availability": null,
            "label_add": labels,
            "label_rm": [],
        }
    })
}

fn write_run(c: &Cluster, target: Target, opts: &Opts) -> Result<WriteRun> {
    let st: Vec<(&Host, RaftStatus)> = c
        .hosts()
        .iter()
        .map(|h| Ok((h, raft_status_of(h)?)))
        .collect::<Result<_>>()?;
    let (leader, before) = st
        .iter()
        .find(|(_, s)| s.leads())
        .cloned()
        .context("no daemon reports that it leads")?;
    let host = match target {
        Target::Leader => leader,
        Target::Follower => st
            .iter()
            .map(|(h, _)| *h)
            .find(|h| h.name() != leader.name())
            .context("no follower")?,
    };

    // Connect, and warm each connection (and the follower's forwarding path) with one write.
    let mut clients = Vec::new();
    for conn in 0..opts.concurrency {
        let mut cl = Client::connect(&host.socket(), CALL_TIMEOUT)?;
        cl.call_ok(&update_request(conn, 0))
            .with_context(|| format!("{}: warm-up write", host.name()))?;
        clients.push(cl);
    }

    let next = AtomicUsize::new(0);
    let failed = AtomicUsize::new(0);
    let start = Instant::now();
    let deadline = start + RUN_TIMEOUT;
    let workers: Vec<Result<Worker>> = thread::scope(|s| {
        let handles: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(conn, cl)| {
                let (next, failed) = (&next, &failed);
                s.spawn(move || writer(conn, cl, opts.writes, next, failed, start, deadline))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("writer panicked"))
            .collect()
    });
    let workers: Vec<Worker> = workers
        .into_iter()
        .collect::<Result<_>>()
        .with_context(|| format!("writing through {}", host.name()))?;

    let wall = workers.iter().map(|w| w.finished).max().unwrap_or_default();
    let latencies: Vec<Duration> = workers.iter().flat_map(|w| w.latencies.clone()).collect();
    let failures: Vec<String> = workers.iter().flat_map(|w| w.failures.clone()).collect();
    ensure!(
        latencies.len() == opts.writes,
        "{} writes succeeded, expected {}",
        latencies.len(),
        opts.writes
    );

    // The leader and term should not have changed; every connection's last write is visible.
    let after = raft_status_of(leader)?;
    let leader_change = (!after.leads() || after.term != before.term).then(|| {
        format!(
            "{} led in term {} before the run; after it: {after:?}",
            leader.name(),
            before.term
        )
    });
    let node = Client::connect(&host.socket(), CALL_TIMEOUT)?
        .call_ok(&json!({"method": "node_inspect", "params": {"node": WRITE_NODE}}))?;
    let labels: BTreeMap<String, String> = serde_json::from_value(node["labels"].clone())
        .with_context(|| format!("labels of {WRITE_NODE}: {node}"))?;
    for (conn, w) in workers.iter().enumerate() {
        let key = format!("bench-{conn}");
        let want = w.last_value.unwrap_or(0).to_string();
        ensure!(
            labels.get(&key) == Some(&want),
            "after the run, label {key} of {WRITE_NODE} is {:?}, but connection {conn} last \
             wrote {want:?}",
            labels.get(&key)
        );
    }
    Ok(WriteRun {
        target,
        host: host.name().to_string(),
        wall,
        latencies,
        failures,
        leader_change,
    })
}

/// One connection's loop: claims write numbers until `total` are claimed; retries a failed
/// write (at most `total` failures overall) until it succeeds.
fn writer(
    conn: usize,
    mut cl: Client,
    total: usize,
    next: &AtomicUsize,
    failed: &AtomicUsize,
    start: Instant,
    deadline: Instant,
) -> Result<Worker> {
    let mut w = Worker {
        latencies: Vec::new(),
        failures: Vec::new(),
        last_value: None,
        finished: Duration::ZERO,
    };
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= total {
            break;
        }
        let value = i + 1;
        loop {
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "the run exceeded {RUN_TIMEOUT:?}: connection {conn} was at write {value} \
                     of {total} ({} writes claimed so far)",
                    next.load(Ordering::Relaxed).min(total)
                );
            }
            cl.set_timeout(deadline - now)?;
            let t = Instant::now();
            let answer = cl.call(&update_request(conn, value)).with_context(|| {
                format!(
                    "connection {conn}, write {value}, {} into the run",
                    secs(start.elapsed())
                )
            })?;
            match answer {
                Ok(_) => {
                    w.latencies.push(t.elapsed());
                    w.last_value = Some(value);
                    break;
                }
                Err(e) => {
                    let n = failed.fetch_add(1, Ordering::Relaxed) + 1;
                    w.failures.push(format!(
                        "{} into the run, after {}: {e}",
                        secs(start.elapsed()),
                        millis(t.elapsed())
                    ));
                    ensure!(n <= total, "more than {total} writes failed; last: {e}");
                    thread::sleep(POLL_EVERY);
                }
            }
        }
    }
    w.finished = start.elapsed();
    Ok(w)
}

// ---------------------------------------------------------------------------------------
// Report.

fn render(opts: &Opts, date: &str, machine: &str, r: &Results) -> String {
    let mut s = String::new();
    let elected: Vec<Duration> = r.failovers.iter().map(|f| f.elected).collect();
    let served: Vec<Duration> = r.failovers.iter().map(|f| f.served).collect();
    let row = |what: &str, v: &[Duration]| {
        let (min, max) = min_max(v);
        format!(
            "| {what} | {} | {} | {} |\n",
            secs(median(v)),
            secs(min),
            secs(max)
        )
    };
    s.push_str("## Raft: leader failover and committed writes\n\n");
    s.push_str(&format!(
        "Measured {date} on {machine}. Reproduce with `{}` (builds `meshd` and `mesh` in \
         release mode). Three managers, each a `meshd` in its own network namespace on one \
         bridge, all on this one machine; mutual TLS between them, Raft log and state in \
         redb.\n\n",
        opts.command()
    ));
    s.push_str(&format!(
        "**Leader failover.** The leader's `meshd` is SIGKILLed {} times; after each kill it is \
         restarted and the cluster must be healthy again before the next one. Times are from \
         the kill; the survivors' `info` is polled every 10 ms over the API socket.\n\n",
        r.failovers.len()
    ));
    s.push_str("| from SIGKILL of the leader until | median | min | max |\n");
    s.push_str("|---|---:|---:|---:|\n");
    s.push_str(&row("a survivor is the new Raft leader", &elected));
    s.push_str(&row(
        "a management call (`node_ls`) through a survivor succeeds",
        &served,
    ));
    let per_kill: Vec<String> = r
        .failovers
        .iter()
        .map(|f| {
            format!(
                "{:.2}/{:.2}",
                f.elected.as_secs_f64(),
                f.served.as_secs_f64()
            )
        })
        .collect();
    let term_jumps: Vec<String> = r
        .failovers
        .iter()
        .map(|f| (f.term_after - f.term_before).to_string())
        .collect();
    let failed: usize = r.failovers.iter().map(|f| f.failed_calls.len()).sum();
    s.push_str(&format!(
        "\nPer kill, leader/served in seconds: {}; Raft term increments per failover: {}; \
         `node_ls` calls that failed in between (each retried after 10 ms): {failed}.\n\n",
        per_kill.join(", "),
        term_jumps.join(", ")
    ));
    s.push_str(&format!(
        "**Committed writes.** {} connections each send `node_update` label writes (`mesh node \
         update --label-add`) one after another until {} have succeeded; each is a \
         linearizable read plus one Raft entry committed on 2 of 3 managers and fsynced. Sent \
         to the leader's daemon, then to a follower's, which forwards each call to the leader \
         over mutual TLS.\n\n",
        opts.concurrency, opts.writes
    ));
    s.push_str("| sent to | writes/s | p50 latency | p99 latency | failed (retried) |\n");
    s.push_str("|---|---:|---:|---:|---:|\n");
    for w in &r.writes {
        s.push_str(&format!(
            "| {} ({}) | {:.0} | {} | {} | {} |\n",
            w.target.word(),
            w.host,
            w.per_sec(),
            millis(percentile(&w.latencies, 50.0)),
            millis(percentile(&w.latencies, 99.0)),
            w.failures.len()
        ));
    }
    let notes: Vec<String> = r
        .writes
        .iter()
        .flat_map(|w| {
            let change = w.leader_change.as_ref().map(|c| {
                format!(
                    "via the {}: leadership changed during the run: {c}",
                    w.target.word()
                )
            });
            let first = w
                .failures
                .first()
                .map(|f| format!("via the {}: first failed write {f}", w.target.word()));
            change.into_iter().chain(first)
        })
        .collect();
    if !notes.is_empty() {
        s.push('\n');
        for n in notes {
            s.push_str(&format!("- {n}\n"));
        }
    }
    if let [leader, follower] = &r.writes[..] {
        s.push_str(&format!(
            "\nThrough a follower, throughput is {:.0}% of the leader's and the median latency is \
             {:.1}x the leader's.\n",
            100.0 * follower.per_sec() / leader.per_sec().max(1e-9),
            percentile(&follower.latencies, 50.0).as_secs_f64()
                / percentile(&leader.latencies, 50.0).as_secs_f64().max(1e-9)
        ));
    }
    let (med_elected, med_served) = (median(&elected), median(&served));
    s.push_str(&format!(
        "\nFor comparison, swarmkit's Raft ticks once a second and calls an election after 10 \
         ticks, so Docker Swarm's documented leader failover takes 10 s or more; here a new \
         leader was elected in a median {} and management calls worked again after a median \
         {}, about {:.0}x sooner.\n",
        secs(med_elected),
        secs(med_served),
        10.0 / med_served.as_secs_f64().max(1e-3)
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_parse() {
        assert_eq!(Opts::parse(&[]).unwrap(), Some(Opts::default()));
        let o = Opts::parse(&args(&["--kills", "3", "--writes=10", "--no-write-docs"]))
            .unwrap()
            .unwrap();
        assert_eq!(
            (o.kills, o.writes, o.concurrency, o.write_docs),
            (3, 10, 8, false)
        );
        assert_eq!(o.command(), "cargo xtask bench raft --kills 3 --writes 10");
        assert_eq!(Opts::default().command(), COMMAND);
        assert_eq!(Opts::parse(&args(&["--help"])).unwrap(), None);
        assert!(Opts::parse(&args(&["--kills"])).is_err());
        assert!(Opts::parse(&args(&["--kills", "0"])).is_err());
        assert!(Opts::parse(&args(&["--bogus"])).is_err());
    }

    #[test]
    fn update_requests_have_the_api_shape() {
        // The wire format of mesh_api::Request::NodeUpdate.
        let want: Value = serde_json::from_str(concat!(
            r#"{"method":"node_update","params":{"node":"h1","availability":null,"#,
            r#""label_add":{"bench-3":"7"},"label_rm":[]}}"#
        ))
        .unwrap();
        assert_eq!(update_request(3, 7), want);
    }
}
