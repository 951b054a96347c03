//! Report plumbing shared by all benchmarks: the date and machine a run happened on, and
//! rewriting one benchmark's section of `docs/benchmarks.md` in place.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

/// The benchmarks document, relative to this crate.
pub const DOCS_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/benchmarks.md");

/// What a new `docs/benchmarks.md` starts with.
const DOCS_HEADER: &str = "# Benchmarks

Each section below is written by `cargo xtask bench NAME` (the `mesh-bench` crate) and says
when, on what machine and with which command its numbers were taken. They come from shared
2-core machines, so ratios and side-by-side comparisons matter more than absolute numbers.
";

/// Today's date in UTC, `YYYY-MM-DD HH:MM UTC`.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

/// Converts days since 1970-01-01 to a (year, month, day) date of the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// One line describing this machine: CPU count (as `nproc`), CPU model and kernel.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let model = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    });
    match model {
        Some(m) => format!("{cpus} CPUs (nproc) of {m}, Linux {kernel}"),
        None => format!("{cpus} CPUs (nproc), Linux {kernel}"),
    }
}

/// Replaces the text between `<!-- bench:NAME:begin -->` and `<!-- bench:NAME:end -->` in
/// the benchmarks document with `body`. A missing document is created with a header; missing
/// markers are appended at its end. Nothing else in the file changes.
pub fn write_section(name: &str, body: &str) -> Result<()> {
    let path = Path::new(DOCS_PATH);
    let old = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => DOCS_HEADER.to_string(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let new = replace_section(&old, name, body);
    std::fs::write(path, new).with_context(|| format!("writing {}", path.display()))
}

fn replace_section(doc: &str, name: &str, body: &str) -> String {
    let begin = format!("<!-- bench:{name}:begin -->");
    let end = format!("<!-- bench:{name}:end -->");
    let body = body.trim_matches('\n');
    if let Some(b) = doc.find(&begin) {
        let after = b + begin.len();
        if let Some(e) = doc[after..].find(&end) {
            return format!("{}\n{body}\n{}", &doc[..after], &doc[after + e..]);
        }
    }
    let mut out = doc.trim_end_matches('\n').to_string();
    out.push_str(&format!("\n\n{begin}\n{body}\n{end}\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_513), (2026, 3, 1));
    }

    #[test]
    fn sections_are_replaced_or_appended() {
        let doc = "# B\n\ntext\n";
        let once = replace_section(doc, "x", "one");
        assert_eq!(
            once,
            "# B\n\ntext\n\n<!-- bench:x:begin -->\none\n<!-- bench:x:end -->\n"
        );
        let twice = replace_section(&format!("{once}\nafter\n"), "x", "\ntwo\n");
        assert_eq!(
            twice,
            "# B\n\ntext\n\n<!-- bench:x:begin -->\ntwo\n<!-- bench:x:end -->\n\nafter\n"
        );
        let other = replace_section(&twice, "y", "why");
        assert!(other.starts_with(&twice.trim_end_matches('\n').to_string()));
        assert!(other.ends_with("<!-- bench:y:begin -->\nwhy\n<!-- bench:y:end -->\n"));
    }
}
