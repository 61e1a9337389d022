//! The rpc server every member runs.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::proto::peer_grid_server::{PeerGrid, PeerGridServer};
use super::proto::{self, MemberInfoRequest, MemberInfoResponse};
use super::{AUTH_HEADER, CLUSTER_HEADER, FROM_HEADER, GOSSIP_HEADER};
use crate::error::Error;
use crate::map::ops::MapOp;
use crate::membership::{MemberId, MembershipState};
use crate::node::{FetchRefused, Node, Outcome};
use crate::partition::coordinator;
use crate::routing::op_from_proto;
use crate::security::Keyring;
use crate::store::snapshot::Staging;

/// The service state. Cheap to clone: tonic clones it per connection.
#[derive(Clone)]
pub(crate) struct PeerGridService {
    /// The member itself, for the `Status` rpc (its figures and the safety check).
    pub(crate) grid: crate::grid::GridSlot,
    pub(crate) membership: Arc<MembershipState>,
    pub(crate) node: Arc<Node>,
    pub(crate) cluster_name: Arc<str>,
    pub(crate) cluster_hash: u64,
    pub(crate) partition_count: u32,
    /// Fired when the member stops. Connections tonic already spawned outlive the accept loop, so
    /// every handler checks it and answers `Unavailable`, as a dead process would not answer.
    pub(crate) closed: CancellationToken,
}

impl PeerGridService {
    /// Refuses calls once the member stopped, and calls from another cluster. Returns the
    /// caller's member id, if it sent one.
    fn admit<T>(
        &self,
        request: &Request<T>,
        operation: &'static str,
    ) -> Result<Option<MemberId>, Status> {
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
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .map(MemberId);
        // A member of the cluster this member merged away from acts on nothing here (it would
        // write into the new cluster past the merge policy), until it is back as a member of
        // the new cluster.
        if let Some(caller) = from
            && self.membership.is_left_behind(caller)
            && self.membership.peer(caller).is_none()
        {
            return Err(Status::unavailable(
                "caller belongs to the cluster this member merged away from",
            ));
        }
        tracing::trace!(operation, ?from, "rpc");
        Ok(from)
    }

    /// Refuses to answer once the member stopped while a call was in progress: a dead process
    /// answers nothing, and an answer could claim work the member can no longer back up. Also
    /// refuses when the fault switch cut the link to the caller while the call was in progress,
    /// as a firewall would drop the answer: the switch then cuts calls in flight, not only new
    /// ones.
    fn still_running(&self, caller: Option<std::net::SocketAddr>) -> Result<(), Status> {
        if self.closed.is_cancelled() {
            // Not `unavailable`: the work may have been applied, so the caller must not take it
            // for a request that never arrived.
            return Err(Status::aborted(
                "member stopped while answering; outcome unknown",
            ));
        }
        if let (Some(switch), Some(caller)) = (self.node.config.fault_switch.as_ref(), caller)
            && switch.is_cut(self.membership.local_identity().gossip, caller)
        {
            return Err(Status::aborted(
                "link cut by the fault switch while answering; outcome unknown",
            ));
        }
        Ok(())
    }

    /// Refuses a key or value beyond the configured limits (`"too large: {what} {size} {max}"`,
    /// parsed back into [`Error::TooLarge`] by the caller).
    fn check_sizes(&self, key: &[u8], value: &[u8]) -> Result<(), Status> {
        let config = &self.node.config;
        for (what, size, max) in [
            ("key", key.len(), config.max_key_size),
            ("value", value.len(), config.max_value_size),
        ] {
            if size > max {
                return Err(Status::invalid_argument(format!(
                    "too large: {what} {size} {max}"
                )));
            }
        }
        Ok(())
    }

