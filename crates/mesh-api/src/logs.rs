//! Task logs as `service logs` carries them: lines stamped by the node that read them, the
//! task each came from, and the times `--since` accepts (Docker's forms: an RFC 3339 date or
//! time, Unix seconds, or a duration back from now).

use serde::{Deserialize, Serialize};

/// Which output of a task a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    Stdout,
    Stderr,
}

/// One line of a task's output, as its node keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// When the node read it, in nanoseconds since the Unix epoch (strictly increasing
    /// within a task).
    pub time_ns: u64,
    pub stream: LogStream,
    /// The text, without its newline.
    pub text: String,
}

/// A line of `service logs`: a [`LogLine`] with the task and node it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceLogLine {
    pub task_id: String,
    /// `web.1`, or `web.<node ID>` for a global service's task.
    pub task_name: String,
    pub service_id: String,
    pub node_id: String,
    /// The node's hostname.
    pub node: String,
    #[serde(flatten)]
    pub line: LogLine,
}

/// What `service logs` answers: the lines (by time), and the nodes that could not answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceLogs {
    pub lines: Vec<ServiceLogLine>,
    #[serde(default)]
    pub errors: Vec<String>,
}

/// The last `tail` lines of each task (all if `None`), in the order given.
pub fn tail_per_task(lines: Vec<ServiceLogLine>, tail: Option<usize>) -> Vec<ServiceLogLine> {
    let Some(n) = tail else { return lines };
    let mut left: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for l in &lines {
        *left.entry(l.task_id.clone()).or_default() += 1;
    }
    lines
        .into_iter()
        .filter(|l| {
            let c = left.get_mut(&l.task_id).expect("counted");
            *c -= 1;
            *c < n
        })
        .collect()
}

/// `--since VALUE` as Unix nanoseconds, `now_ns` being the present: an RFC 3339 time
/// (`2026-12-04T10:00:00Z`, `...+01:00`, fractions allowed) or date (`2026-12-04`), Unix
/// seconds (`1733305200`, `1733305200.5`), or a Go duration back from now (`42m`, `1h30m`).
pub fn parse_since(value: &str, now_ns: u64) -> Result<u64, String> {
    let v = value.trim();
    let bad = || format!("failed to parse value as time or duration: {value:?}");
    if v.is_empty() {
        return Err(bad());
    }
    // Unix seconds, with an optional fraction.
    if v.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && v.bytes().filter(|b| *b == b'.').count() <= 1
    {
        let (s, frac) = v.split_once('.').unwrap_or((v, ""));
        let secs: u64 = s.parse().map_err(|_| bad())?;
        let nanos: u64 = if frac.is_empty() {
            0
        } else if frac.len() <= 9 {
            format!("{frac:0<9}").parse().map_err(|_| bad())?
        } else {
            return Err(bad());
        };
        return Ok(secs.saturating_mul(1_000_000_000) + nanos);
    }
    if let Some(t) = parse_rfc3339(v) {
        return Ok(t);
    }
    // A bare "0" was taken as Unix seconds above.
    if let Some(ns) = crate::human::go_duration_ns(v) {
        return Ok(now_ns.saturating_sub(ns));
    }
    Err(bad())
}

/// RFC 3339 time or date: `YYYY-MM-DD[THH:MM[:SS[.frac]]][Z|±HH:MM]` (no zone: UTC).
fn parse_rfc3339(v: &str) -> Option<u64> {
    let (date, time) = match v.split_once(['T', 't', ' ']) {
        Some((d, t)) => (d, Some(t)),
        None => (v, None),
    };
    let mut d = date.splitn(3, '-');
    let y: i64 = d.next()?.parse().ok()?;
    let m: i64 = d.next()?.parse().ok()?;
    let day: i64 = d.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || date.len() != 10 {
        return None;
    }
    let mut secs_of_day = 0i64;
    let mut nanos = 0u64;
    let mut offset = 0i64;
    if let Some(t) = time {
        let (clock, zone) = if let Some(c) = t.strip_suffix(['Z', 'z']) {
            (c, None)
        } else if let Some(i) = t.rfind(['+', '-']) {
            (&t[..i], Some(&t[i..]))
        } else {
            (t, None)
        };
        if let Some(z) = zone {
            let sign = if z.starts_with('-') { -1 } else { 1 };
            let (hh, mm) = z[1..].split_once(':')?;
            offset = sign * (hh.parse::<i64>().ok()? * 3600 + mm.parse::<i64>().ok()? * 60);
        }
        let (hms, frac) = clock.split_once('.').unwrap_or((clock, ""));
        let mut p = hms.split(':');
        let hh: i64 = p.next()?.parse().ok()?;
        let mm: i64 = p.next()?.parse().ok()?;
        let ss: i64 = match p.next() {
            Some(s) => s.parse().ok()?,
            None => 0,
        };
        if p.next().is_some() || hh > 23 || mm > 59 || ss > 60 {
            return None;
        }
        if !frac.is_empty() {
            if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            nanos = format!("{frac:0<9}").parse().ok()?;
        }
        secs_of_day = hh * 3600 + mm * 60 + ss;
    }
    let secs = days_from_civil(y, m, day) * 86_400 + secs_of_day - offset;
    Some(u64::try_from(secs).ok()? * 1_000_000_000 + nanos)
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_764_892_800_000_000_000; // 2025-12-05T00:00:00Z

    #[test]
    fn since_takes_docker_s_forms() {
        assert_eq!(parse_since("1764892800", NOW), Ok(NOW));
        assert_eq!(parse_since("1764892800.25", NOW), Ok(NOW + 250_000_000));
        assert_eq!(parse_since("2025-12-05", NOW), Ok(NOW));
        assert_eq!(parse_since("2025-12-05T00:00:00Z", NOW), Ok(NOW));
        assert_eq!(parse_since("2025-12-05T01:00:00+01:00", NOW), Ok(NOW));
        assert_eq!(
            parse_since("2025-12-04T23:00:00.5", NOW),
            Ok(NOW - 3_600_000_000_000 + 500_000_000)
        );
        assert_eq!(parse_since("42m", NOW), Ok(NOW - 42 * 60_000_000_000));
        assert_eq!(parse_since("1h30m", NOW), Ok(NOW - 5400 * 1_000_000_000));
        for bad in ["", "yesterday", "2025-13-01", "12x", "1.2.3"] {
            let e = parse_since(bad, NOW).unwrap_err();
            assert!(
                e.contains("failed to parse value as time or duration"),
                "{bad}: {e}"
            );
        }
    }
}
