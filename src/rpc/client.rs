//! The rpc client pool: one lazily connected channel per peer.

use std::net::SocketAddr;
use std::time::Duration;

use dashmap::DashMap;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};

use super::proto::peer_grid_client::PeerGridClient;
use super::{AUTH_HEADER, CLUSTER_HEADER, FROM_HEADER, GOSSIP_HEADER};
use crate::error::{Error, Result};
use crate::fault::FaultSwitch;
use crate::membership::MemberId;
use crate::membership::identity::Identity;

/// Channels to peers, keyed by member id and generation (a rejoined peer gets a fresh channel).
///
/// Channels are created lazily (no connect until the first call) and shared by every caller;
/// tonic multiplexes concurrent calls over one HTTP/2 connection and reconnects after a failure.
pub(crate) struct RpcClients {
    channels: DashMap<(MemberId, u64), Channel>,
    /// Channels for snapshot streams: their own connection, so a partition copy does not queue
    /// ahead of map operations, and no per-request timeout (each stream sets a deadline that
    /// grows with its size).
    bulk: DashMap<(MemberId, u64), Channel>,
    /// The metadata every call carries: cluster hash, caller id, gossip address, credential
    /// (a [`crate::Client`] outside the cluster has no id or gossip address).
    metadata: Vec<(&'static str, MetadataValue<Ascii>)>,
    local_gossip: SocketAddr,
    tls: Option<ClientTlsConfig>,
    timeout: Duration,
    connect_timeout: Duration,
    fault_switch: Option<FaultSwitch>,
    max_message_size: usize,
}

/// A client for one call to one peer, plus what is needed to report errors about it.
pub(crate) struct PeerClient {
    pub(crate) client: PeerGridClient<Channel>,
    pub(crate) member: MemberId,
    pub(crate) addr: SocketAddr,
    timeout: Duration,
}

/// How a member proves itself to its peers: the secret's credential and TLS.
pub(crate) struct ClientSecurity {
    pub(crate) credential: Option<String>,
    pub(crate) tls: Option<ClientTlsConfig>,
}

impl RpcClients {
    pub(crate) fn new(
        cluster_hash: u64,
        local: Option<&Identity>,
        timeout: Duration,
        connect_timeout: Duration,
        fault_switch: Option<FaultSwitch>,
        max_message_size: usize,
        security: ClientSecurity,
    ) -> Self {
        let mut metadata = Vec::new();
        for (key, value) in [
            (CLUSTER_HEADER, Some(format!("{cluster_hash:016x}"))),
            (FROM_HEADER, local.map(|l| l.id.to_string())),
            (GOSSIP_HEADER, local.map(|l| l.gossip.to_string())),
            (AUTH_HEADER, security.credential),
        ] {
            if let Some(value) = value.and_then(|v| v.parse().ok()) {
                metadata.push((key, value));
            }
        }
        RpcClients {
            channels: DashMap::new(),
            bulk: DashMap::new(),
            metadata,
            local_gossip: local.map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |l| l.gossip),
            tls: security.tls,
            timeout,
            connect_timeout,
            fault_switch,
            max_message_size,
        }
    }

    /// A client for `peer`, or `Unreachable` if the fault switch cuts the link.
    pub(crate) fn get(&self, peer: &Identity) -> Result<PeerClient> {
        self.client(peer, &self.channels, true)
    }

    /// A client for snapshot streams to or from `peer` (see [`RpcClients::bulk_request`]).
    pub(crate) fn get_bulk(&self, peer: &Identity) -> Result<PeerClient> {
        self.client(peer, &self.bulk, false)
    }

    fn client(
        &self,
        peer: &Identity,
        channels: &DashMap<(MemberId, u64), Channel>,
        timed: bool,
    ) -> Result<PeerClient> {
        if let Some(switch) = &self.fault_switch
            && switch.is_cut(self.local_gossip, peer.gossip)
        {
            return Err(Error::Unreachable {
                member: peer.id,
                addr: peer.rpc,
                reason: "link cut by the fault switch".to_string(),
            });
        }
        let key = (peer.id, peer.generation);
        // Clone the channel out; no map guard outlives this statement.
        let channel = channels
            .entry(key)
            .or_insert_with(|| self.endpoint(peer.rpc, timed).connect_lazy())
            .clone();
        Ok(PeerClient {
            client: PeerGridClient::new(channel)
                .max_decoding_message_size(self.max_message_size)
                .max_encoding_message_size(self.max_message_size),
            member: peer.id,
            addr: peer.rpc,
            timeout: self.timeout,
        })
    }

