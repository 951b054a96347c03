//! Times as Docker prints them: durations as go-units' `HumanDuration` words them
//! ("About a minute", "3 days") and RFC 3339 timestamps. Shared by the `mesh` CLI and the
//! Engine API.

/// `secs` as Docker words a duration.
pub fn human_duration(secs: u64) -> String {
    let hours = secs / 3600;
    match secs {
        0 => "Less than a second".to_string(),
        1 => "1 second".to_string(),
        2..=59 => format!("{secs} seconds"),
        60..=119 => "About a minute".to_string(),
        120..=2999 => format!("{} minutes", secs / 60),
        // go-units rounds hours to the nearest: 50 minutes is "About an hour".
        3000..=5399 => "About an hour".to_string(),
        _ if hours < 48 => format!("{} hours", (secs + 1800) / 3600),
        _ if hours < 24 * 7 * 2 => format!("{} days", hours / 24),
        _ if hours < 24 * 30 * 2 => format!("{} weeks", hours / 24 / 7),
        _ if hours < 24 * 365 * 2 => format!("{} months", hours / 24 / 30),
        _ => format!("{} years", hours / 24 / 365),
    }
}

/// RFC 3339 with nanoseconds, UTC, from Unix milliseconds.
pub fn rfc3339_ms(ms: u64) -> String {
    rfc3339_ns(ms.saturating_mul(1_000_000))
}

/// RFC 3339 with nanoseconds (always 9 digits, as Docker's log timestamps), UTC, from Unix
/// nanoseconds.
pub fn rfc3339_ns(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ns % 1_000_000_000
    )
}

/// A Go duration (`300ms`, `5s`, `1m30s`, `1.5h`; `0` alone) in nanoseconds, rounded; `None`
/// if it is not one. The one parser behind the CLI's flags, compose files and `--since`.
pub fn go_duration_ns(s: &str) -> Option<u64> {
    if s == "0" {
        return Some(0);
    }
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        if num_len == 0 {
            return None;
        }
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total += n * mult;
        rest = &rest[unit_len..];
    }
    Some(total.round() as u64)
}

/// Now, in nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// RFC 3339, UTC, from Unix seconds (as Docker's `CreatedAt`).
pub fn rfc3339(secs: u64) -> String {
    rfc3339_ms(secs.saturating_mul(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(go_duration_ns("0"), Some(0));
        assert_eq!(go_duration_ns("1m30s"), Some(90_000_000_000));
        assert_eq!(go_duration_ns("1.5h"), Some(5_400_000_000_000));
        assert_eq!(go_duration_ns("300ms"), Some(300_000_000));
        for bad in ["", "5", "s", "1x", "1m30"] {
            assert_eq!(go_duration_ns(bad), None, "{bad}");
        }
    }

    #[test]
    fn as_docker_words_them() {
        assert_eq!(human_duration(0), "Less than a second");
        assert_eq!(human_duration(1), "1 second");
        assert_eq!(human_duration(5), "5 seconds");
        assert_eq!(human_duration(90), "About a minute");
        assert_eq!(human_duration(600), "10 minutes");
        assert_eq!(human_duration(3000), "About an hour");
        assert_eq!(human_duration(3 * 3600), "3 hours");
        assert_eq!(human_duration(3 * 86_400), "3 days");
        assert_eq!(human_duration(20 * 86_400), "2 weeks");
        assert_eq!(human_duration(100 * 86_400), "3 months");
        assert_eq!(human_duration(800 * 86_400), "2 years");
    }
}
