//! `meshd --metrics-addr IP:PORT`: the node's Prometheus metrics on `GET /metrics`, in the
//! OpenMetrics text format (`application/openmetrics-text; version=1.0.0`), over plain
//! HTTP/1.1 (hyper); any other path is a 404. Off unless the flag is given.
//!
//! One [`Registry`] (prefix `mesh`) holds what each part registers once: the control plane's
//! live instruments (`mesh_manager::metrics::Metrics`), the embedded DNS's
//! (`mesh_dns::metrics`), the data plane's ([`PlaneMetrics`], and a collector reading the
//! balancer's VIPs and the gossip node's counters, `mesh_gossip::metrics`, at scrape time)
//! and the image pulls' ([`PullMetrics`]). A scrape also asks the daemon for its
//! `mesh_manager::metrics::Snapshot` (Raft figures on a manager, the cluster's figures on
//! the leader), computed then from its store: nothing is kept in sync for it.
//!
//! The names follow Prometheus' conventions (`mesh_` prefix, `_total` counters, base units
//! in `_seconds` and `_bytes`); the list is in the README's "Metrics" section.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use mesh_manager::Daemon;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use tracing::debug;

/// The content type of a scrape's answer.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

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

/// What a scrape encodes.
pub struct Scraper {
    registry: Registry,
    daemon: Arc<Daemon>,
}

impl Scraper {
    /// `registry` holds everything registered once; the daemon gives the rest per scrape.
    pub fn new(mut registry: Registry, daemon: Arc<Daemon>) -> Scraper {
        daemon.metrics().register(&mut registry);
        registry.register(
            "build",
            "The running meshd",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        Scraper { registry, daemon }
    }

    /// The exposition text of everything, now.
    pub async fn render(&self) -> Result<String, std::fmt::Error> {
        let snapshot = self.daemon.metrics_snapshot().await;
        let mut now = Registry::with_prefix("mesh");
        now.register_collector(Box::new(snapshot));
        let mut out = String::with_capacity(32 << 10);
        encode_registry(&mut out, &self.registry)?;
        encode_registry(&mut out, &now)?;
        encode_eof(&mut out)?;
        Ok(out)
    }
}

/// Binds `addr` now (so a bad address fails the start) and serves scrapes on it.
pub fn serve(
    addr: SocketAddr,
    scraper: Arc<Scraper>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use anyhow::Context;
    let std_listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot listen on --metrics-addr {addr}"))?;
    std_listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(std_listener)?;
    Ok(tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    debug!("metrics: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let scraper = scraper.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let scraper = scraper.clone();
                    async move { Ok::<_, Infallible>(handle(&scraper, req).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    debug!("metrics connection: {e}");
                }
            });
        }
    }))
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn handle(scraper: &Scraper, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return text(StatusCode::NOT_FOUND, "404 page not found\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match scraper.render().await {
        Ok(body) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(CONTENT_TYPE),
            );
            r
        }
        Err(_) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding the metrics failed\n",
        ),
    }
}
