//! `meshd --config-file` (Docker's daemon.json idea) on the real kernel: the file's settings
//! apply (a metrics endpoint, task log options with Docker's `log-opts` object), a flag on
//! the command line wins over the file, and a file with a key that is no flag stops the
//! daemon with Docker's words.

use std::time::Duration;

use anyhow::{ensure, Result};
use mesh_netns::{require_root, wait_for, Cluster, ClusterOpts, Host};

/// Whether `http://ADDR/metrics` answers with mesh's metrics, asked inside `h`'s namespace.
fn metrics_answer(h: &Host, addr: &str) -> Result<bool> {
    let out = h.exec(&["curl", "-s", "-m", "2", &format!("http://{addr}/metrics")])?;
    Ok(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("mesh_build_info"))
}

#[test]
fn the_config_file_sets_what_flags_do_not() -> Result<()> {
    if !require_root()? {
        return Ok(());
    }
    let c = Cluster::new(ClusterOpts {
        hosts: 1,
        start_daemons: false,
        name_hint: "daemoncfg",
    })?;
    let h = c.host(1);
    let (from_file, from_flag) = (format!("{}:9323", h.addr()), format!("{}:9324", h.addr()));
    let file = c.base_dir().join("daemon.json");
    // `log-level` is also a flag the harness gives (debug): the flag wins.
    std::fs::write(
        &file,
        format!(
            r#"{{"metrics-addr": "{from_file}", "log-level": "error",
                "log-opts": {{"max-size": "1k", "max-file": "2"}}}}"#
        ),
    )?;
    let path = file.to_string_lossy().into_owned();
    h.start_daemon_with(&["--config-file", &path])?;
    ensure!(metrics_answer(h, &from_file)?, "no metrics on {from_file}");
    wait_for(
        "debug lines in the daemon's log",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || Ok(h.log_tail().contains("DEBUG").then_some(())),
    )?;

    // The command line's --metrics-addr wins over the file's.
    h.stop_daemon()?;
    h.start_daemon_with(&["--config-file", &path, "--metrics-addr", &from_flag])?;
    ensure!(metrics_answer(h, &from_flag)?, "no metrics on {from_flag}");
    ensure!(
        !metrics_answer(h, &from_file)?,
        "the file's {from_file} still answers"
    );
    h.stop_daemon()?;

    // Keys that are no flags, or a value of the wrong kind: the daemon does not start.
    for (text, want) in [
        (
            r#"{"bip": "10.0.0.1/24", "iptables": false}"#,
            "the following directives don't match any configuration option: bip, iptables",
        ),
        (
            r#"{"log-opts": {"max-size": "lots"}}"#,
            "invalid size: 'lots'",
        ),
        (
            r#"{"metrics-addr": 9323"#,
            "unable to configure meshd with file",
        ),
    ] {
        std::fs::write(&file, text)?;
        let e = h
            .start_daemon_with(&["--config-file", &path])
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        ensure!(e.contains(want), "{text}: {e:?}");
    }
    Ok(())
}
