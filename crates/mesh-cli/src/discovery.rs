//! `mesh vip ls` and `mesh dns query`: what this node's data plane holds.

use clap::Subcommand;
use mesh_api::{DnsAnswer, Request, VipEntry};

use crate::client::Client;
use crate::{table, Result};

#[derive(Subcommand, Debug)]
pub enum VipCmd {
    /// The service VIPs this node's balancer holds, with their backends.
    #[command(alias = "list")]
    Ls(crate::FormatArg),
}

#[derive(Subcommand, Debug)]
pub enum DnsCmd {
    /// What the embedded DNS on this node answers for NAME.
    Query {
        /// Only this network (default: every network with a task on this node).
        #[arg(long)]
        network: Option<String>,
        /// Record type.
        #[arg(long = "type", default_value = "A")]
        qtype: String,
        /// The name to look up.
        name: String,
    },
}

pub fn vip(c: &Client, cmd: VipCmd) -> Result<()> {
    let VipCmd::Ls(f) = cmd;
    let v = c.call(Request::VipLs)?;
    if f.is_json()? {
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    let entries: Vec<VipEntry> = serde_json::from_value(v)?;
    let rows = entries
        .into_iter()
        .map(|e| vec![e.service, e.vip, e.port, e.protocol, e.backends.join(",")])
        .collect();
    table::print(&["SERVICE", "VIP", "PORT", "PROTOCOL", "BACKENDS"], rows);
    Ok(())
}

pub fn dns(c: &Client, cmd: DnsCmd) -> Result<()> {
    let DnsCmd::Query {
        network,
        qtype,
        name,
    } = cmd;
    let a: DnsAnswer = serde_json::from_value(c.call(Request::DnsQuery {
        network,
        name,
        qtype,
    })?)?;
    let forwarded = if a.forwarded { " (forwarded)" } else { "" };
    println!("{} {} {}{forwarded}", a.name, a.qtype, a.rcode);
    for answer in a.answers {
        println!("{answer}");
    }
    Ok(())
}