    /// The caller's gossip address, as it says.
    fn caller_gossip<T>(request: &Request<T>) -> Option<std::net::SocketAddr> {
        request
            .metadata()
            .get(GOSSIP_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    }

    /// Whether `from` is the primary of `partition` in this member's table (after catching up
    /// with the sender's table version). Only the primary may change a backup's copy.
    async fn sent_by_primary(&self, from: Option<MemberId>, partition: u32, version: u64) -> bool {
        self.node.catch_up(version).await;
        from.is_some() && self.node.table.current().primary(partition) == from
    }

    /// Whether a backup takes `partition`'s mutations from `from`: its primary, or its previous
    /// primary when that member is live and already holds this member's table (the tail of the
    /// history the new primary takes over: the old primary applies the new table before it
    /// flushes; sequence numbers keep the tail in order with the new primary's own mutations). A
    /// member still writing under an older table is refused.
    fn takes_mutations(&self, from: Option<MemberId>, partition: u32, version: u64) -> bool {
        let Some(from) = from else {
            return false;
        };
        let table = self.node.table.current();
        table.primary(partition) == Some(from)
            || (table.previous_primary(partition) == Some(from)
                && version >= table.version
                && self.membership.peer(from).is_some())
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

    async fn get_table(
        &self,
        request: Request<proto::GetTableRequest>,
    ) -> Result<Response<proto::Table>, Status> {
        self.admit(&request, "get_table")?;
        Ok(Response::new(self.node.table.current().to_proto()))
    }

    async fn publish_table(
        &self,
        request: Request<proto::Table>,
    ) -> Result<Response<proto::PublishTableResponse>, Status> {
        self.admit(&request, "publish_table")?;
        Ok(Response::new(coordinator::on_publish(
            &self.node,
            request.get_ref(),
        )))
    }

    async fn map_call(
        &self,
        request: Request<proto::MapRequest>,
    ) -> Result<Response<proto::MapResponse>, Status> {
        self.admit(&request, "map_call")?;
        let caller = Self::caller_gossip(&request);
        let request = request.into_inner();
        // Internal maps (locks, queue items, merges) carry keys and values peergrid built; their
        // size is bounded by the message limit. User maps get the configured limits.
        if !request.map.starts_with('\0') {
            self.check_sizes(&request.key, &request.value)?;
            self.check_sizes(&[], &request.expected)?;
            for entry in &request.merge_entries {
                self.check_sizes(&entry.key, &entry.value)?;
            }
        }
        let op = op_from_proto(&request)
            .ok_or_else(|| Status::invalid_argument("unknown map operation"))?;
        let outcome = self
            .node
            .execute(
                request.partition,
                &request.map,
                request.key,
                op,
                request.table_version,
                request
                    .holder
                    .as_ref()
                    .map(crate::routing::holder_from_proto),
            )
            .await
            .map_err(to_status)?;
        self.still_running(caller)?;
        Ok(Response::new(proto::MapResponse {
            outcome: Some(match outcome {
                Outcome::Done(result) => proto::map_response::Outcome::Result(proto::MapResult {
                    found: result.found,
                    value: result.value.unwrap_or_default(),
                    applied: result.applied,
                    expires_at_ms: result.expires_at_ms,
                    items: result.items,
                    count: result.count,
                    version: result.version,
                    lock: result
                        .lock
                        .as_ref()
                        .map(crate::routing::lock_answer_to_proto),
                }),
                Outcome::Locked => proto::map_response::Outcome::KeyLocked(proto::KeyLocked {}),
                Outcome::NotOwner { version, owner } => {
                    proto::map_response::Outcome::NotOwner(proto::NotOwner {
                        version,
                        owner: owner.map(|m| m.as_u64()),
                    })
                }
                // `execute` waits pending partitions out; kept total for the compiler.
                Outcome::Pending => proto::map_response::Outcome::NotOwner(proto::NotOwner {
                    version: self.node.table.current().version,
                    owner: Some(self.node.me.as_u64()),
                }),
            }),
        }))
    }

    async fn map_batch(
        &self,
        request: Request<proto::MapBatchRequest>,
    ) -> Result<Response<proto::MapBatchResponse>, Status> {
        self.admit(&request, "map_batch")?;
        let caller = Self::caller_gossip(&request);
        let request = request.into_inner();
        // Every limit is checked before any entry is applied: a refused batch stores nothing.
        let max = self.node.config.max_batch_keys;
        if request.entries.len() > max {
            return Err(Status::invalid_argument(format!(
                "too many keys: {} {max}",
                request.entries.len()
            )));
        }
        for entry in &request.entries {
            self.check_sizes(&entry.key, &entry.value)?;
        }
        self.node.catch_up(request.table_version).await;
        self.node
            .check_map_quorum(&request.map, request.put)
            .map_err(to_status)?;
        let mut results = Vec::with_capacity(request.entries.len());
        let mut acks = Vec::new();
        for entry in request.entries {
            let op = if request.put {
                MapOp::Set(entry.value)
            } else {
                MapOp::Get
            };
            let pending = self
                .node
                .store
                .partition(entry.partition)
                .is_none_or(|d| d.is_pending());
            let outcome = if pending {
                None
            } else {
                match self
                    .node
                    .apply(entry.partition, &request.map, entry.key, &op, None)
                    .map_err(to_status)?
                {
                    (Outcome::Done(result), mut new_acks) => {
                        acks.append(&mut new_acks);
                        Some(result)
                    }
                    (Outcome::NotOwner { .. } | Outcome::Pending | Outcome::Locked, _) => None,
                }
            };
            results.push(match outcome {
                Some(result) => proto::BatchResult {
                    not_owner: false,
                    found: result.found,
                    value: result.value.unwrap_or_default(),
                },
                None => proto::BatchResult {
                    not_owner: true,
                    ..Default::default()
                },
            });
        }
        self.node.await_acks(acks).await.map_err(to_status)?;
        self.still_running(caller)?;
        Ok(Response::new(proto::MapBatchResponse { results }))
    }

    async fn map_scan(
        &self,
        request: Request<proto::MapScanRequest>,
    ) -> Result<Response<proto::MapScanResponse>, Status> {
        self.admit(&request, "map_scan")?;
        let caller = Self::caller_gossip(&request);
        let request = request.into_inner();
        let (entries, partitions) = self
            .node
            .scan(&request.map, request.clear, request.table_version)
            .await
            .map_err(to_status)?;
        self.still_running(caller)?;
        Ok(Response::new(proto::MapScanResponse {
            entries,
            partitions,
        }))
    }

    async fn replicate(
        &self,
        request: Request<proto::ReplicateRequest>,
    ) -> Result<Response<proto::ReplicateResponse>, Status> {
        let from = self.admit(&request, "replicate")?;
        let request = request.into_inner();
        let mut response = proto::ReplicateResponse::default();
        // Caught up once for the whole batch, not once per partition.
        self.node.catch_up(request.table_version).await;
        for p in &request.partitions {
            if !self.takes_mutations(from, p.partition, request.table_version) {
                response.rejected.push(p.partition);
            } else if self
                .node
                .store
                .apply_replicated(p.partition, p.lineage, &p.mutations)
                .is_err()
            {
                response.resync.push(p.partition);
            }
        }
        Ok(Response::new(response))
    }

    async fn install_snapshot(
        &self,
        request: Request<tonic::Streaming<proto::SnapshotChunk>>,
    ) -> Result<Response<proto::InstallSnapshotResponse>, Status> {
        let from = self.admit(&request, "install_snapshot")?;
        let mut stream = request.into_inner();
        let mut staging = Staging::default();
        let refused = Ok(Response::new(proto::InstallSnapshotResponse {
            installed: false,
        }));
        while let Some(chunk) = stream.message().await? {
            let first = staging.header().is_none();
            staging
                .push(chunk)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            if first {
                let header = staging.header().expect("the first chunk is a header");
                if !self
                    .sent_by_primary(from, header.partition, header.table_version)
                    .await
                {
                    return refused;
                }
            }
        }
        let staged = staging
            .finish()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Checked again: the table may have moved on while the stream was arriving.
        if self.node.table.current().primary(staged.header.partition) != from {
            return refused;
        }
        let (partition, seq, entries) = (
            staged.header.partition,
            staged.header.seq,
            staged.header.entries,
        );
        if !self.node.store.install(staged) {
            return Err(Status::invalid_argument("no such partition"));
        }
        tracing::debug!(member = %self.node.me, partition, seq, entries, ?from, "backup snapshot installed");
        Ok(Response::new(proto::InstallSnapshotResponse {
            installed: true,
        }))
    }

    type FetchSnapshotStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<proto::SnapshotChunk, Status>> + Send + 'static>,
    >;

    async fn fetch_snapshot(
        &self,
        request: Request<proto::FetchSnapshotRequest>,
    ) -> Result<Response<Self::FetchSnapshotStream>, Status> {
        let from = self.admit(&request, "fetch_snapshot")?;
        let request = request.into_inner();
        let chunks = self
            .node
            .fetch_snapshot(
                from,
                request.partition,
                request.table.as_ref(),
                request.full,
            )
            .await
            .map_err(|refused| match refused {
                FetchRefused::NoCopy => {
                    Status::failed_precondition("no copy of the partition, or a stale handover")
                }
                FetchRefused::StillPrimary => Status::unavailable(
                    "still the partition's primary here; the caller's table is not taken yet",
                ),
            })?;
        let stream = futures::stream::iter(chunks.map(Ok));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn leaving(
        &self,
        request: Request<proto::LeavingRequest>,
    ) -> Result<Response<proto::LeavingResponse>, Status> {
        self.admit(&request, "leaving")?;
        let member = MemberId(request.into_inner().member);
        let someone_stays = self.node.mark_leaving(member);
        tracing::info!(%member, someone_stays, "member is leaving; handing its partitions off");
        Ok(Response::new(proto::LeavingResponse { someone_stays }))
    }

    async fn replica_states(
        &self,
        request: Request<proto::ReplicaStatesRequest>,
    ) -> Result<Response<proto::ReplicaStatesResponse>, Status> {
        self.admit(&request, "replica_states")?;
        let partitions = request.into_inner().partitions;
        Ok(Response::new(self.node.replica_states(&partitions)))
    }

    type ListenStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<proto::EntryEvent, Status>> + Send + 'static>,
    >;

    async fn listen(
        &self,
        request: Request<proto::ListenRequest>,
    ) -> Result<Response<Self::ListenStream>, Status> {
        self.admit(&request, "listen")?;
        let request = request.into_inner();
        let map: std::sync::Arc<str> = std::sync::Arc::from(request.map);
        let include_values = request.include_values;
        let events =
            tokio_stream::wrappers::BroadcastStream::new(self.node.entry_events.subscribe());
        let events = tokio_stream::StreamExt::filter_map(events, move |event| match event {
            Ok(event) if event.map == map && !event.clear => {
                Some(Ok(event.to_proto(include_values)))
            }
            Ok(_) => None,
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(lost)) => {
                Some(Ok(proto::EntryEvent {
                    kind: proto::EntryEventKind::Lost as i32,
                    seq: lost,
                    ..proto::EntryEvent::default()
                }))
            }
        });
        // Ends when the member stops.
        let events = futures::StreamExt::take_until(events, self.closed.clone().cancelled_owned());
        Ok(Response::new(Box::pin(events)))
    }

    type InvalidationsStream =
        tokio_stream::wrappers::ReceiverStream<Result<proto::InvalidationBatch, Status>>;

    async fn invalidations(
        &self,
        request: Request<proto::InvalidationsRequest>,
    ) -> Result<Response<Self::InvalidationsStream>, Status> {
        self.admit(&request, "invalidations")?;
        let map = request.into_inner().map;
        let batches = crate::map::near::serve_invalidations(&self.node, std::sync::Arc::from(map));
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            batches,
        )))
    }

    async fn invalidation_state(
        &self,
        request: Request<proto::InvalidationsRequest>,
    ) -> Result<Response<proto::InvalidationStateResponse>, Status> {
        self.admit(&request, "invalidation_state")?;
        let map = request.into_inner().map;
        Ok(Response::new(proto::InvalidationStateResponse {
            seqs: self.node.invalidation_state(&map),
        }))
    }

    async fn echo(
        &self,
        request: Request<proto::EchoMessage>,
    ) -> Result<Response<proto::EchoMessage>, Status> {
        self.admit(&request, "echo")?;
        Ok(Response::new(request.into_inner()))
    }

    async fn status(
        &self,
        request: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusResponse>, Status> {
        self.admit(&request, "status")?;
        let grid = self
            .grid
            .get()
            .ok_or_else(|| Status::unavailable("member is shutting down"))?;
        let info = |m: &crate::Member, live_peers: u32| MemberInfoResponse {
            member_id: m.id.as_u64(),
            name: m.name.clone(),
            gossip_addr: m.gossip_addr.to_string(),
            rpc_addr: m.rpc_addr.to_string(),
            generation: m.generation,
            cluster_name: self.cluster_name.to_string(),
            partition_count: self.partition_count,
            version: env!("CARGO_PKG_VERSION").to_string(),
            live_peers,
        };
        let members = grid.members();
        let peers = u32::try_from(members.len().saturating_sub(1)).unwrap_or(u32::MAX);
        let mut response = proto::StatusResponse {
            member: Some(info(&grid.local_member(), peers)),
            members: members.iter().map(|m| info(m, 0)).collect(),
            table_version: self.node.table.current().version,
            metrics: Some(crate::metrics::wire::to_proto(&grid.metrics())),
            ..Default::default()
        };
        if request.get_ref().check_safe {
            response.safe_checked = true;
            // Bounded well inside the caller's deadline, so a member that does not answer
            // costs the report its safety line, not the whole report (and holds this member
            // no longer than that).
            let within = self.node.config.rpc_timeout / 2;
            match tokio::time::timeout(within, grid.is_safe()).await {
                Ok(Ok(safe)) => response.safe = safe,
                Ok(Err(e)) => response.safe_error = e.to_string(),
                Err(_) => {
                    response.safe_error = format!(
                        "the check did not finish within {within:?} (a member does not answer)"
                    )
                }
            }
        }
        drop(grid);
        Ok(Response::new(response))
    }

    async fn client_map(
        &self,
        request: Request<proto::ClientMapRequest>,
    ) -> Result<Response<proto::ClientMapResponse>, Status> {
        self.admit(&request, "client_map")?;
        let request = request.into_inner();
        if request.map.starts_with('\0') {
            return Err(Status::invalid_argument(format!(
                "map name {:?} is reserved (names starting with NUL belong to queues)",
                request.map
            )));
        }
        self.check_sizes(&request.key, &request.value)?;
        let op = proto::ClientMapOp::try_from(request.op)
            .map_err(|_| Status::invalid_argument("unknown client map operation"))?;
        let map: crate::Map<bytes::Bytes, bytes::Bytes> =
            crate::Map::new(self.node.clone(), &request.map);
        let found = |value: Option<bytes::Bytes>| proto::ClientMapResponse {
            found: value.is_some(),
            value: value.unwrap_or_default(),
            size: 0,
        };
        let response = match op {
            proto::ClientMapOp::Get => map.get(&request.key).await.map(found),
            proto::ClientMapOp::Put => map.put(&request.key, &request.value).await.map(found),
            proto::ClientMapOp::Remove => map.remove(&request.key).await.map(found),
            proto::ClientMapOp::Size => map.size().await.map(|size| proto::ClientMapResponse {
                size,
                ..Default::default()
            }),
            proto::ClientMapOp::Unspecified => {
                return Err(Status::invalid_argument("unknown client map operation"));
            }
        }
        .map_err(|e| match e {
            Error::ReservedName { .. } => Status::invalid_argument(e.to_string()),
            e => to_status(e),
        })?;
        Ok(Response::new(response))
    }
}

