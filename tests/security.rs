//! The cluster secret, TLS and the limits, on real members over real sockets: who can join,
//! who can call, what is dropped, and what is refused.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{Cluster, DEADLINE, unique_cluster_name, wait_for};
use peergrid::{Error, Grid, GridConfig, Secret, SecurityConfig, TlsConfig};
use tokio::net::UdpSocket;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const SECRET: &str = "correct horse battery staple";

fn secured(config: &mut GridConfig, secret: &str) {
    config.security.secret = Some(Secret::new(secret));
}

/// Every rpc of the service, by its gRPC path.
const METHODS: [&str; 17] = [
    "MemberInfo",
    "GetTable",
    "PublishTable",
    "MapCall",
    "MapBatch",
    "MapScan",
    "Replicate",
    "InstallSnapshot",
    "FetchSnapshot",
    "Leaving",
    "ReplicaStates",
    "Echo",
    "Listen",
    "Invalidations",
    "InvalidationState",
    "Status",
    "ClientMap",
];

/// Calls `method` with an empty message and the given credential header (none if `None`),
/// cluster hash and caller metadata as a member would send them. Returns the status code.
async fn raw_call(channel: Channel, method: &str, credential: Option<&str>) -> tonic::Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("channel ready");
    let mut request = tonic::Request::new(());
    if let Some(credential) = credential {
        request
            .metadata_mut()
            .insert("x-peergrid-auth", credential.parse().unwrap());
    }
    request.set_timeout(Duration::from_secs(5));
    let path = format!("/peergrid.v1.PeerGrid/{method}")
        .parse()
        .expect("path");
    match grpc
        .unary::<(), (), _>(request, path, tonic_prost::ProstCodec::default())
        .await
    {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_without_the_secret_cannot_join() {
    let cluster = Cluster::start_with(2, |c| secured(c, SECRET)).await;
    let before = cluster.grid(0).datagram_stats().dropped_unauthenticated;
    let seeds: Vec<SocketAddr> = cluster
        .live()
        .map(|g| g.local_member().gossip_addr)
        .collect();
    let outsider = |secret: Option<&str>| GridConfig {
        cluster_name: cluster.name.clone(),
        seeds: seeds.clone(),
        join_timeout: Duration::from_millis(300),
        seed_retry_interval: Duration::from_millis(100),
        split_brain_probe_interval: Duration::from_millis(100),
        security: SecurityConfig {
            secret: secret.map(Secret::new),
            ..SecurityConfig::default()
        },
        ..GridConfig::ephemeral()
    };
    let wrong = Grid::join(outsider(Some("a different secret, long enough")))
        .await
        .expect("starts alone");
    let missing = Grid::join(outsider(None)).await.expect("starts alone");
    // Both keep knocking (announces, then split-brain probes); every datagram is dropped.
    wait_for("the outsiders' datagrams to be dropped", DEADLINE, || {
        let dropped = cluster.grid(0).datagram_stats().dropped_unauthenticated
            + cluster.grid(1).datagram_stats().dropped_unauthenticated;
        async move { (dropped >= before + 20).then_some(()) }
    })
    .await;
    for grid in cluster.live() {
        assert_eq!(grid.members().len(), 2, "the cluster let an outsider in");
    }
    assert_eq!(wrong.members().len(), 1);
    assert_eq!(missing.members().len(), 1);
    // The cluster's own datagrams are dropped by the outsiders in turn, if any reach them.
    assert_eq!(wrong.datagram_stats().received, 0);
    assert_eq!(missing.datagram_stats().received, 0);

    // And the cluster keeps working.
    let map = cluster.grid(0).map::<String, u64>("m");
    map.put("k", &1).await.unwrap();
    assert_eq!(
        cluster
            .grid(1)
            .map::<String, u64>("m")
            .get("k")
            .await
            .unwrap(),
        Some(1)
    );
    drop(wrong);
    drop(missing);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_the_credential_are_refused_on_every_rpc() {
    let cluster = Cluster::start_with(2, |c| secured(c, SECRET)).await;
    let rpc = cluster.grid(0).local_member().rpc_addr;
    let channel = Endpoint::from_shared(format!("http://{rpc}"))
        .unwrap()
        .connect()
        .await
        .expect("tcp connects");
    for method in METHODS {
        for credential in [None, Some("00000001.00112233445566778899aabbccddeeff")] {
            assert_eq!(
                raw_call(channel.clone(), method, credential).await,
                tonic::Code::Unauthenticated,
                "{method} with credential {credential:?}"
            );
        }
    }
    // A member of the same cluster name with another secret gets the typed error from its own
    // calls; the cluster is unharmed.
    let map = cluster.grid(1).map::<String, u64>("m");
    map.put("after", &7).await.unwrap();
    assert_eq!(
        cluster
            .grid(0)
            .map::<String, u64>("m")
            .get("after")
            .await
            .unwrap(),
        Some(7)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_and_replayed_datagrams_are_dropped() {
    let name = unique_cluster_name();
    // A member whose only seed is this test's socket: what it sends there is captured.
    let tap = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let config = |seeds: Vec<SocketAddr>| GridConfig {
        cluster_name: name.clone(),
        seeds,
        join_timeout: Duration::from_millis(200),
        split_brain_probe_interval: Duration::from_millis(100),
        security: SecurityConfig {
            secret: Some(Secret::new(SECRET)),
            ..SecurityConfig::default()
        },
        ..GridConfig::ephemeral()
    };
    let sender = Grid::join(config(vec![tap.local_addr().unwrap()]))
        .await
        .unwrap();
    let mut buf = vec![0u8; 2048];
    let (len, _) = tokio::time::timeout(DEADLINE, tap.recv_from(&mut buf))
        .await
        .expect("the member sends to its seed")
        .unwrap();
    let captured = buf[..len].to_vec();
    assert_eq!(&captured[..2], b"PG");

    let target = Grid::join(config(Vec::new())).await.unwrap();
    let target_addr = target.local_member().gossip_addr;
    let before = target.datagram_stats();

    // Tampered: one payload bit flipped.
    let mut tampered = captured.clone();
    let at = tampered.len() - 20;
    tampered[at] ^= 0x01;
    tap.send_to(&tampered, target_addr).await.unwrap();
    wait_for("the tampered datagram to be dropped", DEADLINE, || {
        let s = target.datagram_stats();
        async move { (s.dropped_unauthenticated == before.dropped_unauthenticated + 1).then_some(()) }
    })
    .await;
    // Its tag, cut off.
    tap.send_to(&captured[..captured.len() - 16], target_addr)
        .await
        .unwrap();
    wait_for("the untagged datagram to be dropped", DEADLINE, || {
        let s = target.datagram_stats();
        async move { (s.dropped_unauthenticated == before.dropped_unauthenticated + 2).then_some(()) }
    })
    .await;
    // The genuine datagram is accepted once, then dropped as a replay every time.
    tap.send_to(&captured, target_addr).await.unwrap();
    wait_for("the genuine datagram to be accepted", DEADLINE, || {
        let s = target.datagram_stats();
        async move { (s.received > before.received).then_some(()) }
    })
    .await;
    for _ in 0..3 {
        tap.send_to(&captured, target_addr).await.unwrap();
    }
    let after = wait_for("the replays to be dropped", DEADLINE, || {
        let s = target.datagram_stats();
        async move { (s.dropped_replayed == before.dropped_replayed + 3).then_some(s) }
    })
    .await;
    assert_eq!(after.dropped_malformed, before.dropped_malformed);
    // The member is healthy.
    let map = target.map::<String, u64>("m");
    map.put("k", &1).await.unwrap();
    assert_eq!(map.get("k").await.unwrap(), Some(1));
    drop(sender);
    drop(target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_rotates_without_downtime() {
    const OLD: &str = "the old secret, sixteen+ bytes";
    const NEW: &str = "the new secret, sixteen+ bytes";
    fn with(secret: &'static str, accepted: &'static [&'static str]) -> impl Fn(&mut GridConfig) {
        move |c: &mut GridConfig| {
            c.security.secret = Some(Secret::new(secret));
            c.security.accepted_secrets = accepted.iter().map(Secret::new).collect();
        }
    }
    async fn check(cluster: &Cluster, n: u64) {
        for grid in cluster.live() {
            let m = grid.map::<String, u64>("m");
            for i in 0..n {
                assert_eq!(m.get(&format!("k{i}")).await.unwrap(), Some(i), "k{i}");
            }
        }
    }
    // Step 1: a member on the old secret, one that accepts the new one beside it.
    let mut cluster = Cluster::start_with(1, with(OLD, &[])).await;
    let mut config = cluster.config();
    with(OLD, &[NEW])(&mut config);
    cluster.add_with(config).await;
    cluster.wait_converged().await;
    let map = cluster.grid(1).map::<String, u64>("m");
    for i in 0..50u64 {
        map.put(&format!("k{i}"), &i).await.unwrap();
    }
    check(&cluster, 50).await;

    // A member that knows only the new secret cannot talk to one that knows only the old.
    let mut config = cluster.config();
    config.seeds = vec![cluster.grid(0).local_member().gossip_addr];
    config.join_timeout = Duration::from_millis(300);
    with(NEW, &[])(&mut config);
    let before = cluster.grid(0).datagram_stats().dropped_unauthenticated;
    let stranger = Grid::join(config).await.unwrap();
    wait_for(
        "the new-only member's datagrams to be dropped",
        DEADLINE,
        || {
            let dropped = cluster.grid(0).datagram_stats().dropped_unauthenticated;
            async move { (dropped > before).then_some(()) }
        },
    )
    .await;
    assert_eq!(stranger.members().len(), 1);
    drop(stranger);

    // Step 2: the old-only member restarts as one that signs with the new secret and accepts
    // the old (a graceful leave, then a new member): the cluster and its data stay.
    cluster.grid(0).leave().await.unwrap();
    cluster.slots[0].grid = None;
    let mut config = cluster.config();
    with(NEW, &[OLD])(&mut config);
    cluster.add_with(config).await;
    cluster.wait_converged().await;
    cluster.wait_table_settled().await;
    check(&cluster, 50).await;
    let map = cluster.grid(2).map::<String, u64>("m");
    for i in 50..100u64 {
        map.put(&format!("k{i}"), &i).await.unwrap();
    }
    check(&cluster, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_values_and_batches_are_refused_and_nothing_is_stored() {
    // Member 0 has small limits; member 1 larger ones, so member 0 enforces its own on calls
    // from member 1 as it would on a hostile peer's.
    let mut cluster = Cluster::start_with(1, |c| {
        c.max_value_size = 1024;
        c.max_batch_keys = 10;
        c.max_rpc_message_size = c.min_rpc_message_size();
    })
    .await;
    let mut config = cluster.config();
    config.max_value_size = 16 << 20;
    config.max_batch_keys = 1000;
    config.max_rpc_message_size = config.min_rpc_message_size();
    cluster.add_with(config).await;
    cluster.wait_table_settled().await;
    let small = cluster.grid(0).map::<String, Vec<u8>>("m");
    let large = cluster.grid(1).map::<String, Vec<u8>>("m");

    // Refused where it is written, before anything is sent.
    match small.put("k", &vec![7u8; 2000]).await {
        Err(Error::TooLarge {
            what: "value",
            max: 1024,
            ..
        }) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let batch: Vec<(String, Vec<u8>)> = (0..11).map(|i| (format!("b{i}"), vec![1u8])).collect();
    match small.put_all(batch.clone()).await {
        Err(Error::TooManyKeys { count: 11, max: 10 }) => {}
        other => panic!("expected TooManyKeys, got {other:?}"),
    }
    let keys: Vec<String> = batch.iter().map(|(k, _)| k.clone()).collect();
    match small.get_all(&keys).await {
        Err(Error::TooManyKeys { count: 11, max: 10 }) => {}
        other => panic!("expected TooManyKeys, got {other:?}"),
    }

    // Refused by the owner: member 0 owns the key, member 1 writes it.
    let owned_by_0 = (0..)
        .map(|i| format!("key-{i}"))
        .find(|k| large.owner(k).unwrap() == Some(cluster.grid(0).local_member().id))
        .unwrap();
    match large.put(&owned_by_0, &vec![7u8; 2000]).await {
        Err(Error::TooLarge {
            what: "value",
            size,
            max: 1024,
        }) => assert!(size > 2000),
        other => panic!("expected the owner's TooLarge, got {other:?}"),
    }
    // Beyond the owner's rpc message limit: its transport refuses the message.
    // (About 4.2 MB for member 0: a replication batch and one entry.)
    match large.put(&owned_by_0, &vec![7u8; 6 << 20]).await {
        Err(Error::TooLarge {
            what: "rpc message",
            ..
        }) => {}
        other => panic!("expected the owner's message limit, got {other:?}"),
    }
    // A batch from member 1 with one oversized value for member 0 stores nothing there.
    let mixed: Vec<(String, Vec<u8>)> = (0..)
        .map(|i| format!("mixed-{i}"))
        .filter(|k| large.owner(k).unwrap() == Some(cluster.grid(0).local_member().id))
        .take(5)
        .enumerate()
        .map(|(i, k)| (k, vec![1u8; if i == 3 { 3000 } else { 10 }]))
        .collect();
    match large.put_all(mixed.clone()).await {
        Err(Error::TooLarge {
            what: "value",
            max: 1024,
            ..
        }) => {}
        other => panic!("expected the owner's TooLarge, got {other:?}"),
    }
    for (k, _) in &mixed {
        assert_eq!(small.get(k).await.unwrap(), None, "{k} was stored");
    }
    // So is a batch beyond the owner's key count.
    let many: Vec<(String, Vec<u8>)> = (0..)
        .map(|i| format!("many-{i}"))
        .filter(|k| large.owner(k).unwrap() == Some(cluster.grid(0).local_member().id))
        .take(11)
        .map(|k| (k, vec![1u8]))
        .collect();
    match large.put_all(many.clone()).await {
        Err(Error::TooManyKeys { count: 11, max: 10 }) => {}
        other => panic!("expected the owner's TooManyKeys, got {other:?}"),
    }
    for (k, _) in &many {
        assert_eq!(small.get(k).await.unwrap(), None, "{k} was stored");
    }
    assert_eq!(small.get(&owned_by_0).await.unwrap(), None);

    // Both members keep serving, over the same connections.
    small.put(&owned_by_0, &vec![1u8; 100]).await.unwrap();
    assert_eq!(large.get(&owned_by_0).await.unwrap(), Some(vec![1u8; 100]));
    assert_eq!(cluster.grid(0).members().len(), 2);
}

/// A CA and the certificates it signs, written to a fresh directory.
struct Pki {
    dir: PathBuf,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new(label: &str) -> Pki {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "peergrid-tls-{}-{}-{label}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("peergrid test CA {label}"),
        );
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        Pki { dir, ca }
    }

    /// A certificate for 127.0.0.1 signed by the CA: (cert path, key path, cert PEM, key PEM).
    fn issue(&self, name: &str) -> (PathBuf, PathBuf, String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (cert_path, key_path) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path, cert.pem(), key.serialize_pem())
    }

    fn ca_pem(&self) -> String {
        self.ca.pem()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mutual_tls_cluster_works_and_refuses_callers_without_a_certificate() {
    let pki = Pki::new("cluster");
    let tls_for = |name: &str| {
        let (cert, key, ..) = pki.issue(name);
        TlsConfig {
            cert,
            key,
            ca: pki.dir.join("ca.pem"),
            ..TlsConfig::default()
        }
    };
    let mut cluster = Cluster::start_with(0, |_| {}).await;
    for i in 0..3 {
        let mut config = cluster.config();
        secured(&mut config, SECRET);
        config.security.tls = Some(tls_for(&format!("member{i}")));
        cluster.add_with(config).await;
    }
    cluster.wait_converged().await;
    cluster.wait_table_settled().await;

    // End to end: map, queue and lock across members, over mutual TLS.
    let map = cluster.grid(0).map::<String, u64>("m");
    for i in 0..100u64 {
        map.put(&format!("k{i}"), &i).await.unwrap();
    }
    for grid in cluster.live() {
        let m = grid.map::<String, u64>("m");
        for i in 0..100u64 {
            assert_eq!(m.get(&format!("k{i}")).await.unwrap(), Some(i));
        }
    }
    cluster.grid(1).queue::<u64>("q").offer(&5).await.unwrap();
    assert_eq!(
        cluster.grid(2).queue::<u64>("q").poll().await.unwrap(),
        Some(5)
    );
    let guard = cluster.grid(2).lock("l").lock().await.unwrap();
    assert!(cluster.grid(0).lock("l").is_locked().await.unwrap());
    guard.unlock().await.unwrap();

    let rpc = cluster.grid(0).local_member().rpc_addr;
    let url = format!("https://{rpc}");
    let call = |tls: ClientTlsConfig| {
        let url = url.clone();
        async move {
            let channel = Endpoint::from_shared(url)
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect_timeout(Duration::from_secs(5))
                .connect()
                .await;
            match channel {
                Ok(channel) => raw_call(channel, "Echo", None).await,
                Err(_) => tonic::Code::Unavailable,
            }
        }
    };
    let ca = Certificate::from_pem(pki.ca_pem());
    // No client certificate: the handshake fails.
    // (With TLS 1.3 the client learns it at its first read: the connection is closed.)
    // Unauthenticated would mean the call got through TLS to the credential check.
    let refused = |code| !matches!(code, tonic::Code::Ok | tonic::Code::Unauthenticated);
    let code = call(ClientTlsConfig::new().ca_certificate(ca.clone())).await;
    assert!(refused(code), "a caller without a certificate got {code:?}");
    // A certificate from another CA: refused too.
    let rogue = Pki::new("rogue");
    let (.., cert, key) = rogue.issue("rogue");
    let code = call(
        ClientTlsConfig::new()
            .ca_certificate(ca.clone())
            .identity(Identity::from_pem(cert, key)),
    )
    .await;
    assert!(
        refused(code),
        "a caller with a foreign certificate got {code:?}"
    );
    // Plain text to a TLS port: no answer.
    let plain = Endpoint::from_shared(format!("http://{rpc}"))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plain {
        assert_ne!(raw_call(channel, "Echo", None).await, tonic::Code::Ok);
    }
    // A valid certificate gets through TLS, and still needs the cluster credential.
    let (.., cert, key) = pki.issue("client");
    let code = call(
        ClientTlsConfig::new()
            .ca_certificate(ca)
            .identity(Identity::from_pem(cert, key)),
    )
    .await;
    assert_eq!(code, tonic::Code::Unauthenticated);

    // The members are healthy after all that.
    map.put("after", &1).await.unwrap();
    assert_eq!(
        cluster
            .grid(2)
            .map::<String, u64>("m")
            .get("after")
            .await
            .unwrap(),
        Some(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_files_and_weak_secrets_are_refused_at_join() {
    let pki = Pki::new("files");
    let (cert, key, ..) = pki.issue("m");
    let mut config = GridConfig::ephemeral();
    config.security.tls = Some(TlsConfig {
        cert: cert.clone(),
        key: pki.dir.join("missing.key"),
        ca: pki.dir.join("ca.pem"),
        ..TlsConfig::default()
    });
    match Grid::join(config.clone()).await {
        Err(Error::Config(peergrid::ConfigError::Tls {
            field: "security.tls.key",
            ..
        })) => {}
        other => panic!("expected a TLS config error, got {:?}", other.map(|_| ())),
    }
    // A certificate with another certificate's key.
    let (_, other_key, ..) = pki.issue("other");
    config.security.tls = Some(TlsConfig {
        cert,
        key: other_key,
        ca: pki.dir.join("ca.pem"),
        ..TlsConfig::default()
    });
    assert!(matches!(
        Grid::join(config).await.map(|_| ()),
        Err(Error::Config(peergrid::ConfigError::Tls { .. }))
    ));
    let _ = key;
    let weak = GridConfig {
        security: SecurityConfig {
            secret: Some(Secret::new("short")),
            ..SecurityConfig::default()
        },
        ..GridConfig::ephemeral()
    };
    assert!(matches!(
        weak.validate(),
        Err(peergrid::ConfigError::Range {
            field: "security.secret",
            ..
        })
    ));
    // Beyond loopback without a secret: refused unless asked for.
    let open = GridConfig {
        gossip_bind: "0.0.0.0:0".parse().unwrap(),
        gossip_advertise: Some("192.0.2.1:5701".parse().unwrap()),
        ..GridConfig::ephemeral()
    };
    assert!(matches!(
        open.validate(),
        Err(peergrid::ConfigError::Address {
            field: "gossip_bind",
            ..
        })
    ));
    let mut allowed = open;
    allowed.security.allow_unauthenticated = true;
    allowed.validate().unwrap();
    // Secrets never show in debug output.
    let shown = format!("{:?}", Secret::new(SECRET));
    assert!(!shown.contains("horse"), "{shown}");
}
