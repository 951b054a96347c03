//! Embedded DNS for mesh: ONE resolver engine in meshd answering on `127.0.0.11:53` (UDP and
//! TCP) inside every task's network namespace, as Docker's embedded DNS does, but with a
//! socket pair per namespace served by shared tokio tasks rather than anything per task.
//!
//! meshd binds the sockets inside each task's namespace ([`bind_in_netns`]), hands them to
//! [`Dns::register`] with the task's networks, and keeps the record set current from the
//! gossip tables with [`Dns::update`] (patches on [`Records`]; queries see atomic
//! snapshots). Inside a task:
//!
//! - `SERVICE` -> its VIP on the task's networks (dnsrr: the task IPs, shuffled);
//! - `tasks.SERVICE` -> the running tasks' IPs, shuffled per answer;
//! - a task's full name (`web.1.<id>`) and hostname -> its IP;
//! - `SERVICE.NETWORK`, `tasks.SERVICE.NETWORK` -> the same, on that network only;
//! - PTR of task IPs -> the task's full name, of VIPs -> the service name;
//! - AAAA (and other types) of a cluster name -> NOERROR without records;
//! - anything else -> the host's upstream resolvers ([`forward`]), SERVFAIL when none
//!   answers in time.
//!
//! Low TTLs keep clients from holding on to dead tasks; see [`resolve`] for the choices.
//!
//! ```no_run
//! # async fn demo() -> Result<(), mesh_dns::DnsError> {
//! use mesh_dns::{bind_in_netns, Dns, ResolvConf, TaskRecord};
//! let host = ResolvConf::read_host().unwrap_or_default();
//! let dns = Dns::new(host.nameservers);
//! dns.update(|r| {
//!     r.upsert_service("netid1", "web", Some("10.0.1.2".parse().unwrap()), false);
//!     r.upsert_task("netid1", "web", TaskRecord::new("web.1.x1y2", "x1y2", "10.0.1.5".parse().unwrap()));
//! });
//! let (udp, tcp) = bind_in_netns(std::path::Path::new("/proc/1234/ns/net"))?;
//! let _serving = dns.register("x1y2", vec![("netid1".into(), "appnet".into())], udp, tcp)?;
//! let answer = dns.query(&[("netid1".into(), "appnet".into())], "tasks.web", "A").await?;
//! println!("{answer}");
//! # Ok(()) }
//! ```
//!
//! Modules: [`records`] (the data), [`resolve`] (what a name means, TTLs), [`forward`]
//! (upstreams), [`server`] (the engine and its sockets), [`metrics`] (its Prometheus
//! metrics), [`netns`] (binding inside a namespace), [`resolv_conf`] (reading the host's
//! resolvers).

pub mod error;
pub mod forward;
pub mod metrics;
pub mod netns;
pub mod records;
pub mod resolv_conf;
pub mod resolve;
pub mod server;

pub use error::DnsError;
pub use forward::ForwardConfig;
pub use netns::{bind_in_netns, bind_in_netns_at, DNS_ADDR};
pub use records::{Records, ServiceRecord, TaskRecord};
pub use resolv_conf::ResolvConf;
pub use resolve::Ttls;
pub use server::{Answer, AnswerRecord, Config, Dns, Registration, Stats};
