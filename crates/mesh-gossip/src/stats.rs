//! Packet and sync counters.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// UDP packets received (all, including dropped ones).
    pub udp_in: u64,
    /// UDP packets sent.
    pub udp_out: u64,
    /// UDP bytes received.
    pub bytes_in: u64,
    /// UDP bytes sent.
    pub bytes_out: u64,
    /// Push-pull connections accepted.
    pub tcp_in: u64,
    /// Push-pull connections opened.
    pub tcp_out: u64,
    /// Packets or streams dropped as malformed (bad length, magic, kind or encoding).
    pub malformed: u64,
    /// Packets or streams dropped because they carry another cluster's key.
    pub foreign: u64,
    /// Push-pull exchanges merged (both directions).
    pub syncs: u64,
    /// Push-pull exchanges that failed (connect, timeout, bad stream).
    pub sync_failures: u64,
    /// Records received for a network this node does not have (dropped).
    pub out_of_scope: u64,
    /// Sealed packets or push-pull frames whose authentication tag did not verify (a
    /// flipped bit, a truncated packet, another key under a known ID): dropped.
    pub bad_tag: u64,
    /// Sealed packets or frames under a key ID this node does not hold (too old, not
    /// received yet, made up): dropped.
    pub unknown_key: u64,
    /// Plain packets or streams received while keys are required: dropped.
    pub unsealed: u64,
    /// Packets or push-pulls not sent because keys are required and none was given yet.
    pub no_key: u64,
    /// Other nodes alive (or suspect) in this node's view, as of the last membership
    /// change (kept by the runtime; the simulator leaves it 0).
    pub alive_peers: u64,
    /// Convergence lag of the table records received by broadcast: how many fell in each
    /// bucket of [`LAG_BOUNDS`] (not cumulative; the last one is above them all).
    pub lag_buckets: [u64; LAG_BUCKETS],
    /// Their lags added up, in milliseconds.
    pub lag_sum_ms: u64,
}

/// Upper bounds, in seconds, of the convergence-lag buckets (the last bucket, beyond them,
/// is `+Inf`).
pub const LAG_BOUNDS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// How many convergence-lag buckets there are.
pub const LAG_BUCKETS: usize = LAG_BOUNDS.len() + 1;

/// The live counters, shared between the core and the I/O tasks.
#[derive(Debug, Default)]
pub struct Counters {
    pub udp_in: AtomicU64,
    pub udp_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub tcp_in: AtomicU64,
    pub tcp_out: AtomicU64,
    pub malformed: AtomicU64,
    pub foreign: AtomicU64,
    pub syncs: AtomicU64,
    pub sync_failures: AtomicU64,
    pub out_of_scope: AtomicU64,
    pub bad_tag: AtomicU64,
    pub unknown_key: AtomicU64,
    pub unsealed: AtomicU64,
    pub no_key: AtomicU64,
    pub alive_peers: AtomicU64,
    pub lag_buckets: [AtomicU64; LAG_BUCKETS],
    pub lag_sum_ms: AtomicU64,
}

/// Adds `n` to a counter.
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    /// Counts one record's convergence lag.
    pub fn observe_lag(&self, lag_ms: u64) {
        let secs = lag_ms as f64 / 1000.0;
        let i = LAG_BOUNDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LAG_BOUNDS.len());
        add(&self.lag_buckets[i], 1);
        add(&self.lag_sum_ms, lag_ms);
    }

    /// A snapshot.
    pub fn snapshot(&self) -> Stats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            udp_in: g(&self.udp_in),
            udp_out: g(&self.udp_out),
            bytes_in: g(&self.bytes_in),
            bytes_out: g(&self.bytes_out),
            tcp_in: g(&self.tcp_in),
            tcp_out: g(&self.tcp_out),
            malformed: g(&self.malformed),
            foreign: g(&self.foreign),
            syncs: g(&self.syncs),
            sync_failures: g(&self.sync_failures),
            out_of_scope: g(&self.out_of_scope),
            bad_tag: g(&self.bad_tag),
            unknown_key: g(&self.unknown_key),
            unsealed: g(&self.unsealed),
            no_key: g(&self.no_key),
            alive_peers: g(&self.alive_peers),
            lag_buckets: std::array::from_fn(|i| g(&self.lag_buckets[i])),
            lag_sum_ms: g(&self.lag_sum_ms),
        }
    }
}
