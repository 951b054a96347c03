//! A task's output, kept as Docker's `json-file` driver keeps a container's: the shim reads
//! the task's stdout and stderr pipes and appends one JSON object per line to `log.json` in
//! the task's directory, `{"log":"text\n","stream":"stdout","time":"<RFC 3339, ns>"}`, so the
//! tools that read Docker's files read these. The file is bounded: past
//! [`LogOptions::max_size`] bytes it becomes `log.json.1` (the older ones shift to `.2`, ...)
//! and at most [`LogOptions::max_file`] files are kept (Docker's `max-size` and `max-file`
//! log options; here on by default, 10 MB and 3 files).
//!
//! Lines longer than [`MAX_LINE`] are cut in records of that size (as Docker's 16 KiB
//! partial messages); a last line without a newline is kept as it is when the pipe closes.
//! Times are strictly increasing within a task's log (a clock step back, or two lines in
//! one nanosecond, take the previous time + 1 ns), so a reader that has seen up to time T
//! can ask for what follows T without losing or repeating a line.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The current log file of a task directory.
pub const LOG_FILE: &str = "log.json";
/// The longest record's text; longer lines are cut (Docker's partial-message size).
pub const MAX_LINE: usize = 16 * 1024;

/// Rotation settings (`meshd --log-opt max-size=10m --log-opt max-file=3`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogOptions {
    /// Bytes after which the file is rotated.
    pub max_size: u64,
    /// Files kept, the current one included (at least 1).
    pub max_file: u32,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            max_size: 10 * 1000 * 1000,
            max_file: 3,
        }
    }
}

impl LogOptions {
    /// Applies one `KEY=VALUE` log option (`max-size`, with Docker's units `k`, `m`, `g`, and
    /// `max-file`); the error names what is wrong, in Docker's words where it has them.
    pub fn set(&mut self, opt: &str) -> Result<(), String> {
        let (k, v) = opt
            .split_once('=')
            .ok_or_else(|| format!("invalid log opt {opt:?}: expected KEY=VALUE"))?;
        match k {
            "max-size" => {
                let size = parse_size(v)?;
                if size == 0 {
                    return Err("max-size must be a positive number".into());
                }
                self.max_size = size;
            }
            "max-file" => {
                let n: u32 = v
                    .parse()
                    .map_err(|_| format!("invalid value for max-file: {v:?}"))?;
                if n < 1 {
                    return Err("max-file cannot be less than 1".into());
                }
                self.max_file = n;
            }
            other => {
                return Err(format!(
                    "unknown log opt '{other}' for json-file log driver"
                ))
            }
        }
        Ok(())
    }
}

/// `10m`, `512k`, `1g`, `2048` (bytes): as Docker's `units.FromHumanSize` (decimal).
fn parse_size(v: &str) -> Result<u64, String> {
    let bad = || format!("invalid size: '{v}'");
    let t = v.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1_000u64),
        Some('m') => (&t[..t.len() - 1], 1_000_000),
        Some('g') => (&t[..t.len() - 1], 1_000_000_000),
        _ => (t, 1),
    };
    let n: f64 = num.trim().parse().map_err(|_| bad())?;
    if !n.is_finite() || n < 0.0 {
        return Err(bad());
    }
    Ok((n * mult as f64) as u64)
}

/// Which pipe a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// One line of a task's output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// When the shim read it, in nanoseconds since the Unix epoch.
    pub time_ns: u64,
    pub stream: Stream,
    /// The text, without its newline.
    pub text: String,
}

/// The file format: Docker's `json-file` entry.
#[derive(Serialize, Deserialize)]
struct Entry {
    log: String,
    stream: Stream,
    time: String,
}

/// Appends records to a task's log, rotating it. Shared by the stdout and stderr readers.
pub struct Writer {
    dir: PathBuf,
    opts: LogOptions,
    file: File,
    size: u64,
    last_ns: u64,
}

impl Writer {
    /// Opens (appends to) `dir/log.json`.
    pub fn open(dir: &Path, opts: LogOptions) -> io::Result<Writer> {
        let path = dir.join(LOG_FILE);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = file.metadata()?.len();
        Ok(Writer {
            dir: dir.to_path_buf(),
            opts,
            file,
            size,
            last_ns: 0,
        })
    }

