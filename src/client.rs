//! [`Client`]: a connection to a running cluster from outside it, for tools such as the
//! `peergrid` command. A client joins nothing (it owns no partitions and does not gossip): it
//! calls a member's rpc address, and that member routes each operation as its own call would be.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::map::stats::MapStats;
use crate::membership::identity::Identity;
use crate::membership::{Member, MemberId};
use crate::metrics::Metrics;
use crate::rpc::client::{ClientSecurity, PeerClient, RpcClients};
use crate::rpc::proto;
use crate::security::Keyring;
use crate::{GridConfig, SecurityConfig};

/// Settings of a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Members' rpc addresses, tried in order until one answers. With default settings a
    /// member's rpc address is the same host and port as its gossip address. Default
    /// `127.0.0.1:5701`. Must not be empty.
    pub seeds: Vec<SocketAddr>,
    /// The cluster to talk to: members of another cluster refuse the calls. Default `peergrid`.
    pub cluster_name: String,
    /// The cluster secret and TLS settings, as the members have them ([`SecurityConfig::secret`]
    /// gives the credential; [`SecurityConfig::tls`] the certificates).
    pub security: SecurityConfig,
    /// Deadline of each call. Default 5 s.
    pub timeout: Duration,
    /// Deadline of each connection attempt. Default 1 s.
    pub connect_timeout: Duration,
    /// Largest message sent or received. Default 64 MiB.
    pub max_message_size: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        let grid = GridConfig::default();
        ClientConfig {
            seeds: vec![SocketAddr::from(([127, 0, 0, 1], crate::DEFAULT_PORT))],
            cluster_name: grid.cluster_name,
            security: grid.security,
            timeout: grid.rpc_timeout,
            connect_timeout: Duration::from_secs(1),
            max_message_size: grid.max_rpc_message_size,
        }
    }
}

impl ClientConfig {
    /// The defaults with `seeds` as the members to try.
    pub fn new(seeds: impl IntoIterator<Item = SocketAddr>) -> Self {
        ClientConfig {
            seeds: seeds.into_iter().collect(),
            ..ClientConfig::default()
        }
    }

    /// What a member configured with `config` would use: its cluster name, security, rpc
    /// timeouts and message size; `seeds` are left as they are. This is how the `peergrid`
    /// command reads `PEERGRID_*` variables (`GridConfig::from_env`).
    pub fn with_grid_config(mut self, config: &GridConfig) -> Self {
        self.cluster_name = config.cluster_name.clone();
        self.security = config.security.clone();
        self.timeout = config.rpc_timeout;
        self.connect_timeout = config.rpc_connect_timeout;
        self.max_message_size = config.max_rpc_message_size;
        self
    }
}

/// A connection to a running cluster from outside it: cluster status and map operations on
/// raw bytes, through any member.
///
/// A client owns no data and does not gossip. Each call goes to one member (the first seed that
/// answered), which routes it to the key's primary as its own call would be: the client sees
/// the same guarantees as a member's [`crate::Map`] (synchronous backups, split-brain
/// protection). Keys and values are raw bytes, which is how a [`crate::Map`] stores `String`,
/// `&str`, `Vec<u8>` and `Bytes`: a value put as a string here reads back as a string in a
/// `Map<String, String>`, and the other way round. If the member stops answering, a call is
/// tried on the other members this client knows: a read after any failure to reach it, a
/// write only when it certainly did not reach it, so a write is never applied twice through a
/// retry here.
pub struct Client {
    rpc: RpcClients,
    /// The members to call, the one that answers first; refreshed by [`Client::status`].
    members: std::sync::Mutex<Vec<Identity>>,
    tried: Vec<SocketAddr>,
}

/// The cluster as [`Client::status`] found it.
#[derive(Debug)]
#[non_exhaustive]
pub struct ClusterStatus {
    /// Every member the answering member sees, that member first, each with its figures.
    pub members: Vec<MemberStatus>,
    /// The answering member's partition table version (0: no table yet).
    pub table_version: u64,
    /// Whether every partition is led and backed up with backups in sync
    /// ([`crate::Grid::is_safe`]); `Err` says why the check could not finish.
    pub safe: std::result::Result<bool, String>,
}

