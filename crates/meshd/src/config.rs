//! `meshd`'s configuration file (`--config-file`, default `/etc/mesh/daemon.json`), Docker's
//! `daemon.json` idea: a JSON object whose keys are meshd's flags (`"metrics-addr"`,
//! `"lb-backend"`, ...), with Docker's plural keys for the repeatable ones
//! (`"insecure-registries"`, `"registry-mirrors"`, `"log-opts"` as an object) and Docker's
//! `"data-root"` for `--data-dir`. A flag given on the command line wins over the file. A key
//! that is no flag, or a value of the wrong kind, stops the daemon with Docker's wording.
//!
//! The file becomes command-line arguments placed before the real ones, so clap checks its
//! values exactly as it checks flags.

use std::ffi::OsString;
use std::path::Path;

use clap::parser::ValueSource;
use clap::{ArgAction, Command};
use serde_json::Value;

/// Where meshd looks for its configuration when `--config-file` is not given.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/mesh/daemon.json";

/// Docker's `daemon.json` names of meshd's flags where they differ from the flag.
const ALIASES: &[(&str, &str)] = &[
    ("insecure-registries", "insecure-registry"),
    ("registry-mirrors", "registry-mirror"),
    ("log-opts", "log-opt"),
    ("data-root", "data-dir"),
];

/// `argv` with the configuration file's settings inserted before the command line's own
/// (those the command line sets are left out). `cmd` is meshd's command; the file is
/// `--config-file`'s, or [`DEFAULT_CONFIG_FILE`] if that exists.
pub fn merge(cmd: Command, argv: Vec<OsString>) -> Result<Vec<OsString>, String> {
    // What the command line sets (a parse error is left for the real parse to report).
    let Ok(m) = cmd
        .clone()
        .ignore_errors(true)
        .try_get_matches_from(argv.clone())
    else {
        return Ok(argv);
    };
    let given = |id: &str| m.value_source(id) == Some(ValueSource::CommandLine);
    let (path, explicit) = match m.get_one::<std::path::PathBuf>("config_file") {
        Some(p) if given("config_file") => (p.clone(), true),
        _ => (Path::new(DEFAULT_CONFIG_FILE).to_path_buf(), false),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => return Ok(argv),
        Err(e) => {
            return Err(format!(
                "unable to read the configuration file {}: {e}",
                path.display()
            ))
        }
    };
    let fail = |msg: String| {
        format!(
            "unable to configure meshd with file {}: {msg}",
            path.display()
        )
    };
    let from_file = file_args(&cmd, &text, &given).map_err(fail)?;
    let mut out = Vec::with_capacity(argv.len() + from_file.len());
    let mut it = argv.into_iter();
    out.extend(it.next());
    out.extend(from_file.into_iter().map(OsString::from));
    out.extend(it);
    Ok(out)
}

