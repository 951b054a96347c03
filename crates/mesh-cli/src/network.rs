//! `mesh network create | ls | inspect | rm`.

use clap::Subcommand;
use mesh_api::{NetworkSpec, Request};
use serde_json::{json, Value};

use crate::client::Client;
use crate::{table, Failure, Result};

#[derive(Subcommand, Debug)]
pub enum NetworkCmd {
    /// Create an overlay network.
    Create {
        /// Driver (only `overlay`).
        #[arg(short = 'd', long, default_value = "overlay")]
        driver: String,
        /// Subnet in CIDR form (default: the next free /24 of 10.0.0.0/8).
        #[arg(long)]
        subnet: Option<String>,
        /// Enable manual container attachment.
        #[arg(long)]
        attachable: bool,
        /// Set metadata on a network (KEY[=VALUE]).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Set driver specific options (KEY[=VALUE]): `encrypted` encrypts the traffic
        /// between hosts.
        #[arg(short = 'o', long = "opt")]
        opts: Vec<String>,
        /// The network's name.
        name: String,
    },
    /// List networks.
    #[command(alias = "list")]
    Ls {
        #[command(flatten)]
        list: crate::ListArgs,
        /// Do not truncate the output.
        #[arg(long)]
        no_trunc: bool,
    },
    /// Show networks in detail (JSON).
    Inspect {
        /// Networks (ID or name).
        #[arg(required = true)]
        networks: Vec<String>,
    },
    /// Remove networks.
    #[command(alias = "remove")]
    Rm {
        /// Networks (ID or name).
        #[arg(required = true)]
        networks: Vec<String>,
    },
}

pub fn run(c: &Client, cmd: NetworkCmd) -> Result<()> {
    match cmd {
        NetworkCmd::Create {
            driver,
            subnet,
            attachable,
            labels,
            opts,
            name,
        } => {
            let encrypted = mesh_api::overlay_driver_options(
                opts.iter()
                    .map(|o| o.split_once('=').map_or(o.as_str(), |(k, _)| k)),
            )
            .map_err(Failure)?;
            if driver != "overlay" {
                return Err(Failure(format!(
                    "unsupported network driver: {driver} (only overlay)"
                )));
            }
            let spec = NetworkSpec {
                name,
                driver,
                subnet,
                encrypted,
                attachable,
                ingress: false,
                labels: crate::blob::parse_labels(&labels)?,
            };
            let a: mesh_api::IdAnswer = c.call_as(Request::NetworkCreate { spec })?;
            println!("{}", a.id);
        }
        NetworkCmd::Ls { list, no_trunc } => {
            let v = c.call(Request::NetworkLs {
                filters: list.filters()?,
            })?;
            let rows = v.as_array().cloned().unwrap_or_default();
            let s = |r: &Value, k: &str| r[k].as_str().unwrap_or("").to_string();
            // Docker shows 12 characters of an ID unless `--no-trunc` (JSON in full).
            let id = |r: &Value| {
                let id = s(r, "id");
                if no_trunc || list.format == crate::Format::Json {
                    id
                } else {
                    id.chars().take(12).collect()
                }
            };
            let out: Vec<crate::format::Row> = rows
                .iter()
                .map(|r| crate::row(json!({"ID": id(r), "Name": s(r, "name"), "Driver": s(r, "driver"), "Scope": s(r, "scope")})))
                .collect();
            crate::format::print(
                &list.format,
                list.quiet,
                crate::format::NETWORK,
                &out,
                &[("ID", "NETWORK ID")],
                || {
                    let rows = rows
                        .iter()
                        .map(|r| vec![id(r), s(r, "name"), s(r, "driver"), s(r, "scope")])
                        .collect();
                    table::print(&["NETWORK ID", "NAME", "DRIVER", "SCOPE"], rows);
                },
            )?;
        }
        NetworkCmd::Inspect { networks } => {
            let mut out = Vec::new();
            for n in networks {
                out.push(c.call(Request::NetworkInspect { network: n })?);
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        NetworkCmd::Rm { networks } => {
            for n in networks {
                c.call(Request::NetworkRm { network: n.clone() })?;
                println!("{n}");
            }
        }
    }
    Ok(())
}
