//! Member-to-member gRPC: the generated code, the server, and the client pool.
//!
//! - [`server`]: the tonic service every member runs on its rpc address.
//! - [`client`]: one lazily connected channel per peer, with deadlines and error mapping.
//!
//! Every call carries the cluster hash and the caller's id as metadata (see `proto/peergrid.proto`);
//! the server refuses calls from another cluster.

pub(crate) mod client;
pub(crate) mod server;

/// The code tonic-prost-build generates from `proto/peergrid.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub(crate) mod proto {
    tonic::include_proto!("peergrid.v1");
}

/// Metadata key for the cluster-name hash, as 16 hex digits.
pub(crate) const CLUSTER_HEADER: &str = "x-peergrid-cluster";
/// Metadata key for the caller's member id, as 16 hex digits.
pub(crate) const FROM_HEADER: &str = "x-peergrid-from";
/// Metadata key: the caller's gossip address, which names it to the fault switch.
pub(crate) const GOSSIP_HEADER: &str = "x-peergrid-gossip";
