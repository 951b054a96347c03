//! Task health checks, as Docker's (`daemon/health.go`) and swarmkit's container executor:
//! the pure part. [`resolve`] merges a service's check with its image's HEALTHCHECK into the
//! [`Probe`] to run (or none), and [`Monitor`] is the state machine fed with probe results.
//! The agent does the I/O: it runs the probe in the task every interval, with its timeout,
//! and acts on the transitions [`Monitor::record`] returns.
//!
//! A task with a check is *starting* until a probe passes (then *healthy*); failures during
//! the start period do not count while it is starting; `retries` consecutive failures make it
//! *unhealthy*, and a pass resets the count. Like swarmkit, the agent reports such a task
//! Starting until healthy, then Running, and makes it a backend of its VIP, DNS names and the
//! routing mesh only while healthy; an unhealthy task is withdrawn at once, stopped, and
//! reported Failed with [`UNHEALTHY_ERR`].

use mesh_api::HealthConfig;

/// Docker's default probe interval and timeout.
pub const DEFAULT_INTERVAL_MS: u64 = 30_000;
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;
/// Docker's default number of consecutive failures that make a task unhealthy.
pub const DEFAULT_RETRIES: u64 = 3;
/// The error of a task stopped because it became unhealthy (swarmkit's, through Docker).
pub const UNHEALTHY_ERR: &str = "task: non-zero exit (137): dockerexec: unhealthy container";
/// The exit code reported with it.
pub const UNHEALTHY_EXIT: i32 = 137;

/// A check to run: the command line and Docker's timings, defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub argv: Vec<String>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub start_period_ms: u64,
    pub retries: u64,
}

/// The probe of a task: the service's check (`spec`) over its image's (`image`), field by
/// field as Docker merges a container's config with its image's (an empty test and zero
/// values are taken from the image), then Docker's defaults. `None`: no check (none given,
/// `NONE`, or a test Docker would not run).
pub fn resolve(spec: Option<&HealthConfig>, image: Option<&HealthConfig>) -> Option<Probe> {
    let merged = match (spec, image) {
        (None, None) => return None,
        (Some(s), None) => s.clone(),
        (None, Some(i)) => i.clone(),
        (Some(s), Some(i)) => HealthConfig {
            test: if s.test.is_empty() {
                i.test.clone()
            } else {
                s.test.clone()
            },
            interval_ms: or(s.interval_ms, i.interval_ms),
            timeout_ms: or(s.timeout_ms, i.timeout_ms),
            start_period_ms: or(s.start_period_ms, i.start_period_ms),
            retries: or(s.retries, i.retries),
        },
    };
    let argv = match merged.test.first().map(String::as_str) {
        Some("CMD") if merged.test.len() >= 2 => merged.test[1..].to_vec(),
        Some("CMD-SHELL") if merged.test.len() == 2 => {
            vec!["/bin/sh".into(), "-c".into(), merged.test[1].clone()]
        }
        _ => return None,
    };
    Some(Probe {
        argv,
        interval_ms: or(merged.interval_ms, DEFAULT_INTERVAL_MS),
        timeout_ms: or(merged.timeout_ms, DEFAULT_TIMEOUT_MS),
        start_period_ms: merged.start_period_ms,
        retries: or(merged.retries, DEFAULT_RETRIES),
    })
}

fn or(v: u64, default: u64) -> u64 {
    if v == 0 {
        default
    } else {
        v
    }
}

/// A task's health, as Docker names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Starting,
    Healthy,
    Unhealthy,
}

/// The health of one task process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Monitor {
    pub probe: Probe,
    /// When the process started (the start period counts from there).
    pub started_at_ms: u64,
    pub status: Health,
    /// Consecutive failures counted.
    pub failing_streak: u64,
    /// When it last became healthy.
    pub healthy_since_ms: u64,
}

impl Monitor {
    /// A new process: starting.
    pub fn new(probe: Probe, started_at_ms: u64) -> Monitor {
        Monitor {
            probe,
            started_at_ms,
            status: Health::Starting,
            failing_streak: 0,
            healthy_since_ms: 0,
        }
    }

    /// A process a restarted daemon adopts, which the store already knew healthy (Running):
    /// it stays a backend unless its probes fail again.
    pub fn adopted_healthy(probe: Probe, started_at_ms: u64, now_ms: u64) -> Monitor {
        Monitor {
            status: Health::Healthy,
            healthy_since_ms: now_ms,
            ..Monitor::new(probe, started_at_ms)
        }
    }

