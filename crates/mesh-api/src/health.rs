//! The `--health-*` flags of `service create` and `service update`, and how they make or
//! change a service's [`HealthConfig`], as Docker's CLI does (`toHealthConfig` at create,
//! `updateHealthcheck` at update): the same conflicts, the same errors.

use serde::{Deserialize, Serialize};

use crate::service::HealthConfig;

/// `--health-*` and `--no-healthcheck` as given (`None`: the flag was not given).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthFlags {
    /// `--health-cmd` (run with `/bin/sh -c`); `Some("")` clears the test at update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_period_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u64>,
    /// `--no-healthcheck`: no check, not even the image's (`["NONE"]`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub none: bool,
}

/// Docker's error for `--no-healthcheck` given with a `--health-*` option.
pub const HEALTH_CONFLICT: &str = "--no-healthcheck conflicts with --health-* options";

impl HealthFlags {
    /// Whether any `--health-*` option was given (`--no-healthcheck` aside).
    pub fn any_option(&self) -> bool {
        self.cmd.is_some()
            || self.interval_ms.is_some()
            || self.timeout_ms.is_some()
            || self.start_period_ms.is_some()
            || self.retries.is_some()
    }

    /// Whether no flag was given at all.
    pub fn is_empty(&self) -> bool {
        !self.none && !self.any_option()
    }

    /// The check of a new service (`service create`): `None` when no flag was given (the
    /// image's HEALTHCHECK then applies).
    pub fn to_config(&self) -> Result<Option<HealthConfig>, String> {
        if self.none {
            if self.any_option() {
                return Err(HEALTH_CONFLICT.into());
            }
            return Ok(Some(none()));
        }
        // As Docker: an empty `--health-cmd` and zero values count as not given.
        let given = self.cmd.as_deref().is_some_and(|c| !c.is_empty())
            || self.interval_ms.is_some()
            || self.timeout_ms.is_some()
            || self.start_period_ms.is_some()
            || self.retries.is_some_and(|r| r != 0);
        if !given {
            return Ok(None);
        }
        Ok(Some(HealthConfig {
            test: match self.cmd.as_deref() {
                Some(c) if !c.is_empty() => vec!["CMD-SHELL".into(), c.into()],
                _ => Vec::new(),
            },
            interval_ms: self.interval_ms.unwrap_or(0),
            timeout_ms: self.timeout_ms.unwrap_or(0),
            start_period_ms: self.start_period_ms.unwrap_or(0),
            retries: self.retries.unwrap_or(0),
        }))
    }

    /// Applies the flags of `service update` to a service's check.
    pub fn apply(&self, check: &mut Option<HealthConfig>) -> Result<(), String> {
        if self.is_empty() {
            return Ok(());
        }
        if self.none {
            if self.any_option() {
                return Err(HEALTH_CONFLICT.into());
            }
            *check = Some(none());
            return Ok(());
        }
        let c = check.get_or_insert_with(HealthConfig::default);
        if c.test.first().is_some_and(|t| t == "NONE") {
            c.test.clear();
        }
        if let Some(v) = self.interval_ms {
            c.interval_ms = v;
        }
        if let Some(v) = self.timeout_ms {
            c.timeout_ms = v;
        }
        if let Some(v) = self.start_period_ms {
            c.start_period_ms = v;
        }
        if let Some(v) = self.retries {
            c.retries = v;
        }
        if let Some(cmd) = &self.cmd {
            c.test = if cmd.is_empty() {
                Vec::new()
            } else {
                vec!["CMD-SHELL".into(), cmd.clone()]
            };
        }
        Ok(())
    }
}

fn none() -> HealthConfig {
    HealthConfig {
        test: vec!["NONE".into()],
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_makes_docker_s_configs() {
        assert_eq!(HealthFlags::default().to_config(), Ok(None));
        let f = HealthFlags {
            cmd: Some("test -f /ok".into()),
            interval_ms: Some(500),
            retries: Some(2),
            ..Default::default()
        };
        let c = f.to_config().unwrap().unwrap();
        assert_eq!(c.test, ["CMD-SHELL", "test -f /ok"]);
        assert_eq!((c.interval_ms, c.timeout_ms, c.retries), (500, 0, 2));
        // Only a timing: the image's test stays.
        let f = HealthFlags {
            timeout_ms: Some(1000),
            ..Default::default()
        };
        assert!(f.to_config().unwrap().unwrap().test.is_empty());
        let none = HealthFlags {
            none: true,
            ..Default::default()
        };
        assert_eq!(none.to_config().unwrap().unwrap().test, ["NONE"]);
        let both = HealthFlags {
            none: true,
            retries: Some(1),
            ..Default::default()
        };
        assert_eq!(both.to_config().unwrap_err(), HEALTH_CONFLICT);
    }

    #[test]
    fn update_changes_what_is_given() {
        let mut c = Some(HealthConfig {
            test: vec!["CMD-SHELL".into(), "true".into()],
            interval_ms: 1000,
            retries: 5,
            ..Default::default()
        });
        HealthFlags::default().apply(&mut c).unwrap();
        assert_eq!(c.as_ref().unwrap().interval_ms, 1000);
        let f = HealthFlags {
            interval_ms: Some(2000),
            ..Default::default()
        };
        f.apply(&mut c).unwrap();
        let got = c.clone().unwrap();
        assert_eq!((got.test.len(), got.interval_ms, got.retries), (2, 2000, 5));
        let none = HealthFlags {
            none: true,
            ..Default::default()
        };
        none.apply(&mut c).unwrap();
        assert_eq!(c.as_ref().unwrap().test, ["NONE"]);
        // A health option after --no-healthcheck drops the NONE.
        let f = HealthFlags {
            retries: Some(1),
            ..Default::default()
        };
        f.apply(&mut c).unwrap();
        assert!(c.as_ref().unwrap().test.is_empty());
        let f = HealthFlags {
            cmd: Some("exit 0".into()),
            ..Default::default()
        };
        f.apply(&mut c).unwrap();
        assert_eq!(c.as_ref().unwrap().test, ["CMD-SHELL", "exit 0"]);
        let both = HealthFlags {
            none: true,
            cmd: Some("x".into()),
            ..Default::default()
        };
        assert_eq!(both.apply(&mut c).unwrap_err(), HEALTH_CONFLICT);
        // No check yet: one is made.
        let mut c = None;
        f.apply(&mut c).unwrap();
        assert_eq!(c.unwrap().test, ["CMD-SHELL", "exit 0"]);
    }
}