    /// Appends one line (its newline not included), read now.
    pub fn write(&mut self, stream: Stream, text: &[u8]) -> io::Result<()> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let t = now.max(self.last_ns + 1);
        self.last_ns = t;
        let mut log = String::from_utf8_lossy(text).into_owned();
        log.push('\n');
        let mut line = serde_json::to_vec(&Entry {
            log,
            stream,
            time: rfc3339_ns(t),
        })
        .map_err(io::Error::other)?;
        line.push(b'\n');
        if self.size > 0 && self.size + line.len() as u64 > self.opts.max_size {
            self.rotate()?;
        }
        self.file.write_all(&line)?;
        self.size += line.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let name = |i: u32| {
            if i == 0 {
                self.dir.join(LOG_FILE)
            } else {
                self.dir.join(format!("{LOG_FILE}.{i}"))
            }
        };
        let keep = self.opts.max_file.max(1);
        if keep == 1 {
            // One file: it starts over.
            self.file.set_len(0)?;
            self.size = 0;
            return Ok(());
        }
        let _ = fs::remove_file(name(keep - 1));
        for i in (0..keep - 1).rev() {
            match fs::rename(name(i), name(i + 1)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        self.file = OpenOptions::new().create(true).append(true).open(name(0))?;
        self.size = 0;
        Ok(())
    }
}

/// Copies one pipe into the log until it closes, a record per line (cut at [`MAX_LINE`]).
/// A write error is reported on stderr (the shim's log) once, and the pipe still drained,
/// so the task never blocks on a full pipe.
pub fn copy(mut from: impl Read, stream: Stream, to: &Arc<Mutex<Writer>>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    let mut failed = false;
    let emit = |text: &[u8], failed: &mut bool| {
        let mut w = to.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = w.write(stream, text) {
            if !*failed {
                eprintln!("mesh task shim: writing the task's log: {e}");
                *failed = true;
            }
        }
    };
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        pending.extend_from_slice(&buf[..n]);
        let mut start = 0;
        while let Some(pos) = pending[start..].iter().position(|b| *b == b'\n') {
            let line = &pending[start..start + pos];
            for chunk in line.chunks(MAX_LINE) {
                emit(chunk, &mut failed);
            }
            if line.is_empty() {
                emit(b"", &mut failed);
            }
            start += pos + 1;
        }
        pending.drain(..start);
        while pending.len() >= MAX_LINE {
            let rest = pending.split_off(MAX_LINE);
            emit(&pending, &mut failed);
            pending = rest;
        }
    }
    if !pending.is_empty() {
        emit(&pending, &mut failed);
    }
}

/// The records of the task directory `dir` (oldest first): those after `after_ns` (if
/// given, exclusive), then the last `tail` of them (if given). A line being written (no
/// newline yet) and a malformed one are skipped.
pub fn read(dir: &Path, after_ns: Option<u64>, tail: Option<usize>) -> io::Result<Vec<Record>> {
    let mut files: Vec<(u32, PathBuf)> = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let idx = if name == LOG_FILE {
            0
        } else if let Some(n) = name
            .strip_prefix(LOG_FILE)
            .and_then(|r| r.strip_prefix('.'))
            .and_then(|n| n.parse::<u32>().ok())
        {
            n
        } else {
            continue;
        };
        files.push((idx, e.path()));
    }
    // Newest (index 0) first: older files are read only while they can hold lines wanted
    // (after `after_ns`, or to fill `tail`), so a follower's poll reads one file.
    files.sort_by_key(|f| f.0);
    let mut out = Vec::new();
    for (_, path) in files {
        let f = match File::open(&path) {
            Ok(f) => f,
            // Rotated away between the listing and the open.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut r = BufReader::new(f);
        let mut line = Vec::new();
        let mut first: Option<u64> = None;
        loop {
            line.clear();
            if r.read_until(b'\n', &mut line)? == 0 || line.last() != Some(&b'\n') {
                break;
            }
            let Ok(e) = serde_json::from_slice::<Entry>(&line) else {
                continue;
            };
            let Some(time_ns) = parse_rfc3339_ns(&e.time) else {
                continue;
            };
            first.get_or_insert(time_ns);
            if after_ns.is_some_and(|a| time_ns <= a) {
                continue;
            }
            let mut text = e.log;
            if text.ends_with('\n') {
                text.pop();
            }
            out.push(Record {
                time_ns,
                stream: e.stream,
                text,
            });
        }
        let older_not_wanted = after_ns.is_some_and(|a| first.is_some_and(|t| t <= a))
            || tail.is_some_and(|n| out.len() >= n);
        if older_not_wanted {
            break;
        }
    }
    // In time order, each line once (a rotation between the listing and the reads can show
    // one file under two names).
    out.sort_by_key(|r| r.time_ns);
    out.dedup_by_key(|r| r.time_ns);
    if let Some(n) = tail {
        let drop = out.len().saturating_sub(n);
        out.drain(..drop);
    }
    Ok(out)
}

/// RFC 3339 with nanoseconds, UTC (`2026-12-04T23:30:00.123456789Z`).
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

