//! Configuration and the timing derived from it (foca's SWIM settings, push-pull and
//! tombstone scaling with the cluster size).

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU8, NonZeroUsize};
use std::time::Duration;

use crate::error::GossipError;
use crate::wire::{HEADER_LEN, MAX_UDP};

/// Gossip settings. [`Config::new`] fills in the defaults.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's name, unique in the cluster (the swarm node ID).
    pub node_id: String,
    /// Local UDP and TCP address to bind (port 7946 by default; port 0 picks a free one).
    pub bind: SocketAddr,
    /// Address other nodes reach this one at. Port 0 means "the bound port".
    pub advertise: SocketAddr,
    /// Shared by all nodes of a cluster; packets carrying another cluster's key are dropped
    /// and counted as foreign. Not a secret: it keeps clusters apart, it does not
    /// authenticate.
    pub cluster_key: String,
    /// Anti-entropy: full exchange of shared tables with a random member this often
    /// (scaled up above 32 nodes, as memberlist does). libnetwork: 30 s.
    pub push_pull_interval: Duration,
    /// How long deletes are remembered (raised to 4 push-pull intervals if that is longer).
    /// A tombstone must outlive every copy of the value it deletes: eager push takes
    /// milliseconds, table gossip about a second, push-pull reaches everyone within an
    /// interval or two; and a node that misses updates for longer than failure detection
    /// (2 to 8 s) declares their owners down and drops their entries, so it cannot bring an
    /// old value back later. 60 s covers that with a wide margin. libnetwork keeps them
    /// 30 min because its only repair is a bulk sync every 30 s.
    pub tombstone_ttl: Duration,
    /// Table gossip round: queued updates go to `gossip_fanout` random members of their
    /// network this often.
    pub gossip_interval: Duration,
    /// Members per table gossip round.
    pub gossip_fanout: usize,
    /// SWIM probe period (foca `probe_period`).
    pub probe_period: Duration,
    /// Time to wait for a direct ack before asking others to probe (foca `probe_rtt`).
    pub probe_timeout: Duration,
    /// Suspicion lasts `suspicion_mult × max(1, log10(nodes)) × probe_period` before a
    /// suspect is declared down.
    pub suspicion_mult: u32,
    /// This run's generation; `None` takes the wall clock (microseconds), so a restarted
    /// node always comes back newer.
    pub generation: Option<u64>,
    /// The nodes this one is going to join ([`crate::Gossip::join`]), when it knows them at
    /// start. Until it has exchanged state with the cluster, a network it declares does not
    /// count as having no other member (it cannot know that yet), so networks declared
    /// before the join (a restarted node re-announcing what runs on it) stay unsynced until
    /// a member's tables arrive. Empty: a node given nobody to join is alone until it joins.
    pub seeds: Vec<SocketAddr>,
    /// Seal every packet and push-pull frame with the cluster keys ([`crate::seal`]) and
    /// accept only sealed ones. The keys come later ([`crate::Gossip::set_keys`]): until
    /// then the node sends and accepts nothing (a join fails). Off by default (tests, the
    /// simulator).
    pub encrypt: bool,
}

/// The default gossip port (Docker Swarm's).
pub const DEFAULT_PORT: u16 = 7946;

impl Config {
    /// Defaults for node `node_id` bound to and advertising `addr`.
    pub fn new(
        node_id: impl Into<String>,
        addr: SocketAddr,
        cluster_key: impl Into<String>,
    ) -> Config {
        Config {
            node_id: node_id.into(),
            bind: addr,
            advertise: addr,
            cluster_key: cluster_key.into(),
            push_pull_interval: Duration::from_secs(5),
            tombstone_ttl: Duration::from_secs(60),
            gossip_interval: Duration::from_millis(200),
            gossip_fanout: 3,
            probe_period: Duration::from_millis(500),
            probe_timeout: Duration::from_millis(200),
            suspicion_mult: 4,
            generation: None,
            seeds: Vec::new(),
            encrypt: false,
        }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), GossipError> {
        let bad = |m: &str| Err(GossipError::Config(m.to_string()));
        if self.node_id.is_empty() || self.node_id.len() > 255 {
            return bad("node_id must be 1 to 255 bytes");
        }
        if self.cluster_key.is_empty() {
            return bad("cluster_key must not be empty");
        }
        if self.push_pull_interval.is_zero() || self.gossip_interval.is_zero() {
            return bad("intervals must be positive");
        }
        if self.gossip_fanout == 0 {
            return bad("gossip_fanout must be at least 1");
        }
        if self.probe_timeout.is_zero() || self.probe_timeout >= self.probe_period {
            return bad("probe_timeout must be positive and shorter than probe_period");
        }
        if self.suspicion_mult == 0 {
            return bad("suspicion_mult must be at least 1");
        }
        Ok(())
    }

