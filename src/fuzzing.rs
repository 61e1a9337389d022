//! Entry points for fuzzing and property tests: every decoder that sees bytes from the network
//! or from storage, fed arbitrary input. Each function must return without panicking, whatever
//! the bytes; that is all a fuzzer checks.
//!
//! Built with the `fuzzing` feature (the `fuzz/` targets use it) and in tests. Not part of the
//! API.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use foca::{AccumulatingRuntime, Foca, NoCustomBroadcast, PostcardCodec};
use prost::Message;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::{Deserialize, Serialize};

use crate::config::{SecurityConfig, SwimConfig};
use crate::membership::frame::{self, Kind};
use crate::membership::identity::Identity;
use crate::membership::{MemberId, driver::SwimNode};
use crate::rpc::proto;
use crate::security::{Keyring, ReplayGuard};
use crate::split_brain::discovery::ClusterView;

/// The cluster name the datagram entry points check against.
pub const CLUSTER: &str = "fuzz";
/// The secret of the signed variant.
pub const SECRET: &str = "fuzzing secret, 16+ bytes";

/// Runs a datagram through the receive path: framing, authentication (with and without a
/// secret) and the replay window, then the payload decoder of its kind, foca included.
pub fn datagram(bytes: &[u8]) {
    let cluster = frame::cluster_hash(CLUSTER);
    let _ = frame::read(bytes, cluster);
    let now = std::time::Instant::now();
    for secret in [None, Some(SECRET)] {
        let keys = keyring(secret);
        let mut replay = ReplayGuard::new(std::time::Duration::from_secs(60));
        // Twice: the second pass meets the replay window.
        for _ in 0..2 {
            if let Ok((kind, payload)) = frame::open(bytes, cluster, &keys, &mut replay, 0, now) {
                datagram_payload(kind, payload);
            }
        }
    }
    // The payload decoders on the raw bytes too, so a fuzzer reaches them without first
    // finding a valid header.
    for kind in [
        Kind::Swim,
        Kind::Leave,
        Kind::Probe,
        Kind::MergeOrder,
        Kind::Heartbeat,
    ] {
        datagram_payload(kind, bytes);
    }
}

/// Decodes `payload` as a datagram of `kind`, as the membership task does.
pub(crate) fn datagram_payload(kind: Kind, payload: &[u8]) {
    match kind {
        Kind::Swim => {
            let mut foca = swim_node();
            let mut runtime = AccumulatingRuntime::new();
            let _ = foca.handle_data(payload, &mut runtime);
        }
        Kind::Leave => {
            let _ = postcard::from_bytes::<Identity>(payload);
        }
        Kind::Probe | Kind::ProbeReply => {
            let _ = postcard::from_bytes::<ClusterView>(payload);
        }
        Kind::MergeOrder => {
            let _ = postcard::from_bytes::<(Identity, Vec<SocketAddr>)>(payload);
        }
        Kind::Heartbeat => {
            let _ = postcard::from_bytes::<crate::membership::Heartbeat>(payload);
        }
    }
}

/// Signs a datagram as a member with [`SECRET`] would, for seed corpora.
pub fn sealed_datagram(kind: u8, payload: &[u8], counter: u64) -> Vec<u8> {
    let kind = match kind % 6 {
        0 => Kind::Swim,
        1 => Kind::Leave,
        2 => Kind::Probe,
        3 => Kind::ProbeReply,
        4 => Kind::MergeOrder,
        _ => Kind::Heartbeat,
    };
    let mut out = Vec::new();
    frame::write_header(&mut out, kind, frame::cluster_hash(CLUSTER));
    out.extend_from_slice(payload);
    let stamp = frame::Stamp {
        instance: 1,
        counter,
        sent_ms: 0,
    };
    frame::seal(&mut out, &keyring(Some(SECRET)), &stamp);
    out
}

fn keyring(secret: Option<&str>) -> Keyring {
    Keyring::new(
        CLUSTER,
        &SecurityConfig {
            secret: secret.map(crate::config::Secret::new),
            ..SecurityConfig::default()
        },
    )
}

fn swim_node() -> SwimNode {
    let addr: SocketAddr = ([127, 0, 0, 1], 9).into();
    let identity = Identity {
        id: MemberId(9),
        gossip: addr,
        rpc: addr,
        generation: 1,
        name: Arc::from("fuzz"),
    };
    Foca::<_, _, _, NoCustomBroadcast>::new(
        identity,
        SwimConfig::default().to_foca(1344),
        SmallRng::seed_from_u64(9),
        PostcardCodec,
    )
}

/// A user type with the serde shapes applications use: nested structs, enums, options,
/// sequences, maps, floats, chars.
#[derive(Debug, Serialize, Deserialize)]
pub struct Sample {
    id: u64,
    name: String,
    tags: Vec<String>,
    score: Option<f64>,
    kind: SampleKind,
    attributes: BTreeMap<String, i32>,
    initial: char,
    raw: Vec<u8>,
}

