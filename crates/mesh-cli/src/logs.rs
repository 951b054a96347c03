//! `mesh service logs`: a service's (or one task's) output from every node that ran it, as
//! Docker prints it (`web.1.<id>@node    | line`, stderr lines on stderr), and with
//! `--follow` the lines that come after, new tasks included: read again every
//! [`FOLLOW_EVERY`] from a cursor per task (the time of its last line, as its node stamped
//! it, so nodes' clocks need not agree), until the service is removed or the user stops it.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use mesh_api::human::now_ns;
use mesh_api::logs::tail_per_task;
use mesh_api::{LogStream, Request, ServiceLogLine, ServiceLogs};

use crate::client::Client;
use crate::service::LogsArgs;
use crate::{Failure, Result};

/// How often `--follow` asks again.
const FOLLOW_EVERY: Duration = Duration::from_millis(500);

pub fn service_logs(c: &Client, a: &LogsArgs) -> Result<()> {
    // Docker: a negative number or a non-integer means all.
    let tail = match a.tail.as_str() {
        "all" | "" => None,
        n => n.parse::<usize>().ok(),
    };
    let since_ns = match &a.since {
        None => None,
        Some(v) => Some(mesh_api::logs::parse_since(v, now_ns()).map_err(Failure)?),
    };
    let fetch = |after: &BTreeMap<String, u64>| -> Result<ServiceLogs> {
        let v = c.call(Request::ServiceLogs {
            service: a.service.clone(),
            since_ns,
            tail: None,
            after: after.clone(),
        })?;
        Ok(serde_json::from_value(v)?)
    };
    let first = fetch(&BTreeMap::new())?;
    report_errors(&first.errors);
    // Every task seen is read from its last line on (with `--tail`, the lines not shown are
    // not shown later either).
    let mut after: BTreeMap<String, u64> = BTreeMap::new();
    for l in &first.lines {
        after.insert(l.task_id.clone(), l.line.time_ns);
    }
    let lines = tail_per_task(first.lines, tail);
    let mut reported: Vec<String> = first.errors;
    print(a, &lines, &mut after)?;
    if !a.follow {
        return Ok(());
    }
    loop {
        std::thread::sleep(FOLLOW_EVERY);
        let next = match fetch(&after) {
            Ok(n) => n,
            // The service was removed: nothing more will come.
            Err(Failure(m)) if m.contains("no such task or service") => return Ok(()),
            Err(e) => return Err(e),
        };
        // A node that cannot answer is said once, not every half second.
        let fresh: Vec<String> = next
            .errors
            .iter()
            .filter(|e| !reported.contains(e))
            .cloned()
            .collect();
        report_errors(&fresh);
        reported = next.errors;
        print(a, &next.lines, &mut after)?;
    }
}

fn report_errors(errors: &[String]) {
    for e in errors {
        eprintln!("{e}");
    }
}

/// Prints `lines` (stdout lines on stdout, stderr lines on stderr) and moves the cursors.
fn print(a: &LogsArgs, lines: &[ServiceLogLine], after: &mut BTreeMap<String, u64>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    for l in lines {
        after.insert(l.task_id.clone(), l.line.time_ns);
        let text = format_line(a, l);
        let w: &mut dyn Write = match l.line.stream {
            LogStream::Stdout => &mut out,
            LogStream::Stderr => &mut err,
        };
        if writeln!(w, "{text}").is_err() {
            // A closed pipe (`| head`): stop quietly, as Docker does.
            std::process::exit(0);
        }
    }
    let _ = out.flush();
    Ok(())
}

/// One line as Docker's CLI prints it: `[TIME ]web.1.<id>@node    | text`, or with `--raw`
/// `[TIME ]text`.
pub fn format_line(a: &LogsArgs, l: &ServiceLogLine) -> String {
    let mut s = String::new();
    if a.timestamps {
        s.push_str(&mesh_api::human::rfc3339_ns(l.line.time_ns));
        s.push(' ');
    }
    if !a.raw {
        let (service, node) = if a.no_resolve {
            (l.service_id.as_str(), l.node_id.as_str())
        } else {
            let service = l.task_name.split_once('.').map_or("", |(s, _)| s);
            (service, l.node.as_str())
        };
        let slot = l.task_name.split_once('.').map_or("", |(_, s)| s);
        s.push_str(&format!("{service}.{slot}"));
        if !a.no_task_ids {
            let id = if a.no_trunc {
                l.task_id.as_str()
            } else {
                &l.task_id[..l.task_id.len().min(12)]
            };
            s.push('.');
            s.push_str(id);
        }
        s.push_str(&format!("@{node}    | "));
    }
    s.push_str(&l.line.text);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use mesh_api::LogLine;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: LogsArgs,
    }

    fn args(extra: &[&str]) -> LogsArgs {
        let mut v = vec!["t"];
        v.extend_from_slice(extra);
        v.push("web");
        T::parse_from(v).a
    }

    fn line(task: &str, t: u64, text: &str) -> ServiceLogLine {
        ServiceLogLine {
            task_id: task.into(),
            task_name: "web.2".into(),
            service_id: "svc0123456789".into(),
            node_id: "node0123456789".into(),
            node: "h1".into(),
            line: LogLine {
                time_ns: t,
                stream: LogStream::Stdout,
                text: text.into(),
            },
        }
    }

    #[test]
    fn lines_look_like_docker_s() {
        let l = line(
            "abcdefghijklmnopqrstuvwxy",
            1_000_000_000_000_000_001,
            "hello",
        );
        assert_eq!(
            format_line(&args(&[]), &l),
            "web.2.abcdefghijkl@h1    | hello"
        );
        assert_eq!(
            format_line(&args(&["--no-trunc"]), &l),
            "web.2.abcdefghijklmnopqrstuvwxy@h1    | hello"
        );
        assert_eq!(
            format_line(&args(&["--no-task-ids"]), &l),
            "web.2@h1    | hello"
        );
        assert_eq!(
            format_line(&args(&["--no-resolve", "--no-task-ids"]), &l),
            "svc0123456789.2@node0123456789    | hello"
        );
        assert_eq!(
            format_line(&args(&["-t", "--raw"]), &l),
            "2001-09-09T01:46:40.000000001Z hello"
        );
    }

    #[test]
    fn tail_is_per_task() {
        let lines = vec![
            line("a", 1, "a1"),
            line("b", 2, "b1"),
            line("a", 3, "a2"),
            line("a", 4, "a3"),
            line("b", 5, "b2"),
        ];
        let texts = |v: Vec<ServiceLogLine>| -> Vec<String> {
            v.into_iter().map(|l| l.line.text).collect()
        };
        assert_eq!(texts(tail_per_task(lines.clone(), Some(1))), ["a3", "b2"]);
        assert_eq!(
            texts(tail_per_task(lines.clone(), Some(0))),
            Vec::<String>::new()
        );
        assert_eq!(tail_per_task(lines.clone(), None), lines);
    }
}
