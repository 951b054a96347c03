//! Process helpers on top of `/proc`: start times (field 22 of
//! `/proc/<pid>/stat`) to defeat pid reuse, liveness, and signals.

use std::fs;

/// What `/proc/<pid>/stat` says about a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 3: `R`, `S`, `D`, `Z` (zombie), `X` (dead), ...
    pub state: char,
    /// Field 22: start time in clock ticks since boot.
    pub start_time: u64,
}

/// Parses the content of `/proc/<pid>/stat`. The command name (field 2) is
/// in parentheses and may contain spaces and parentheses, so fields are
/// counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // `rest` starts at field 3 (state); field 22 is 19 fields later.
    let state = fields.next()?.chars().next()?;
    let start_time = fields.nth(18)?.parse().ok()?;
    Some(ProcStat { state, start_time })
}

/// Reads `/proc/<pid>/stat`; `None` if the process does not exist.
pub fn stat(pid: u32) -> Option<ProcStat> {
    if pid == 0 {
        return None;
    }
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// True if `pid` is a live process (not a zombie) started at `start_time`.
pub fn is_alive(pid: u32, start_time: u64) -> bool {
    match stat(pid) {
        Some(s) => s.start_time == start_time && !matches!(s.state, 'Z' | 'X' | 'x'),
        None => false,
    }
}

/// Sends `sig` to `pid` if it is still the process started at `start_time`.
pub fn signal_checked(pid: u32, start_time: u64, sig: libc::c_int) {
    if is_alive(pid, start_time) {
        signal(pid, sig);
    }
}

/// Whether `pid` lives in a pid namespace other than the caller's (an image task's process,
/// pid 1 of its own namespace). `false` when either cannot be read.
pub fn in_other_pid_namespace(pid: u32) -> bool {
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/pid")).ok();
    match (ns(&pid.to_string()), ns("self")) {
        (Some(theirs), Some(ours)) => theirs != ours,
        _ => false,
    }
}

/// Sends `sig` to `pid` (never to pid 0, 1 or a process group).
pub fn signal(pid: u32, sig: libc::c_int) {
    let Ok(p) = libc::pid_t::try_from(pid) else {
        return;
    };
    if p <= 1 {
        return;
    }
    // SAFETY: plain syscall on a positive pid; failures (ESRCH) are ignored.
    unsafe { libc::kill(p, sig) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_shares_its_own_pid_namespace() {
        assert!(!in_other_pid_namespace(std::process::id()));
        // Unreadable (no such process): not taken for another namespace.
        assert!(!in_other_pid_namespace(u32::MAX));
    }

    #[test]
    fn parses_stat_with_odd_comm() {
        let line = "1234 (we ird) (x)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(ProcStat {
                state: 'S',
                start_time: 987654
            })
        );
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
    }

    #[test]
    fn own_process() {
        let me = std::process::id();
        let s = stat(me).expect("own stat");
        assert!(is_alive(me, s.start_time));
        assert!(!is_alive(me, s.start_time + 1));
        assert_eq!(stat(0), None);
    }
}
