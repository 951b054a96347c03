//! `mesh events`: the cluster's changes as Docker's `docker events` prints them
//! (`TIME TYPE ACTION ID (name=..., state.new=..., ...)`). The managers derive them from the
//! store as they apply the Raft log and keep the last ones (mesh-manager's `history`):
//! `--since` prints the kept ones made since then, and the stream then asks every
//! [`mesh_api::events::EVERY`] for what came after the last one it printed, so nothing is
//! missed or printed twice, also across a leader change (it waits while the swarm has no
//! leader). What to print and when to stop is [`mesh_api::events::Follow`]'s, as for the
//! Engine API's `GET /events`. Events lost to it (more made between two reads than the
//! managers keep) are named in a warning on stderr, and the stream goes on.

use std::io::Write;

use clap::Args;
use mesh_api::events::{batch_of, Event, EventBatch, Follow, FILTER_KEYS};
use mesh_api::human::now_ns;
use mesh_api::{Filters, Request};

use crate::client::Client;
use crate::{Failure, Result};

#[derive(Args, Debug)]
pub struct EventsArgs {
    /// Filter output based on conditions provided (type, event, service, node, network, secret, config).
    #[arg(short, long)]
    filter: Vec<String>,
    /// Format output: 'json' prints each event as a JSON object.
    #[arg(long)]
    format: Option<String>,
    /// Show events created since timestamp (the managers keep the last 1024).
    #[arg(long)]
    since: Option<String>,
    /// Stream events until this timestamp.
    #[arg(long)]
    until: Option<String>,
}

pub fn run(c: &Client, a: &EventsArgs) -> Result<()> {
    let f = Filters::parse_args(&a.filter).map_err(Failure)?;
    f.only(FILTER_KEYS).map_err(Failure)?;
    let json = match a.format.as_deref() {
        None | Some("") => false,
        Some("json" | "{{json .}}") => true,
        Some(other) => {
            return Err(Failure(format!(
                "unsupported --format {other:?} for events: use json"
            )))
        }
    };
    let now = now_ns();
    let time = |v: &Option<String>| -> Result<Option<u64>> {
        v.as_deref()
            .map(|v| mesh_api::logs::parse_since(v, now).map_err(Failure))
            .transpose()
    };
    let since = time(&a.since)?;
    let until = time(&a.until)?;
    if let (Some(s), Some(u)) = (since, until) {
        if u < s {
            return Err(Failure("`--until` must be after `--since`".into()));
        }
    }
    // `None`: an election; ask again, from the same place.
    let ask = |after: Option<u64>, since_ns: Option<u64>| -> Result<Option<EventBatch>> {
        batch_of(c.answer(Request::Events { after, since_ns })?)
            .map_err(|e| Failure(format!("Error response from daemon: {e}")))
    };
    let first = ask(None, since)?.ok_or_else(|| {
        Failure("Error response from daemon: the swarm has no leader at the moment".into())
    })?;
    let mut out = std::io::stdout().lock();
    let mut follow = Follow::new(f, until);
    let mut batch = Some(first);
    loop {
        let taken = batch.map(|b| follow.take(b)).unwrap_or_default();
        if let Some(m) = taken.missed {
            // Told, and the stream goes on with what is kept.
            eprintln!("WARNING: {m}");
        }
        for ev in taken.events {
            let line = if json {
                ev.docker_json().to_string()
            } else {
                as_text(&ev)
            };
            if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                // A closed pipe (`| head`): stop quietly.
                return Ok(());
            }
        }
        let Some(wait) = follow.wait(now_ns()) else {
            return Ok(());
        };
        std::thread::sleep(wait);
        batch = ask(follow.after(), None)?;
    }
}

/// Docker's line: `2026-12-04T10:00:00.123456789Z service create ID (name=web)`.
pub fn as_text(ev: &Event) -> String {
    let attrs: Vec<String> = ev
        .attributes
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    format!(
        "{} {} {} {} ({})",
        mesh_api::human::rfc3339_ns(ev.time_ns),
        ev.kind,
        ev.action,
        ev.id,
        attrs.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_as_docker_prints_it() {
        let ev = Event {
            seq: 1,
            kind: "service".into(),
            action: "update".into(),
            id: "abc".into(),
            attributes: [
                ("name", "web"),
                ("replicas.new", "3"),
                ("replicas.old", "2"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            time_ns: 1_000_000_000_000_000_001,
        };
        assert_eq!(
            as_text(&ev),
            "2001-09-09T01:46:40.000000001Z service update abc (name=web, replicas.new=3, replicas.old=2)"
        );
        let v = ev.docker_json();
        assert_eq!(v["Actor"]["Attributes"]["replicas.new"], "3");
    }
}