/// The enum of [`Sample`].
#[derive(Debug, Serialize, Deserialize)]
pub enum SampleKind {
    /// A unit variant.
    Plain,
    /// A newtype variant.
    Counted(u32),
    /// A struct variant.
    Named {
        /// A nested string.
        label: String,
        /// A nested tuple.
        pair: (i8, u128),
    },
}

/// Decodes `bytes` as a typed key or value of many types, as `Map`, `Queue` and the merge
/// policies do, and as the internal records stored in maps (lock states, queue items).
pub fn typed_value(bytes: &[u8]) {
    use crate::codec::decode;
    let _ = decode::<String>(bytes);
    let _ = decode::<Vec<u8>>(bytes);
    let _ = decode::<bytes::Bytes>(bytes);
    let _ = decode::<u64>(bytes);
    let _ = decode::<i32>(bytes);
    let _ = decode::<f64>(bytes);
    let _ = decode::<bool>(bytes);
    let _ = decode::<char>(bytes);
    let _ = decode::<()>(bytes);
    let _ = decode::<Option<String>>(bytes);
    let _ = decode::<Vec<String>>(bytes);
    let _ = decode::<(u64, String, Vec<u32>)>(bytes);
    let _ = decode::<HashMap<String, u64>>(bytes);
    let _ = decode::<Sample>(bytes);
    let _ = decode::<Vec<Sample>>(bytes);
    let _ = crate::lock::state::LockState::decode(bytes);
    let _ = crate::queue::owner::decode(bytes);
}

/// Decodes `bytes` as every rpc message a member receives, and runs the conversions the server
/// applies to them.
pub fn rpc_message(bytes: &[u8]) {
    if let Ok(request) = proto::MapRequest::decode(bytes) {
        let _ = crate::routing::op_from_proto(&request);
        if let Some(holder) = &request.holder {
            let _ = crate::routing::holder_from_proto(holder);
        }
    }
    if let Ok(table) = proto::Table::decode(bytes) {
        let _ = crate::partition::table::PartitionTable::from_proto(&table, 271);
    }
    if let Ok(event) = proto::EntryEvent::decode(bytes) {
        let _ = crate::map::listen::RawEntryEvent::from_proto(&Arc::from("m"), event);
    }
    if let Ok(answer) = proto::LockAnswer::decode(bytes) {
        let _ = crate::routing::lock_answer_from_proto(&answer);
    }
    let _ = proto::MapBatchRequest::decode(bytes);
    let _ = proto::MapScanRequest::decode(bytes);
    let _ = proto::ReplicateRequest::decode(bytes);
    let _ = proto::SnapshotChunk::decode(bytes);
    let _ = proto::FetchSnapshotRequest::decode(bytes);
    let _ = proto::LeavingRequest::decode(bytes);
    let _ = proto::ReplicaStatesRequest::decode(bytes);
    let _ = proto::ListenRequest::decode(bytes);
    let _ = proto::InvalidationsRequest::decode(bytes);
    let _ = proto::MemberInfoRequest::decode(bytes);
    let _ = proto::MapResponse::decode(bytes);
    let _ = proto::MapBatchResponse::decode(bytes);
    let _ = proto::StatusRequest::decode(bytes);
    if let Ok(request) = proto::ClientMapRequest::decode(bytes) {
        let _ = proto::ClientMapOp::try_from(request.op);
    }
    // What a `Client` receives from a member.
    if let Ok(status) = proto::StatusResponse::decode(bytes) {
        for member in status.members.iter().chain(status.member.as_ref()) {
            let _ = crate::client::identity_of(member);
        }
        let _ = crate::metrics::wire::from_proto(status.metrics.unwrap_or_default());
    }
    let _ = proto::ClientMapResponse::decode(bytes);
}