    /// Drops the channels of a member that is gone.
    pub(crate) fn forget(&self, member: MemberId) {
        self.channels.retain(|(id, _), _| *id != member);
        self.bulk.retain(|(id, _), _| *id != member);
    }

    /// A snapshot stream request carrying about `bytes` of payload: its deadline is the rpc
    /// timeout plus one more for every 16 MiB, so a large partition is not cut off, while a stalled
    /// stream still ends.
    pub(crate) fn bulk_request<T>(&self, message: T, bytes: u64) -> Request<T> {
        let mut request = self.request(message);
        request.set_timeout(self.bulk_timeout(bytes));
        request
    }

    /// The deadline of a snapshot stream of about `bytes`.
    pub(crate) fn bulk_timeout(&self, bytes: u64) -> Duration {
        self.timeout
            * (1 + u32::try_from(bytes >> 24)
                .unwrap_or(u32::MAX / 2)
                .min(10_000))
    }

    /// The per-call timeout.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A request with the deadline and the peergrid metadata set.
    pub(crate) fn request<T>(&self, message: T) -> Request<T> {
        let mut request = self.request_untimed(message);
        request.set_timeout(self.timeout);
        request
    }

    /// A request with the peergrid metadata and no deadline, for streams that last as long as
    /// their caller wants (entry listeners; use a client from [`RpcClients::get_bulk`]).
    pub(crate) fn request_untimed<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        let metadata = request.metadata_mut();
        for (key, value) in &self.metadata {
            metadata.insert(*key, value.clone());
        }
        request
    }

    fn endpoint(&self, rpc: SocketAddr, timed: bool) -> Endpoint {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from(
            format!("{scheme}://{rpc}")
                .parse::<tonic::codegen::http::Uri>()
                .unwrap_or_else(|_| tonic::codegen::http::Uri::from_static("http://0.0.0.0:1")),
        )
        .connect_timeout(self.connect_timeout)
        .tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            // Checked when the member joined (`security::load_tls`), so this does not fail.
            match endpoint.clone().tls_config(tls.clone()) {
                Ok(with_tls) => endpoint = with_tls,
                Err(e) => tracing::error!(error = %e, "TLS configuration refused"),
            }
        }
        if timed {
            endpoint.timeout(self.timeout)
        } else {
            endpoint
        }
    }
}

impl PeerClient {
    /// Turns a failed call into the matching [`Error`].
    pub(crate) fn error(&self, operation: &'static str, status: Status) -> Error {
        match status.code() {
            Code::DeadlineExceeded | Code::Cancelled => Error::Timeout {
                operation,
                member: self.member,
                after: self.timeout,
            },
            // tonic reports connect failures (refused, reset, timed out connecting) as Unavailable
            // or Unknown with a transport source.
            // The connection broke after the request may have gone out (reset, broken pipe, a
            // killed peer): the peer may have acted on it, so this is not `Unreachable` (which
            // callers resend freely) but an unknown outcome. The Jepsen-style suite caught a
            // compare-and-set resent this way after its first attempt had been applied.
            Code::Unavailable | Code::Unknown
                if status.code() == Code::Unavailable || is_transport_error(&status) =>
            {
                let reason = transport_reason(&status);
                if is_transport_error(&status) && !failed_to_connect(&reason) {
                    Error::Remote {
                        member: self.member,
                        code: status.code(),
                        message: format!(
                            "connection lost during the call; outcome unknown: {reason}"
                        ),
                    }
                } else {
                    // Refused by the peer before it did anything (stopping, another cluster's
                    // member), or no connection could be made.
                    Error::Unreachable {
                        member: self.member,
                        addr: self.addr,
                        reason,
                    }
                }
            }
            Code::Unauthenticated => Error::Unauthenticated {
                member: self.member,
                addr: self.addr,
                reason: status.message().to_string(),
            },
            Code::InvalidArgument | Code::OutOfRange | Code::ResourceExhausted
                if limit_error(status.message()).is_some() =>
            {
                limit_error(status.message()).unwrap_or(Error::Shutdown)
            }
            Code::DataLoss => match status
                .message()
                .strip_prefix("not backed up: ")
                .and_then(|p| p.parse().ok())
            {
                Some(partition) => Error::NotBackedUp { partition },
                None => Error::Remote {
                    member: self.member,
                    code: Code::DataLoss,
                    message: status.message().to_string(),
                },
            },
            Code::FailedPrecondition if status.message().starts_with("quorum not present: ") => {
                quorum_error(self.member, status.message()).unwrap_or_else(|| Error::Remote {
                    member: self.member,
                    code: Code::FailedPrecondition,
                    message: status.message().to_string(),
                })
            }
            code => Error::Remote {
                member: self.member,
                code,
                message: status.message().to_string(),
            },
        }
    }
}