/// One member in a [`ClusterStatus`].
#[derive(Debug)]
#[non_exhaustive]
pub struct MemberStatus {
    /// Who it is (`is_local` is true for the member that answered the status call).
    pub member: Member,
    /// The peergrid version it runs, when it answered.
    pub version: Option<String>,
    /// Its figures ([`crate::Grid::metrics`]), or why they could not be read.
    pub metrics: Result<Metrics>,
}

impl ClusterStatus {
    /// Each map's figures summed over the members that answered, by name.
    pub fn map_totals(&self) -> Vec<(String, MapStats)> {
        let mut totals: std::collections::BTreeMap<String, MapStats> = Default::default();
        for member in &self.members {
            let Ok(metrics) = &member.metrics else {
                continue;
            };
            for (name, stats) in &metrics.maps {
                totals.entry(name.clone()).or_default().add(stats);
            }
        }
        totals.into_iter().collect()
    }

    /// Partitions led, summed over the members that answered: equal to the partition count
    /// when every partition has a primary.
    pub fn partitions_led(&self) -> u32 {
        self.members
            .iter()
            .filter_map(|m| m.metrics.as_ref().ok())
            .fold(0u32, |sum, m| sum.saturating_add(m.partitions_owned))
    }
}

impl Client {
    /// Connects to the first of [`ClientConfig::seeds`] that answers as a member of the
    /// configured cluster.
    ///
    /// Errors: [`Error::NoMemberAnswered`] when none does (nothing listens, the calls time out,
    /// or, on a cluster without a secret, the members belong to another cluster);
    /// [`Error::Unauthenticated`] when a member refuses the credential (a wrong or missing
    /// [`SecurityConfig::secret`], or another cluster name: the credential derives from both);
    /// [`Error::Config`] for bad TLS files.
    pub async fn connect(config: ClientConfig) -> Result<Client> {
        if config.seeds.is_empty() {
            return Err(Error::NoMemberAnswered {
                tried: Vec::new(),
                reason: "no address to try".to_string(),
            });
        }
        let keys = Keyring::new(&config.cluster_name, &config.security);
        let tls = crate::security::load_configured_tls(&config.security)?;
        let rpc = RpcClients::new(
            crate::membership::frame::cluster_hash(&config.cluster_name),
            None,
            config.timeout,
            config.connect_timeout,
            None,
            config.max_message_size,
            ClientSecurity {
                credential: keys.rpc_credential().map(str::to_string),
                tls: tls.map(|t| t.client),
            },
        );
        let client = Client {
            rpc,
            members: std::sync::Mutex::new(Vec::new()),
            tried: config.seeds.clone(),
        };
        let mut reason = String::new();
        for &seed in &config.seeds {
            let peer = Identity::new(MemberId(0), seed, seed, Arc::from("seed"));
            match client.member_info(&peer).await {
                Ok(identity) => {
                    client.set_members(vec![identity]);
                    // Learn every member, to move to another if this one goes.
                    client.learn_members().await;
                    return Ok(client);
                }
                Err(e @ Error::Unauthenticated { .. }) => return Err(e),
                Err(e) if config.seeds.len() == 1 => reason = plain(&e),
                Err(e) => reason = format!("{seed}: {}", plain(&e)),
            }
        }
        Err(Error::NoMemberAnswered {
            tried: config.seeds,
            reason,
        })
    }

    /// Asks the member this client talks to for its view of the members (best effort: on
    /// failure the client keeps what it knows).
    async fn learn_members(&self) {
        let Some(first) = self.known().into_iter().next() else {
            return;
        };
        let Ok(mut c) = self.rpc.get(&first) else {
            return;
        };
        let request = self.rpc.request(proto::StatusRequest { check_safe: false });
        if let Ok(response) = c.client.status(request).await {
            let others = response
                .into_inner()
                .members
                .iter()
                .filter_map(|m| identity_of(m).ok())
                .filter(|m| m.id != first.id)
                .collect::<Vec<_>>();
            let mut members = vec![first];
            members.extend(others);
            self.set_members(members);
        }
    }

