//! The rpc server every member runs.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::proto::peer_grid_server::{PeerGrid, PeerGridServer};
use super::proto::{MemberInfoRequest, MemberInfoResponse};
use super::{CLUSTER_HEADER, FROM_HEADER};
use crate::membership::MembershipState;

/// The service state. Cheap to clone: tonic clones it per connection.
#[derive(Clone)]
pub(crate) struct PeerGridService {
    pub(crate) membership: Arc<MembershipState>,
    pub(crate) cluster_name: Arc<str>,
    pub(crate) cluster_hash: u64,
    pub(crate) partition_count: u32,
    /// Fired when the member stops. Connections tonic already spawned outlive the accept loop, so
    /// every handler checks it and answers `Unavailable`, as a dead process would not answer.
    pub(crate) closed: CancellationToken,
}

impl PeerGridService {
    /// Refuses calls once the member stopped, and calls from another cluster.
    fn admit<T>(&self, request: &Request<T>, operation: &'static str) -> Result<(), Status> {
        if self.closed.is_cancelled() {
            return Err(Status::unavailable("member is shutting down"));
        }
        let cluster = request
            .metadata()
            .get(CLUSTER_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| u64::from_str_radix(v, 16).ok());
        if cluster != Some(self.cluster_hash) {
            return Err(Status::failed_precondition(
                "caller belongs to another cluster",
            ));
        }
        let from = request
            .metadata()
            .get(FROM_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?");
        tracing::trace!(operation, from, "rpc");
        Ok(())
    }
}

#[tonic::async_trait]
impl PeerGrid for PeerGridService {
    async fn member_info(
        &self,
        request: Request<MemberInfoRequest>,
    ) -> Result<Response<MemberInfoResponse>, Status> {
        self.admit(&request, "member_info")?;
        let me = self.membership.local_identity();
        Ok(Response::new(MemberInfoResponse {
            member_id: me.id.as_u64(),
            name: me.name.to_string(),
            gossip_addr: me.gossip.to_string(),
            rpc_addr: me.rpc.to_string(),
            generation: me.generation,
            cluster_name: self.cluster_name.to_string(),
            partition_count: self.partition_count,
            version: env!("CARGO_PKG_VERSION").to_string(),
            live_peers: self.membership.peer_count() as u32,
        }))
    }
}

/// Serves `service` on `listener` until `cancel` fires. Aborting the returned task also closes the
/// listener and starts a graceful shutdown of open connections.
pub(crate) fn spawn(
    listener: TcpListener,
    service: PeerGridService,
    cancel: CancellationToken,
) -> JoinHandle<()> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .add_service(PeerGridServer::new(service))
            .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "rpc server stopped with an error");
        }
    })
}