/// Parses a limit the peer enforced: `"too large: {what} {size} {max}"` and
/// `"too many keys: {count} {max}"` from a member, and tonic's "message length too large:
/// found {size} bytes, the limit is: {max} bytes" from either end's transport.
fn limit_error(message: &str) -> Option<Error> {
    let numbers = |text: &str| -> Vec<usize> {
        text.split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect()
    };
    if let Some(rest) = message.strip_prefix("too large: ") {
        let (what, rest) = rest.split_once(' ')?;
        let what = match what {
            "key" => "key",
            "value" => "value",
            _ => return None,
        };
        let [size, max] = numbers(rest)[..] else {
            return None;
        };
        return Some(Error::TooLarge { what, size, max });
    }
    if let Some(rest) = message.strip_prefix("too many keys: ") {
        let [count, max] = numbers(rest)[..] else {
            return None;
        };
        return Some(Error::TooManyKeys { count, max });
    }
    if message.contains("message length too large") {
        let [size, max] = numbers(message)[..] else {
            return None;
        };
        return Some(Error::TooLarge {
            what: "rpc message",
            size,
            max,
        });
    }
    None
}

/// Parses `"quorum not present: {structure} {min} {present} {name}"`.
fn quorum_error(member: MemberId, message: &str) -> Option<Error> {
    let rest = message.strip_prefix("quorum not present: ")?;
    let mut parts = rest.splitn(4, ' ');
    let structure = match parts.next()? {
        "map" => "map",
        "queue" => "queue",
        "lock" => "lock",
        _ => return None,
    };
    let min = parts.next()?.parse().ok()?;
    let present = parts.next()?.parse().ok()?;
    let name = parts.next().unwrap_or("").to_string();
    Some(Error::QuorumNotPresent {
        structure,
        name,
        min,
        present,
        member,
    })
}

fn is_transport_error(status: &Status) -> bool {
    use std::error::Error as _;
    let mut source = status.source();
    while let Some(err) = source {
        if err.is::<tonic::transport::Error>() || err.is::<std::io::Error>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// A transport failure's message with its innermost cause ("tcp connect error: Connection
/// refused (os error 111)"), which tonic's message alone leaves out.
fn transport_reason(status: &Status) -> String {
    use std::error::Error as _;
    let mut reason = status.message().to_string();
    let mut innermost = None;
    let mut source = status.source();
    while let Some(err) = source {
        innermost = Some(err.to_string());
        source = err.source();
    }
    if let Some(cause) = innermost
        && !reason.contains(&cause)
    {
        reason = format!("{reason}: {cause}");
    }
    reason
}

/// Whether a transport failure (its `transport_reason`) happened while connecting, before any
/// request was sent.
fn failed_to_connect(reason: &str) -> bool {
    let reason = reason.to_ascii_lowercase();
    reason.contains("connect error")
        || reason.contains("connection refused")
        || reason.contains("error trying to connect")
        || reason.contains("dns error")
}
