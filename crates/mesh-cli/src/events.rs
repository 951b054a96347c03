//! `mesh events`: the cluster's changes as Docker's `docker events` prints them
//! (`TIME TYPE ACTION ID (name=..., state.new=..., ...)`), from now on: the leader's objects
//! compared every [`EVERY`] (`mesh_api::events`, as the Engine API's `GET /events`). mesh
//! keeps no event history, so `--since` in the past is refused.

use std::io::Write;
use std::time::Duration;

use clap::Args;
use mesh_api::events::{matches, Event, Snapshot, FILTER_KEYS};
use mesh_api::human::now_ns;
use mesh_api::{ClusterObjects, Filters, Request};

use crate::client::Client;
use crate::{Failure, Result};

/// How often the objects are compared.
const EVERY: Duration = Duration::from_millis(500);

#[derive(Args, Debug)]
pub struct EventsArgs {
    /// Filter output based on conditions provided (type, event, service, node, network).
    #[arg(short, long)]
    filter: Vec<String>,
    /// Format output: 'json' prints each event as a JSON object.
    #[arg(long)]
    format: Option<String>,
    /// Show events created since timestamp (mesh keeps no history: now or later).
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
    if time(&a.since)?.is_some_and(|s| s + 1_000_000_000 < now) {
        return Err(Failure(
            "mesh keeps no event history: events stream from now on (leave out --since)".into(),
        ));
    }
    let until = time(&a.until)?;
    let objects = || -> Result<Snapshot> {
        let v = c.call(Request::Objects { service: None })?;
        let o: ClusterObjects = serde_json::from_value(v)?;
        Ok(Snapshot::of(&o))
    };
    let mut last = objects()?;
    let mut out = std::io::stdout().lock();
    loop {
        let wait = match until {
            Some(u) => {
                let now = now_ns();
                if now >= u {
                    return Ok(());
                }
                EVERY.min(Duration::from_nanos(u - now))
            }
            None => EVERY,
        };
        std::thread::sleep(wait);
        let next = objects()?;
        let evs = last.changes(&next, now_ns());
        for ev in evs {
            if !matches(&f, &ev) {
                continue;
            }
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
        last = next;
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
            kind: "service",
            action: "update",
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
