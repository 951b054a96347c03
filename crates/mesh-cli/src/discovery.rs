//! `mesh vip ls` and `mesh dns query`: what this node's data plane holds.

use clap::Subcommand;
use mesh_api::Request;
use serde_json::Value;

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
    let s = |r: &Value, k: &str| r[k].as_str().unwrap_or("").to_string();
    let rows = v
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|r| {
            let backends: Vec<String> = r["Backends"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|b| b.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            vec![
                s(r, "Service"),
                s(r, "VIP"),
                s(r, "Port"),
                s(r, "Protocol"),
                backends.join(","),
            ]
        })
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
    let v = c.call(Request::DnsQuery {
        network,
        name,
        qtype,
    })?;
    let forwarded = if v["forwarded"].as_bool().unwrap_or(false) {
        " (forwarded)"
    } else {
        ""
    };
    println!(
        "{} {} {}{forwarded}",
        v["name"].as_str().unwrap_or(""),
        v["type"].as_str().unwrap_or(""),
        v["rcode"].as_str().unwrap_or("")
    );
    for a in v["answers"].as_array().cloned().unwrap_or_default() {
        println!("{}", a.as_str().unwrap_or(""));
    }
    Ok(())
}