/// Reports an owner-side failure to the caller.
fn to_status(error: Error) -> Status {
    match error {
        Error::Timeout { .. } => Status::deadline_exceeded(error.to_string()),
        // Not processed: the caller may ask again.
        Error::NoOwner { .. } | Error::UnknownMember(_) => Status::unavailable(error.to_string()),
        Error::Shutdown => Status::aborted(error.to_string()),
        Error::QuorumNotPresent {
            structure,
            name,
            min,
            present,
            ..
        } => Status::failed_precondition(format!(
            "quorum not present: {structure} {min} {present} {name}"
        )),
        Error::NotBackedUp { partition } => {
            Status::data_loss(format!("not backed up: {partition}"))
        }
        other => Status::internal(other.to_string()),
    }
}

/// Who the server lets in: holders of the cluster secret, over TLS when configured.
pub(crate) struct ServerSecurity {
    pub(crate) keys: Arc<Keyring>,
    pub(crate) tls: Option<tonic::transport::ServerTlsConfig>,
}

/// Serves `service` on `listener` until `cancel` fires. Aborting the returned task also closes the
/// listener and starts a graceful shutdown of open connections.
///
/// Every call first passes an interceptor that checks the caller's cluster credential from the
/// call's metadata, before the body is read: a caller without the secret gets `UNAUTHENTICATED`
/// and costs the member no decoding.
pub(crate) fn spawn(
    listener: TcpListener,
    service: PeerGridService,
    cancel: CancellationToken,
    max_message_size: usize,
    security: ServerSecurity,
) -> JoinHandle<()> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let keys = security.keys;
    let authenticate = move |request: Request<()>| -> Result<Request<()>, Status> {
        let credential = request.metadata().get(AUTH_HEADER).map(|v| v.as_bytes());
        if keys.admits_rpc(credential) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "missing or wrong cluster credential: the caller does not hold this cluster's secret (or names another cluster)",
            ))
        }
    };
    let service = tonic::service::interceptor::InterceptedService::new(
        PeerGridServer::new(service)
            .max_decoding_message_size(max_message_size)
            .max_encoding_message_size(max_message_size),
        authenticate,
    );
    tokio::spawn(async move {
        // One span per call, named after its method, around everything the call does.
        let mut builder = tonic::transport::Server::builder()
            .trace_fn(|request| tracing::debug_span!("rpc", method = %request.uri().path()));
        if let Some(tls) = security.tls {
            builder = match builder.tls_config(tls) {
                Ok(builder) => builder,
                Err(e) => {
                    // Checked when the member joined (`security::load_tls`).
                    tracing::error!(error = %e, "rpc server TLS configuration refused");
                    return;
                }
            };
        }
        let result = builder
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "rpc server stopped with an error");
        }
    })
}
