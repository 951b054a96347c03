//! The node agent's live instruments: the data plane's ([`PlaneMetrics`], updated by
//! `plane`) and the image pulls' ([`PullMetrics`], updated by `images`). `meshd` registers
//! them in its Prometheus registry and serves it.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// The data plane's live instruments (`plane.rs` updates them).
#[derive(Clone, Debug)]
pub struct PlaneMetrics {
    /// Reconcile passes (gossip changes, the periodic pass, task starts, running-set changes).
    pub reconcile: Counter,
    /// Passes that ended in an error.
    pub reconcile_errors: Counter,
    pub reconcile_duration: Histogram,
    /// Changes of a VIP's backends given to the balancer.
    pub lb_updates: Counter,
    /// Balancer writes that failed.
    pub lb_update_errors: Counter,
    /// Time to program one change: a VIP's maps (eBPF), a task namespace's table (nftables).
    pub lb_update_duration: Histogram,
    /// Published ports the routing mesh holds, and their backends, as of the last pass.
    pub ingress_ports: Gauge,
    pub ingress_backends: Gauge,
}

impl Default for PlaneMetrics {
    fn default() -> Self {
        PlaneMetrics {
            reconcile: Counter::default(),
            reconcile_errors: Counter::default(),
            // 1 ms to ~16 s.
            reconcile_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            lb_updates: Counter::default(),
            lb_update_errors: Counter::default(),
            // 10 us to ~2.6 s.
            lb_update_duration: Histogram::new(exponential_buckets(0.00001, 2.0, 19)),
            ingress_ports: Gauge::default(),
            ingress_backends: Gauge::default(),
        }
    }
}

impl PlaneMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "plane_reconcile",
            "Data-plane reconcile passes",
            self.reconcile.clone(),
        );
        r.register(
            "plane_reconcile_errors",
            "Data-plane reconcile passes that failed",
            self.reconcile_errors.clone(),
        );
        r.register_with_unit(
            "plane_reconcile_duration",
            "Time of one data-plane reconcile pass",
            Unit::Seconds,
            self.reconcile_duration.clone(),
        );
        r.register(
            "lb_updates",
            "Changes of a VIP's backends given to the balancer",
            self.lb_updates.clone(),
        );
        r.register(
            "lb_update_errors",
            "Balancer writes that failed",
            self.lb_update_errors.clone(),
        );
        r.register_with_unit(
            "lb_update_duration",
            "Time to program one balancer change (a VIP's eBPF maps, or a task's nftables table)",
            Unit::Seconds,
            self.lb_update_duration.clone(),
        );
        r.register(
            "ingress_ports",
            "Published ports the routing mesh holds on this node",
            self.ingress_ports.clone(),
        );
        r.register(
            "ingress_backends",
            "Backends of the routing mesh's published ports on this node",
            self.ingress_backends.clone(),
        );
    }
}

/// Image pulls through the agent's `Images` seam (tasks' pulls and `mesh image pull`).
#[derive(Clone, Debug)]
pub struct PullMetrics {
    /// By result: `success`, `failure`, `local` (the pull failed, the stored image ran).
    pub pulls: Family<[(&'static str, &'static str); 1], Counter>,
    pub duration: Histogram,
}

impl Default for PullMetrics {
    fn default() -> Self {
        PullMetrics {
            pulls: Family::default(),
            // 10 ms to ~5.5 min.
            duration: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
        }
    }
}

impl PullMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "image_pulls",
            "Image pulls by result: success, failure, local (failed; the stored image was used)",
            self.pulls.clone(),
        );
        r.register_with_unit(
            "image_pull_duration",
            "Time of an image pull (a pull of an image already stored is quick)",
            Unit::Seconds,
            self.duration.clone(),
        );
    }

    pub fn count(&self, result: &'static str, secs: f64) {
        self.duration.observe(secs);
        self.pulls.get_or_create(&[("result", result)]).inc();
    }
}
