//! Network management on the leader: `network create` (name, subnet and VNI allocation, with
//! clear errors for overlaps and duplicates), `ls`, `inspect`, and `rm` (refused while a
//! service or a task uses the network).

use std::collections::BTreeSet;

use mesh_api::{ApiError, ErrorKind, Network, NetworkSpec, NetworkSummary};
use serde_json::{json, Value};

use crate::ipam::{self, Cidr};
use crate::services::validate_name;
use crate::state::StoreState;

/// The routing-mesh network every swarm has.
pub fn ingress(now: u64) -> Network {
    let subnet = Cidr::parse("10.0.0.0/24").expect("valid literal");
    Network {
        id: mesh_ca::new_secret(),
        spec: NetworkSpec {
            name: "ingress".into(),
            driver: "overlay".into(),
            subnet: Some(subnet.to_string()),
            encrypted: false,
            attachable: false,
            ingress: true,
            labels: Default::default(),
        },
        subnet: subnet.to_string(),
        gateway: subnet.gateway(),
        vni: ipam::FIRST_VNI,
        created_at: now,
    }
}

/// Validates a spec and allocates its subnet and VNI.
pub fn new_network(state: &StoreState, spec: NetworkSpec, now: u64) -> Result<Network, ApiError> {
    validate_name(&spec.name)
        .map_err(|e| ApiError::invalid(e.message.replace("service name", "network name")))?;
    if spec.driver != "overlay" {
        return Err(ApiError::invalid(format!(
            "unsupported network driver: {} (only overlay)",
            spec.driver
        )));
    }
    if spec.ingress {
        return Err(ApiError::invalid(
            "only the swarm's own ingress network can be an ingress network",
        ));
    }
    if state.networks.values().any(|n| n.spec.name == spec.name) {
        return Err(ApiError::new(
            ErrorKind::AlreadyExists,
            format!("network with name {} already exists", spec.name),
        ));
    }
    let taken: Vec<Cidr> = state
        .networks
        .values()
        .filter_map(|n| Cidr::parse(&n.subnet).ok())
        .collect();
    let subnet = match &spec.subnet {
        Some(s) => {
            let c = Cidr::parse(s).map_err(ApiError::invalid)?;
            if let Some(o) = state
                .networks
                .values()
                .find(|n| Cidr::parse(&n.subnet).is_ok_and(|t| t.overlaps(&c)))
            {
                return Err(ApiError::invalid(format!(
                    "subnet {c} overlaps with network {} ({})",
                    o.spec.name, o.subnet
                )));
            }
            c
        }
        None => ipam::next_subnet(&taken).map_err(|e| ApiError::new(ErrorKind::Unavailable, e))?,
    };
    let used: BTreeSet<u32> = state.networks.values().map(|n| n.vni).collect();
    let vni = ipam::next_vni(&used).map_err(|e| ApiError::new(ErrorKind::Unavailable, e))?;
    Ok(Network {
        id: mesh_ca::new_secret(),
        spec: NetworkSpec {
            subnet: Some(subnet.to_string()),
            ..spec
        },
        subnet: subnet.to_string(),
        gateway: subnet.gateway(),
        vni,
        created_at: now,
    })
}

/// Refuses removal while a service or an unfinished task uses the network.
/// Whether a service lists the network (tasks still stopping aside).
pub fn used_by_service(state: &StoreState, n: &Network) -> bool {
    state.services.values().any(|s| {
        s.spec
            .networks
            .iter()
            .any(|x| *x == n.spec.name || *x == n.id)
    })
}

pub fn check_unused(state: &StoreState, n: &Network) -> Result<(), ApiError> {
    if let Some(svc) = state.services.values().find(|s| {
        s.spec
            .networks
            .iter()
            .any(|x| *x == n.spec.name || *x == n.id)
    }) {
        return Err(ApiError::invalid(format!(
            "network {} is in use by service {}",
            n.spec.name, svc.spec.name
        )));
    }
    if let Some(t) = state
        .tasks
        .values()
        .find(|t| !t.status.state.is_terminal() && t.networks.iter().any(|a| a.network_id == n.id))
    {
        return Err(ApiError::invalid(format!(
            "network {} is in use by task {}",
            n.spec.name,
            t.name()
        )));
    }
    Ok(())
}

pub fn ls(state: &StoreState, filters: &mesh_api::Filters) -> Vec<NetworkSummary> {
    let mut out: Vec<NetworkSummary> = state
        .networks
        .values()
        .filter(|n| mesh_api::filter::network(filters, n))
        .map(|n| NetworkSummary {
            id: n.id.clone(),
            name: n.spec.name.clone(),
            driver: n.spec.driver.clone(),
            scope: "swarm".into(),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// `network inspect`, in Docker's shape, with the tasks attached.
pub fn inspect(state: &StoreState, n: &Network) -> Value {
    let tasks: Vec<Value> = state
        .tasks
        .values()
        .filter(|t| !t.status.state.is_terminal())
        .filter_map(|t| {
            let a = t.networks.iter().find(|a| a.network_id == n.id)?;
            let node = state
                .nodes
                .get(&t.node_id)
                .map(|x| x.hostname.clone())
                .unwrap_or_default();
            Some(json!({ "Name": t.name(), "IPv4Address": a.addr, "Node": node }))
        })
        .collect();
    let mut options =
        json!({ "com.docker.network.driver.overlay.vxlanid_list": n.vni.to_string() });
    if n.spec.encrypted {
        options["encrypted"] = json!("");
    }
    json!({
        "Name": n.spec.name,
        "Id": n.id,
        "Created": n.created_at,
        "Scope": "swarm",
        "Driver": n.spec.driver,
        "IPAM": { "Driver": "default", "Config": [{ "Subnet": n.subnet, "Gateway": n.gateway }] },
        "Attachable": n.spec.attachable,
        "Ingress": n.spec.ingress,
        "Options": options,
        "Tasks": tasks,
    })
}

/// One virtual IP per network of a new service in VIP mode, proposed from `state` (the
/// state machine settles them when the service is created: [`crate::allocator`]).
pub fn allocate_vips(
    state: &StoreState,
    spec: &mesh_api::ServiceSpec,
) -> Result<Vec<mesh_api::VirtualIp>, ApiError> {
    for name in &spec.networks {
        state.find_network(name)?;
    }
    crate::allocator::propose_vips(state, spec)
        .map_err(|e| ApiError::new(ErrorKind::Unavailable, e))
}

/// A node's attachment to the ingress network (its ingress sandbox), once allocated.
pub fn ingress_attachment(
    state: &StoreState,
    node_id: &str,
) -> Option<mesh_api::NetworkAttachment> {
    let net = state.networks.values().find(|n| n.spec.ingress)?;
    let addr = state.nodes.get(node_id)?.ingress_addr?;
    Some(mesh_api::NetworkAttachment {
        network_id: net.id.clone(),
        network_name: net.spec.name.clone(),
        addr,
        vni: net.vni,
        gateway: net.gateway,
        vip: None,
        encrypted: false,
    })
}