    /// Takes the result of a probe that started at `at_ms`; returns the new status if it
    /// changed. Unhealthy is final (the task is stopped).
    pub fn record(&mut self, at_ms: u64, passed: bool) -> Option<Health> {
        if self.status == Health::Unhealthy {
            return None;
        }
        let before = self.status;
        if passed {
            self.failing_streak = 0;
            if self.status != Health::Healthy {
                self.healthy_since_ms = at_ms;
            }
            self.status = Health::Healthy;
        } else {
            let in_start_period = self.status == Health::Starting
                && at_ms.saturating_sub(self.started_at_ms) < self.probe.start_period_ms;
            if !in_start_period {
                self.failing_streak += 1;
                if self.failing_streak >= self.probe.retries {
                    self.status = Health::Unhealthy;
                }
            }
        }
        (self.status != before).then_some(self.status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hc(test: &[&str], interval_ms: u64, retries: u64) -> HealthConfig {
        HealthConfig {
            test: test.iter().map(|s| s.to_string()).collect(),
            interval_ms,
            retries,
            ..Default::default()
        }
    }

    #[test]
    fn checks_merge_as_docker_s() {
        assert_eq!(resolve(None, None), None);
        // The image's alone, with Docker's defaults.
        let image = HealthConfig {
            test: vec!["CMD-SHELL".into(), "curl -f localhost".into()],
            interval_ms: 5000,
            start_period_ms: 1000,
            ..Default::default()
        };
        let p = resolve(None, Some(&image)).unwrap();
        assert_eq!(p.argv, ["/bin/sh", "-c", "curl -f localhost"]);
        assert_eq!(
            (p.interval_ms, p.timeout_ms, p.start_period_ms, p.retries),
            (5000, DEFAULT_TIMEOUT_MS, 1000, DEFAULT_RETRIES)
        );
        // The service's timings over the image's test.
        let p = resolve(Some(&hc(&[], 200, 2)), Some(&image)).unwrap();
        assert_eq!(p.argv[2], "curl -f localhost");
        assert_eq!(
            (p.interval_ms, p.start_period_ms, p.retries),
            (200, 1000, 2)
        );
        // The service's test over the image's, exec form.
        let p = resolve(Some(&hc(&["CMD", "test", "-f", "/ok"], 0, 0)), Some(&image)).unwrap();
        assert_eq!(p.argv, ["test", "-f", "/ok"]);
        assert_eq!(p.interval_ms, 5000);
        // NONE turns the image's off; an empty test without an image's is no check.
        assert_eq!(resolve(Some(&hc(&["NONE"], 0, 0)), Some(&image)), None);
        assert_eq!(resolve(Some(&hc(&[], 100, 1)), None), None);
    }

    fn probe(start_period_ms: u64, retries: u64) -> Probe {
        Probe {
            argv: vec!["true".into()],
            interval_ms: 100,
            timeout_ms: 100,
            start_period_ms,
            retries,
        }
    }

    #[test]
    fn a_pass_makes_a_starting_task_healthy() {
        let mut m = Monitor::new(probe(0, 3), 1000);
        assert_eq!(m.record(1100, false), None);
        assert_eq!(m.failing_streak, 1);
        assert_eq!(m.record(1200, true), Some(Health::Healthy));
        assert_eq!((m.failing_streak, m.healthy_since_ms), (0, 1200));
        assert_eq!(m.record(1300, true), None);
        assert_eq!(m.healthy_since_ms, 1200);
    }

    #[test]
    fn retries_consecutive_failures_make_it_unhealthy() {
        let mut m = Monitor::new(probe(0, 3), 0);
        m.record(100, true);
        assert_eq!(m.record(200, false), None);
        assert_eq!(m.record(300, false), None);
        // A pass in between resets the streak.
        assert_eq!(m.record(400, true), None);
        assert_eq!(m.record(500, false), None);
        assert_eq!(m.record(600, false), None);
        assert_eq!(m.record(700, false), Some(Health::Unhealthy));
        // Final.
        assert_eq!(m.record(800, true), None);
        assert_eq!(m.status, Health::Unhealthy);
    }

    #[test]
    fn a_task_that_never_passes_turns_unhealthy_after_its_start_period() {
        let mut m = Monitor::new(probe(1000, 2), 0);
        for at in [100, 400, 700, 999] {
            assert_eq!(m.record(at, false), None, "in the start period");
        }
        assert_eq!(m.failing_streak, 0);
        assert_eq!(m.record(1000, false), None);
        assert_eq!(m.record(1300, false), Some(Health::Unhealthy));
    }

    #[test]
    fn the_start_period_does_not_shield_a_healthy_task() {
        let mut m = Monitor::new(probe(10_000, 1), 0);
        m.record(100, true);
        assert_eq!(m.record(200, false), Some(Health::Unhealthy));
    }

    #[test]
    fn an_adopted_healthy_task_stays_healthy_until_its_probes_fail() {
        let mut m = Monitor::adopted_healthy(probe(0, 2), 0, 5000);
        assert_eq!(m.status, Health::Healthy);
        assert_eq!(m.record(5100, true), None);
        assert_eq!(m.record(5200, false), None);
        assert_eq!(m.record(5300, false), Some(Health::Unhealthy));
    }
}
