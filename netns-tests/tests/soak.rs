//! The short churn soak of the test suite: the seeded schedule of `mesh_netns::soak` for 40 s
//! on each VIP backend, with fixed seeds, on a 5-host cluster; every invariant must hold
//! (`cargo xtask soak` runs the long version).

use std::time::Duration;

use anyhow::{ensure, Result};
use mesh_netns::soak::{run, SoakOpts};

/// Seeds chosen to draw every kind of operation within the run (see the report's counts).
const RUNS: [(u64, &str); 2] = [(20261203, "nftables"), (5, "ebpf")];

#[test]
fn short_soak_on_both_backends_breaks_no_invariant() -> Result<()> {
    if !mesh_netns::require_root()? {
        return Ok(());
    }
    let mut broken = Vec::new();
    for (seed, lb_backend) in RUNS {
        let report = run(&SoakOpts {
            duration: Duration::from_secs(40),
            seed,
            lb_backend: lb_backend.to_string(),
            name_hint: "soak",
        })?;
        eprint!("{}", report.render());
        ensure!(
            report.calls_ok > 1000 && report.ingress_ok > 500,
            "too few calls to mean anything: {} by name, {} through the routing mesh",
            report.calls_ok,
            report.ingress_ok
        );
        broken.extend(
            report
                .violations()
                .into_iter()
                .map(|v| format!("seed {seed} {lb_backend}: {v}")),
        );
    }
    ensure!(broken.is_empty(), "{}", broken.join("\n"));
    Ok(())
}