    /// The members this client calls, the one it talks to first.
    pub fn members(&self) -> Vec<SocketAddr> {
        self.known().iter().map(|m| m.rpc).collect()
    }

    /// The cluster's members, each with its figures, and whether the cluster is safe: what
    /// `peergrid status` prints. Asks the member this client talks to for its view and the
    /// safety check, then every other member for its figures, all at once. A member that does
    /// not answer is listed with the error.
    pub async fn status(&self) -> Result<ClusterStatus> {
        let first = self
            .call(true, |mut c| {
                let request = self.rpc.request(proto::StatusRequest { check_safe: true });
                async move {
                    match c.client.status(request).await {
                        Ok(r) => Ok(r.into_inner()),
                        Err(status) => Err(c.error("status", status)),
                    }
                }
            })
            .await?;
        let table_version = first.table_version;
        let safe = match (first.safe_checked, first.safe_error.is_empty()) {
            (true, true) => Ok(first.safe),
            (true, false) => Err(first.safe_error.clone()),
            (false, _) => Err("the member did not run the check".to_string()),
        };
        let answering = first
            .member
            .as_ref()
            .map(|m| m.member_id)
            .unwrap_or_default();
        let identities: Vec<Identity> = first
            .members
            .iter()
            .filter_map(|m| identity_of(m).ok())
            .collect();
        // The answering member first, then the others in its order.
        let mut ordered: Vec<Identity> = identities
            .iter()
            .filter(|m| m.id.0 == answering)
            .chain(identities.iter().filter(|m| m.id.0 != answering))
            .cloned()
            .collect();
        if ordered.is_empty()
            && let Some(me) = first.member.as_ref().and_then(|m| identity_of(m).ok())
        {
            ordered.push(me);
        }
        let others = ordered.iter().filter(|m| m.id.0 != answering).map(|peer| {
            let peer = peer.clone();
            async move {
                let mut c = self.rpc.get(&peer)?;
                let request = self.rpc.request(proto::StatusRequest { check_safe: false });
                let response = c
                    .client
                    .status(request)
                    .await
                    .map_err(|status| c.error("status", status))?
                    .into_inner();
                Ok::<_, Error>(response)
            }
        });
        let mut others = futures::future::join_all(others).await.into_iter();
        let mut members = Vec::with_capacity(ordered.len());
        for identity in &ordered {
            let response = if identity.id.0 == answering {
                Ok(first.clone())
            } else {
                others.next().unwrap_or(Err(Error::Shutdown))
            };
            let (version, metrics) = match response {
                Ok(r) => (
                    r.member.map(|m| m.version),
                    Ok(crate::metrics::wire::from_proto(
                        r.metrics.unwrap_or_default(),
                    )),
                ),
                Err(e) => (None, Err(e)),
            };
            members.push(MemberStatus {
                member: Member {
                    id: identity.id,
                    name: identity.name.to_string(),
                    gossip_addr: identity.gossip,
                    rpc_addr: identity.rpc,
                    generation: identity.generation,
                    is_local: identity.id.0 == answering,
                },
                version,
                metrics,
            });
        }
        if !ordered.is_empty() {
            self.set_members(ordered);
        }
        Ok(ClusterStatus {
            members,
            table_version,
            safe,
        })
    }

    /// The value of `key` in map `name`, if any.
    pub async fn map_get(&self, name: &str, key: impl AsRef<[u8]>) -> Result<Option<Bytes>> {
        let response = self
            .map_call(name, proto::ClientMapOp::Get, key.as_ref(), &[])
            .await?;
        Ok(response.found.then_some(response.value))
    }