/// The arguments the file `text` stands for, leaving out the flags `given` says the command
/// line sets.
fn file_args(
    cmd: &Command,
    text: &str,
    given: &dyn Fn(&str) -> bool,
) -> Result<Vec<String>, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let Value::Object(map) = v else {
        return Err("the configuration is not a JSON object".into());
    };
    let mut unknown = Vec::new();
    let mut out = Vec::new();
    for (key, value) in &map {
        let long = ALIASES
            .iter()
            .find(|(alias, _)| alias == key)
            .map_or(key.as_str(), |(_, flag)| flag);
        let Some(arg) = cmd.get_arguments().find(|a| {
            a.get_long() == Some(long) && !a.is_hide_set() && a.get_id() != "config_file"
        }) else {
            unknown.push(key.clone());
            continue;
        };
        if given(arg.get_id().as_str()) {
            continue;
        }
        let flag = format!("--{long}");
        let scalar = |v: &Value| -> Result<String, String> {
            match v {
                Value::String(s) => Ok(s.clone()),
                Value::Number(n) => Ok(n.to_string()),
                Value::Bool(b) => Ok(b.to_string()),
                _ => Err(format!("invalid value for {key}: {v}")),
            }
        };
        match (arg.get_action(), value) {
            (ArgAction::SetTrue, Value::Bool(true)) => out.push(flag),
            (ArgAction::SetTrue, Value::Bool(false)) => {}
            (ArgAction::SetTrue, v) => return Err(format!("invalid value for {key}: {v}")),
            (ArgAction::Append, Value::Array(items)) => {
                for i in items {
                    out.push(flag.clone());
                    out.push(scalar(i)?);
                }
            }
            // `log-opts`: {"max-size": "10m", ...}, as Docker's.
            (ArgAction::Append, Value::Object(o)) => {
                for (k, v) in o {
                    out.push(flag.clone());
                    out.push(format!("{k}={}", scalar(v)?));
                }
            }
            (_, Value::Array(_) | Value::Object(_) | Value::Null) => {
                return Err(format!("invalid value for {key}: {value}"))
            }
            (_, v) => {
                out.push(flag);
                out.push(scalar(v)?);
            }
        }
    }
    if !unknown.is_empty() {
        return Err(format!(
            "the following directives don't match any configuration option: {}",
            unknown.join(", ")
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn cmd() -> Command {
        Command::new("meshd")
            .arg(
                Arg::new("config_file")
                    .long("config-file")
                    .value_parser(clap::value_parser!(std::path::PathBuf)),
            )
            .arg(Arg::new("metrics_addr").long("metrics-addr"))
            .arg(
                Arg::new("log_level")
                    .long("log-level")
                    .default_value("info"),
            )
            .arg(
                Arg::new("insecure_registries")
                    .long("insecure-registry")
                    .action(ArgAction::Append),
            )
            .arg(
                Arg::new("log_opts")
                    .long("log-opt")
                    .action(ArgAction::Append),
            )
            .arg(Arg::new("data_dir").long("data-dir"))
            .arg(Arg::new("debug").long("debug").action(ArgAction::SetTrue))
            .arg(Arg::new("secret").long("secret").hide(true))
    }

    fn args(text: &str, given: &[&str]) -> Result<Vec<String>, String> {
        file_args(&cmd(), text, &|id| given.contains(&id))
    }

    #[test]
    fn keys_become_flags_and_flags_win() {
        let a = args(
            r#"{"metrics-addr": "10.0.0.1:9323", "log-level": "debug",
                "insecure-registries": ["r:5000", "s:5000"], "log-opts": {"max-size": "1m"},
                "data-root": "/srv/mesh", "debug": true}"#,
            &["log_level"],
        )
        .unwrap();
        // In key order.
        assert_eq!(
            a,
            [
                "--data-dir",
                "/srv/mesh",
                "--debug",
                "--insecure-registry",
                "r:5000",
                "--insecure-registry",
                "s:5000",
                "--log-opt",
                "max-size=1m",
                "--metrics-addr",
                "10.0.0.1:9323",
            ]
        );
    }

    #[test]
    fn unknown_keys_and_wrong_kinds_are_refused() {
        let e = args(r#"{"bip": "10.0.0.1/24", "iptables": false}"#, &[]).unwrap_err();
        assert_eq!(
            e,
            "the following directives don't match any configuration option: bip, iptables"
        );
        assert!(args(r#"{"secret": "x"}"#, &[])
            .unwrap_err()
            .contains("secret"));
        assert!(args(r#"{"config-file": "x"}"#, &[])
            .unwrap_err()
            .contains("config-file"));
        assert!(args(r#"{"metrics-addr": ["a"]}"#, &[])
            .unwrap_err()
            .contains("invalid value for metrics-addr"));
        assert!(args(r#"{"debug": "yes"}"#, &[])
            .unwrap_err()
            .contains("invalid value for debug"));
        assert!(args("[1]", &[]).unwrap_err().contains("not a JSON object"));
        assert!(args("{", &[]).is_err());
    }

    #[test]
    fn the_file_goes_before_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("daemon.json");
        std::fs::write(
            &f,
            r#"{"metrics-addr": "10.0.0.1:9323", "log-level": "debug"}"#,
        )
        .unwrap();
        let argv: Vec<OsString> = [
            "meshd",
            "--config-file",
            f.to_str().unwrap(),
            "--log-level",
            "warn",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let out = merge(cmd(), argv).unwrap();
        let out: Vec<&str> = out.iter().map(|s| s.to_str().unwrap()).collect();
        assert_eq!(
            out,
            [
                "meshd",
                "--metrics-addr",
                "10.0.0.1:9323",
                "--config-file",
                f.to_str().unwrap(),
                "--log-level",
                "warn"
            ]
        );
        // An explicit file that is missing is an error; the default one may be absent.
        let argv: Vec<OsString> = ["meshd", "--config-file", "/nonexistent/daemon.json"]
            .iter()
            .map(OsString::from)
            .collect();
        assert!(merge(cmd(), argv)
            .unwrap_err()
            .contains("/nonexistent/daemon.json"));
    }
}