/// Parses what [`rfc3339_ns`] writes (any number of fraction digits, `Z` only).
pub fn parse_rfc3339_ns(s: &str) -> Option<u64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-');
    let y: i64 = d.next()?.parse().ok()?;
    let m: i64 = d.next()?.parse().ok()?;
    let day: i64 = d.next()?.parse().ok()?;
    let (hms, frac) = match time.split_once('.') {
        Some((a, b)) => (a, b),
        None => (time, ""),
    };
    let mut t = hms.splitn(3, ':');
    let hh: u64 = t.next()?.parse().ok()?;
    let mm: u64 = t.next()?.parse().ok()?;
    let ss: u64 = t.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let nanos: u64 = if frac.is_empty() {
        0
    } else {
        if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        format!("{frac:0<9}").parse().ok()?
    };
    let days = days_from_civil(y, m, day);
    let secs = u64::try_from(days * 86_400).ok()? + hh * 3600 + mm * 60 + ss;
    Some(secs * 1_000_000_000 + nanos)
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
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

    #[test]
    fn times_round_trip() {
        for ns in [0, 1, 1_733_355_000_123_456_789, 951_782_400_000_000_007] {
            assert_eq!(parse_rfc3339_ns(&rfc3339_ns(ns)), Some(ns), "{ns}");
        }
        assert_eq!(rfc3339_ns(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            parse_rfc3339_ns("2000-02-29T12:00:00.5Z"),
            Some(951_825_600_500_000_000)
        );
        assert_eq!(parse_rfc3339_ns("2000-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339_ns("yesterday"), None);
    }

    #[test]
    fn options_as_docker_words_them() {
        let mut o = LogOptions::default();
        o.set("max-size=2m").unwrap();
        o.set("max-file=5").unwrap();
        assert_eq!(
            o,
            LogOptions {
                max_size: 2_000_000,
                max_file: 5
            }
        );
        o.set("max-size=512k").unwrap();
        assert_eq!(o.max_size, 512_000);
        assert!(o.set("max-file=0").unwrap_err().contains("less than 1"));
        assert!(o.set("max-size=lots").unwrap_err().contains("invalid size"));
        assert!(o
            .set("mode=non-blocking")
            .unwrap_err()
            .contains("unknown log opt"));
        assert!(o.set("max-size").is_err());
    }

    #[test]
    fn lines_are_split_stamped_and_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let opts = LogOptions {
            max_size: 400,
            max_file: 3,
        };
        let w = Arc::new(Mutex::new(Writer::open(dir.path(), opts).unwrap()));
        let input = b"one\ntwo\n\nthree without newline".to_vec();
        copy(&input[..], Stream::Stdout, &w);
        copy(&b"err\n"[..], Stream::Stderr, &w);
        let r = read(dir.path(), None, None).unwrap();
        let texts: Vec<&str> = r.iter().map(|r| r.text.as_str()).collect();
        assert_eq!(texts, ["one", "two", "", "three without newline", "err"]);
        assert_eq!(r[4].stream, Stream::Stderr);
        assert!(r.windows(2).all(|p| p[0].time_ns < p[1].time_ns));
        // After a time: exclusive; tail: the last ones.
        let after = read(dir.path(), Some(r[1].time_ns), None).unwrap();
        assert_eq!(after.len(), 3);
        assert_eq!(read(dir.path(), None, Some(2)).unwrap(), r[3..].to_vec());
        // Many lines: at most 3 files of about 400 bytes, the newest lines kept in order.
        for i in 0..100 {
            w.lock()
                .unwrap()
                .write(Stream::Stdout, format!("line {i}").as_bytes())
                .unwrap();
        }
        let files = fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 3);
        let r = read(dir.path(), None, None).unwrap();
        assert_eq!(r.last().unwrap().text, "line 99");
        assert!(r.len() < 20, "{} records kept", r.len());
        assert!(r.windows(2).all(|p| p[0].time_ns < p[1].time_ns));
        // Across files: the same lines whatever the cursor or tail, read newest file first.
        for k in 0..r.len() {
            assert_eq!(
                read(dir.path(), Some(r[k].time_ns), None).unwrap(),
                r[k + 1..]
            );
            assert_eq!(read(dir.path(), None, Some(k)).unwrap(), r[r.len() - k..]);
        }
        // A long line is cut in records of MAX_LINE.
        let long = vec![b'x'; MAX_LINE * 2 + 10];
        let dir2 = tempfile::tempdir().unwrap();
        let w2 = Arc::new(Mutex::new(
            Writer::open(dir2.path(), LogOptions::default()).unwrap(),
        ));
        copy(&long[..], Stream::Stdout, &w2);
        let r = read(dir2.path(), None, None).unwrap();
        let lens: Vec<usize> = r.iter().map(|r| r.text.len()).collect();
        assert_eq!(lens, [MAX_LINE, MAX_LINE, 10]);
    }
}