/// The property test CI runs: random bytes, and valid encodings with random mutations (bit
/// flips, overwrites, truncations, insertions, splices), fed to every decoder above.
#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Valid inputs for every decoder: datagrams of each kind (signed and unsigned), typed
    /// values, internal records and rpc messages.
    fn seeds() -> Vec<Vec<u8>> {
        let addr: SocketAddr = ([127, 0, 0, 1], 5701).into();
        let identity = Identity {
            id: MemberId(7),
            gossip: addr,
            rpc: addr,
            generation: 3,
            name: Arc::from("member-7"),
        };
        let view = ClusterView {
            sender: identity.clone(),
            coordinator: (1, 7),
            size: 3,
            members: vec![addr, addr],
        };
        let mut out = vec![
            postcard::to_stdvec(&identity).unwrap(),
            postcard::to_stdvec(&view).unwrap(),
            postcard::to_stdvec(&(identity.clone(), vec![addr])).unwrap(),
        ];
        // A real foca announce.
        let mut foca = swim_node();
        let mut runtime = AccumulatingRuntime::new();
        foca.announce(Identity::placeholder(addr), &mut runtime)
            .unwrap();
        while let Some((_, data)) = runtime.to_send() {
            out.push(data.to_vec());
        }
        for (kind, payload) in out.clone().into_iter().enumerate() {
            out.push(sealed_datagram(kind as u8, &payload, kind as u64));
            let mut plain = Vec::new();
            frame::write_header(&mut plain, Kind::Leave, frame::cluster_hash(CLUSTER));
            plain.extend_from_slice(&payload);
            out.push(plain);
        }
        let sample = Sample {
            id: 1,
            name: "n".into(),
            tags: vec!["a".into(), "b".into()],
            score: Some(0.5),
            kind: SampleKind::Named {
                label: "l".into(),
                pair: (-1, 1 << 100),
            },
            attributes: [("x".to_string(), 3)].into(),
            initial: 'é',
            raw: vec![0, 1, 2],
        };
        out.push(crate::codec::encode(&sample).unwrap().to_vec());
        out.push(
            crate::codec::encode(&vec![Some(3u64), None])
                .unwrap()
                .to_vec(),
        );
        out.push(
            crate::codec::encode(&(5u64, "s", vec![1u32]))
                .unwrap()
                .to_vec(),
        );
        out.push(
            proto::MapRequest {
                table_version: 3,
                partition: 5,
                map: "m".into(),
                key: b"k".to_vec().into(),
                op: proto::MapOp::ReplaceIfEqual as i32,
                value: b"v".to_vec().into(),
                expected: b"e".to_vec().into(),
                ttl_ms: Some(100),
                holder: Some(proto::LockHolder {
                    member: 1,
                    generation: 2,
                    id: 3,
                }),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        out.push(
            proto::MapBatchRequest {
                table_version: 1,
                map: "m".into(),
                put: true,
                entries: vec![proto::BatchEntry {
                    partition: 1,
                    key: b"k".to_vec().into(),
                    value: b"v".to_vec().into(),
                }],
            }
            .encode_to_vec(),
        );
        let member = proto::MemberInfoResponse {
            member_id: 7,
            name: "m".into(),
            gossip_addr: "127.0.0.1:5701".into(),
            rpc_addr: "127.0.0.1:5701".into(),
            ..Default::default()
        };
        let mut metrics = crate::metrics::wire::to_proto(&crate::Metrics {
            members: 1,
            partition_count: 271,
            partitions_owned: 271,
            partitions_backed_up: 0,
            migrations: Default::default(),
            maps: vec![("m".into(), Default::default())],
            replication_lag: 0,
            read_latency: Default::default(),
            write_latency: Default::default(),
            datagrams: Default::default(),
        });
        metrics.read_latency = Some(proto::LatencyMetrics {
            count: 3,
            p50_nanos: 1000,
            p99_nanos: 9000,
        });
        out.push(
            proto::StatusResponse {
                member: Some(member.clone()),
                members: vec![member],
                table_version: 3,
                metrics: Some(metrics),
                safe_checked: true,
                safe: true,
                safe_error: String::new(),
            }
            .encode_to_vec(),
        );
        out.push(
            proto::ClientMapRequest {
                map: "m".into(),
                op: proto::ClientMapOp::Put as i32,
                key: b"k".to_vec().into(),
                value: b"v".to_vec().into(),
            }
            .encode_to_vec(),
        );
        out
    }

    /// A seed with up to eight random edits.
    fn mutated() -> impl Strategy<Value = Vec<u8>> {
        let seeds = seeds();
        let count = seeds.len();
        (
            0..count,
            prop::collection::vec((0u8..5, any::<u16>(), any::<u8>()), 1..8),
        )
            .prop_map(move |(i, edits)| {
                let mut bytes = seeds[i].clone();
                for (op, at, byte) in edits {
                    let len = bytes.len();
                    let at = usize::from(at) % (len + 1);
                    match op {
                        0 if at < len => bytes[at] ^= 1 << (byte % 8),
                        1 if at < len => bytes[at] = byte,
                        2 => bytes.truncate(at),
                        3 => bytes.insert(at, byte),
                        _ => {
                            let other = &seeds[usize::from(byte) % seeds.len()];
                            bytes.splice(at..at, other.iter().copied());
                        }
                    }
                }
                bytes
            })
    }

    fn inputs() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![prop::collection::vec(any::<u8>(), 0..512), mutated()]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        #[test]
        fn datagram_decoding_never_panics(bytes in inputs()) {
            datagram(&bytes);
        }

        #[test]
        fn typed_value_decoding_never_panics(bytes in inputs()) {
            typed_value(&bytes);
        }

        #[test]
        fn rpc_message_decoding_never_panics(bytes in inputs()) {
            rpc_message(&bytes);
        }
    }

    #[test]
    fn the_seeds_decode() {
        // The mutations start from valid inputs, so they reach past the first checks.
        let cluster = frame::cluster_hash(CLUSTER);
        let keys = keyring(Some(SECRET));
        let mut replay = ReplayGuard::new(std::time::Duration::from_secs(60));
        let opened = seeds()
            .iter()
            .filter(|s| {
                frame::open(s, cluster, &keys, &mut replay, 0, std::time::Instant::now()).is_ok()
            })
            .count();
        assert!(opened >= 4, "{opened} signed seeds open");
    }
}
