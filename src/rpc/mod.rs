//! Member-to-member gRPC: the generated code, the server, and the client pool.
//!
//! - [`server`]: the tonic service every member runs on its rpc address.
//! - [`client`]: one lazily connected channel per peer, with deadlines and error mapping.
//!
//! Every call carries the cluster hash and the caller's id as metadata (see `proto/peergrid.proto`),
//! and with a cluster secret a credential derived from it; the server refuses calls from another
//! cluster, and without a valid credential before the call's body is read. With
//! [`crate::TlsConfig`], calls run over TLS, mutual by default.

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
/// Metadata key: the caller's cluster credential, derived from the cluster secret (see
/// [`crate::security`]).
pub(crate) const AUTH_HEADER: &str = "x-peergrid-auth";