    /// foca's settings for a cluster of `nodes` (LAN, tuned for detection in seconds).
    pub(crate) fn foca(&self, nodes: usize) -> foca::Config {
        let n = u32::try_from(nodes.max(1)).unwrap_or(u32::MAX);
        let mut c = foca::Config::new_lan(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN));
        c.probe_period = self.probe_period;
        c.probe_rtt = self.probe_timeout;
        c.num_indirect_probes = NonZeroUsize::new(3).unwrap_or(NonZeroUsize::MIN);
        c.suspect_to_down_after = self.suspicion(nodes);
        c.max_packet_size = NonZeroUsize::new(MAX_UDP - HEADER_LEN).unwrap_or(NonZeroUsize::MIN);
        c.notify_down_members = true;
        c.max_transmissions = c
            .max_transmissions
            .max(NonZeroU8::new(8).unwrap_or(NonZeroU8::MIN));
        c.periodic_gossip = Some(foca::PeriodicParams {
            frequency: Duration::from_millis(200),
            num_members: NonZeroUsize::new(3).unwrap_or(NonZeroUsize::MIN),
        });
        c.periodic_announce = Some(foca::PeriodicParams {
            frequency: Duration::from_secs(10),
            num_members: NonZeroUsize::MIN,
        });
        c.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: Duration::from_secs(5),
            num_members: NonZeroUsize::new(2).unwrap_or(NonZeroUsize::MIN),
        });
        c
    }

    /// How long a suspect has to refute before it is declared down.
    pub(crate) fn suspicion(&self, nodes: usize) -> Duration {
        let scale = (nodes.max(1) as f64).log10().max(1.0);
        self.probe_period
            .mul_f64(f64::from(self.suspicion_mult) * scale)
    }

    /// The push-pull interval for a cluster of `nodes`: as configured up to 32 nodes, then
    /// multiplied by `ceil(log2(nodes / 32)) + 1` (memberlist's `pushPullScale`).
    pub(crate) fn push_pull_every(&self, nodes: usize) -> Duration {
        if nodes <= 32 {
            return self.push_pull_interval;
        }
        let m = ((nodes as f64).log2() - 32f64.log2()).ceil() as u32 + 1;
        self.push_pull_interval * m
    }

    /// Tombstone lifetime: the configured TTL, but never under 4 push-pull intervals.
    pub(crate) fn tombstone_ttl_for(&self, nodes: usize) -> Duration {
        self.tombstone_ttl.max(self.push_pull_every(nodes) * 4)
    }

    /// Table gossip rounds per update in a network of `members` nodes:
    /// `ceil(log10(members + 1)) + 1`.
    pub(crate) fn gossip_rounds(&self, members: usize) -> u32 {
        ((members as f64 + 1.0).log10().ceil() as u32).max(1) + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::new("n1", "127.0.0.1:7946".parse().unwrap(), "c")
    }

    #[test]
    fn defaults_validate_and_scale() {
        let c = cfg();
        c.validate().unwrap();
        assert_eq!(c.suspicion(5), Duration::from_secs(2));
        assert_eq!(c.suspicion(100), Duration::from_secs(4));
        assert_eq!(c.push_pull_every(5), Duration::from_secs(5));
        assert_eq!(c.push_pull_every(1000), Duration::from_secs(30));
        assert_eq!(c.tombstone_ttl_for(5), Duration::from_secs(60));
        assert_eq!(c.tombstone_ttl_for(1000), Duration::from_secs(120));
        assert_eq!(c.gossip_rounds(5), 2);
        assert_eq!(c.gossip_rounds(1000), 5);
        let f = c.foca(5);
        assert_eq!(f.max_packet_size.get(), MAX_UDP - HEADER_LEN);
    }

    #[test]
    fn bad_configs_are_refused() {
        let mut c = cfg();
        c.node_id.clear();
        assert!(c.validate().is_err());
        let mut c = cfg();
        c.probe_timeout = c.probe_period;
        assert!(c.validate().is_err());
        let mut c = cfg();
        c.cluster_key.clear();
        assert!(c.validate().is_err());
    }
}
