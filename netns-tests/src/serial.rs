//! A runner for kernel test binaries built with `harness = false` (tests that own global
//! kernel state such as cgroup attachments or a namespace lab, and so run one at a time):
//! command-line words filter by name, each test prints a libtest-style line that
//! `cargo xtask test` counts, and the process exits 1 if any failed.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

/// One serial test: `Err` carries the reason it failed.
pub type SerialTest = fn() -> Result<(), String>;

/// Runs `tests` in order (those whose name contains one of the non-flag arguments, or all),
/// catching panics, and exits with status 1 if one failed.
pub fn run_serial(tests: &[(&str, SerialTest)]) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let (mut passed, mut failed) = (0, 0);
    for (name, test) in tests {
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let t = Instant::now();
        let res =
            catch_unwind(AssertUnwindSafe(test)).unwrap_or_else(|_| Err("panicked".to_string()));
        match res {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok ({:?})", t.elapsed());
            }
            Err(e) => {
                failed += 1;
                println!("test {name} ... FAILED ({:?})\n    {e}", t.elapsed());
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}

/// What a serial test returns.
pub type TestResult = Result<(), String>;

/// `ensure!(cond, "fmt", args...)` for serial tests: returns `Err("file:line: message")`.
#[macro_export]
macro_rules! serial_ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!("{}:{}: {}", file!(), line!(), format!($($fmt)+)));
        }
    };
}

/// `Result<T, E: Display>` -> `Result<T, String>` with context, for serial tests.
pub trait Ctx<T> {
    fn ctx(self, what: &str) -> Result<T, String>;
}

impl<T, E: std::fmt::Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: &str) -> Result<T, String> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

impl<T> Ctx<T> for Option<T> {
    fn ctx(self, what: &str) -> Result<T, String> {
        self.ok_or_else(|| format!("{what}: none"))
    }
}
