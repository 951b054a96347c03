//! openraft's network over the control port: each Raft RPC is a [`PeerRequest::Raft`] sent
//! with the node's mutual-TLS client.

use std::sync::Arc;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;

use crate::peer::{PeerRequest, PeerResponse, RaftRequest};
use crate::raft_types::{RaftId, TypeConfig};

/// Creates one connection per (target, purpose); openraft keeps a client per replication stream.
pub struct Network {
    pub tls: Arc<rustls::ClientConfig>,
}

pub struct Connection {
    target: RaftId,
    client: mesh_rpc::Client,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: RaftId, node: &BasicNode) -> Connection {
        Connection {
            target,
            client: mesh_rpc::Client::new(node.addr.clone(), self.tls.clone()),
        }
    }
}

type RpcErr<E = openraft::error::Infallible> = RPCError<RaftId, BasicNode, RaftError<RaftId, E>>;

impl Connection {
    async fn send<E>(&self, req: RaftRequest, option: &RPCOption) -> Result<PeerResponse, RpcErr<E>>
    where
        E: std::error::Error,
    {
        match self
            .client
            .call::<_, PeerResponse>(&PeerRequest::Raft(req), option.hard_ttl())
            .await
        {
            Ok(PeerResponse::Error(e)) => Err(RPCError::Network(NetworkError::new(&e))),
            Ok(r) => Ok(r),
            Err(e @ mesh_rpc::RpcError::Connect(..)) => {
                Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }

    fn unexpected<E: std::error::Error>(&self, r: PeerResponse) -> RpcErr<E> {
        let e = std::io::Error::other(format!("unexpected answer to a raft request: {r:?}"));
        RPCError::Network(NetworkError::new(&e))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<RaftId>, RpcErr> {
        match self.send(RaftRequest::AppendEntries(rpc), &option).await? {
            PeerResponse::AppendEntries(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(self.unexpected(other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<RaftId>, RpcErr<InstallSnapshotError>> {
        match self
            .send(RaftRequest::InstallSnapshot(rpc), &option)
            .await?
        {
            PeerResponse::InstallSnapshot(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(self.unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<RaftId>,
        option: RPCOption,
    ) -> Result<VoteResponse<RaftId>, RpcErr> {
        match self.send(RaftRequest::Vote(rpc), &option).await? {
            PeerResponse::Vote(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(self.unexpected(other)),
        }
    }
}
