//! `mesh network create | ls | inspect | rm`.

use clap::Subcommand;
use mesh_api::{NetworkSpec, Request};
use serde_json::{json, Value};

use crate::client::Client;
use crate::{table, Failure, Format, Result};

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
        #[arg(long)]
        attachable: bool,
        name: String,
    },
    /// List networks.
    #[command(alias = "list")]
    Ls(crate::FormatArg),
    /// Show networks in detail (JSON).
    Inspect {
        #[arg(required = true)]
        networks: Vec<String>,
    },
    /// Remove networks.
    #[command(alias = "remove")]
    Rm {
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
            name,
        } => {
            if driver != "overlay" {
                return Err(Failure(format!(
                    "unsupported network driver: {driver} (only overlay)"
                )));
            }
            let spec = NetworkSpec {
                name,
                driver,
                subnet,
                attachable,
                ingress: false,
                labels: Default::default(),
            };
            let v = c.call(Request::NetworkCreate { spec })?;
            println!("{}", v["id"].as_str().unwrap_or(""));
        }
        NetworkCmd::Ls(f) => {
            let v = c.call(Request::NetworkLs)?;
            let rows = v.as_array().cloned().unwrap_or_default();
            let s = |r: &Value, k: &str| r[k].as_str().unwrap_or("").to_string();
            if f.format == Format::Json {
                let out: Vec<Value> = rows
                    .iter()
                    .map(|r| json!({"ID": s(r, "id"), "Name": s(r, "name"), "Driver": s(r, "driver"), "Scope": s(r, "scope")}))
                    .collect();
                println!("{}", serde_json::to_string(&out)?);
            } else {
                let rows = rows
                    .iter()
                    .map(|r| vec![s(r, "id"), s(r, "name"), s(r, "driver"), s(r, "scope")])
                    .collect();
                table::print(&["NETWORK ID", "NAME", "DRIVER", "SCOPE"], rows);
            }
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