    /// Stores `value` under `key` in map `name`; returns the value it replaced.
    pub async fn map_put(
        &self,
        name: &str,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<Option<Bytes>> {
        let response = self
            .map_call(name, proto::ClientMapOp::Put, key.as_ref(), value.as_ref())
            .await?;
        Ok(response.found.then_some(response.value))
    }

    /// Removes `key` from map `name`; returns the value it had.
    pub async fn map_remove(&self, name: &str, key: impl AsRef<[u8]>) -> Result<Option<Bytes>> {
        let response = self
            .map_call(name, proto::ClientMapOp::Remove, key.as_ref(), &[])
            .await?;
        Ok(response.found.then_some(response.value))
    }

    /// The number of entries in map `name`, over the whole cluster.
    pub async fn map_size(&self, name: &str) -> Result<u64> {
        Ok(self
            .map_call(name, proto::ClientMapOp::Size, &[], &[])
            .await?
            .size)
    }

    async fn map_call(
        &self,
        name: &str,
        op: proto::ClientMapOp,
        key: &[u8],
        value: &[u8],
    ) -> Result<proto::ClientMapResponse> {
        if name.starts_with('\0') {
            return Err(Error::ReservedName {
                name: name.to_string(),
            });
        }
        let request = proto::ClientMapRequest {
            map: name.to_string(),
            op: op as i32,
            key: Bytes::copy_from_slice(key),
            value: Bytes::copy_from_slice(value),
        };
        let read_only = matches!(op, proto::ClientMapOp::Get | proto::ClientMapOp::Size);
        self.call(read_only, |mut c| {
            let request = self.rpc.request(request.clone());
            async move {
                match c.client.client_map(request).await {
                    Ok(r) => Ok(r.into_inner()),
                    Err(status) => Err(c.error("client_map", status)),
                }
            }
        })
        .await
    }

    /// Runs `call` on the first known member, then on the next ones while the member could
    /// not be reached. A write (`read_only` false) moves on only when the call certainly never
    /// reached the member (the connection was refused, or the member was stopping), so it is
    /// never applied twice; a read moves on after any transport failure or timeout.
    async fn call<T, F, Fut>(&self, read_only: bool, call: F) -> Result<T>
    where
        F: Fn(PeerClient) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let known = self.known();
        let mut last = None;
        for peer in &known {
            let client = self.rpc.get(peer)?;
            match call(client).await {
                // Never sent (no connection, or refused before anything was done).
                Err(e @ Error::Unreachable { .. }) => last = Some(e),
                // Maybe done: only a read may be asked again.
                Err(e) if read_only && crate::routing::outcome_unknown(&e) => last = Some(e),
                other => return other,
            }
        }
        Err(Error::NoMemberAnswered {
            tried: if known.is_empty() {
                self.tried.clone()
            } else {
                known.iter().map(|m| m.rpc).collect()
            },
            reason: last.map_or_else(|| "no member known".to_string(), |e| plain(&e)),
        })
    }

    async fn member_info(&self, peer: &Identity) -> Result<Identity> {
        let mut c = self.rpc.get(peer)?;
        let response = c
            .client
            .member_info(self.rpc.request(proto::MemberInfoRequest {}))
            .await
            .map_err(|status| c.error("member_info", status))?
            .into_inner();
        identity_of(&response).map_err(|reason| Error::Remote {
            member: MemberId(response.member_id),
            code: tonic::Code::Internal,
            message: reason,
        })
    }

    fn known(&self) -> Vec<Identity> {
        self.members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_members(&self, members: Vec<Identity>) {
        *self.members.lock().unwrap_or_else(|p| p.into_inner()) = members;
    }
}

/// A member's identity from its own description.
pub(crate) fn identity_of(m: &proto::MemberInfoResponse) -> std::result::Result<Identity, String> {
    let parse = |s: &str| -> std::result::Result<SocketAddr, String> {
        s.parse()
            .map_err(|_| format!("member sent a bad address {s:?}"))
    };
    Ok(Identity {
        id: MemberId(m.member_id),
        gossip: parse(&m.gossip_addr)?,
        rpc: parse(&m.rpc_addr)?,
        generation: m.generation,
        name: Arc::from(m.name.as_str()),
    })
}

/// An error about a seed whose member id is not known yet, without the placeholder id.
fn plain(e: &Error) -> String {
    match e {
        Error::Unreachable { reason, .. } => reason.clone(),
        Error::Timeout { after, .. } => format!("no answer within {after:?}"),
        Error::Remote { code, message, .. } => format!("{code:?}: {message}"),
        other => other.to_string(),
    }
}
