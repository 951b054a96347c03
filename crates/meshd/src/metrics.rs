//! `meshd --metrics-addr IP:PORT`: the node's Prometheus metrics on `GET /metrics`, in the
//! OpenMetrics text format (`application/openmetrics-text; version=1.0.0`), over plain
//! HTTP/1.1 (hyper); any other path is a 404. Off unless the flag is given.
//!
//! One [`Registry`] (prefix `mesh`) holds what each part registers once: the control plane's
//! live instruments (`mesh_manager::metrics::Metrics`), the embedded DNS's
//! (`mesh_dns::metrics`), the data plane's (`mesh_agent::metrics::PlaneMetrics`, and a collector reading the
//! balancer's VIPs and the gossip node's counters, `mesh_gossip::metrics`, at scrape time)
//! and the image pulls' (`mesh_agent::metrics::PullMetrics`). A scrape also asks the daemon for its
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
use mesh_agent::Daemon;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tracing::debug;

/// The content type of a scrape's answer.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

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
