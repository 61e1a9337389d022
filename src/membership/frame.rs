//! Datagram framing: the header in front of every gossip datagram.
//!
//! ```text
//! 0      2        3      4                 12
//! +------+--------+------+-----------------+------------------
//! | "PG" | version| kind | cluster hash    | payload ...
//! +------+--------+------+-----------------+------------------
//! ```
//!
//! `cluster hash` is the XXH3-64 (seed 0) of the cluster name, big-endian. `kind` 0 carries a foca
//! (SWIM) message, kind 1 a leave notice (the leaving member's identity, postcard-encoded), kinds 2 to 4 the
//! split-brain probes, their answers and merge orders (postcard). A
//! datagram that is too short, has another magic, version or kind, or belongs to another cluster
//! is dropped and counted by the caller; decoding never panics.

/// The first two bytes of every datagram.
pub(crate) const MAGIC: [u8; 2] = *b"PG";
/// The framing version this build speaks.
pub(crate) const VERSION: u8 = 1;
/// Length of the header in bytes.
pub(crate) const HEADER_LEN: usize = 12;

/// What a datagram carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A foca SWIM message.
    Swim = 0,
    /// A member announcing that it leaves gracefully.
    Leave = 1,
    /// A coordinator looking for the other side of a split: its cluster view
    /// (`split_brain::discovery::ClusterView`, postcard), to be answered with the receiver's.
    Probe = 2,
    /// The answer to a probe: the receiver's cluster view.
    ProbeReply = 3,
    /// A coordinator ordering a member of its cluster to merge into another cluster: the
    /// coordinator's identity and the other cluster's gossip addresses (postcard).
    MergeOrder = 4,
}

/// Why a datagram was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// Shorter than the header, wrong magic, unknown version or kind: not a peergrid datagram.
    Malformed,
    /// A peergrid datagram of another cluster.
    ForeignCluster,
}

/// The stable hash of a cluster name that datagrams carry.
pub(crate) fn cluster_hash(cluster_name: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(cluster_name.as_bytes())
}

/// Writes the header for `kind` into `out`, which is cleared first.
pub(crate) fn write_header(out: &mut Vec<u8>, kind: Kind, cluster: u64) {
    out.clear();
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&cluster.to_be_bytes());
}

/// Checks the header and returns the kind and the payload.
pub(crate) fn read(datagram: &[u8], cluster: u64) -> Result<(Kind, &[u8]), FrameError> {
    let Some((header, payload)) = datagram.split_at_checked(HEADER_LEN) else {
        return Err(FrameError::Malformed);
    };
    if header[0..2] != MAGIC || header[2] != VERSION {
        return Err(FrameError::Malformed);
    }
    let kind = match header[3] {
        0 => Kind::Swim,
        1 => Kind::Leave,
        2 => Kind::Probe,
        3 => Kind::ProbeReply,
        4 => Kind::MergeOrder,
        _ => return Err(FrameError::Malformed),
    };
    let mut hash = [0u8; 8];
    hash.copy_from_slice(&header[4..12]);
    if u64::from_be_bytes(hash) != cluster {
        return Err(FrameError::ForeignCluster);
    }
    Ok((kind, payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng, rngs::SmallRng};

    #[test]
    fn header_round_trips() {
        let c = cluster_hash("peergrid");
        let mut buf = Vec::new();
        write_header(&mut buf, Kind::Leave, c);
        buf.extend_from_slice(b"payload");
        assert_eq!(read(&buf, c), Ok((Kind::Leave, &b"payload"[..])));
    }

    #[test]
    fn cluster_hash_is_pinned() {
        // XXH3-64 with seed 0; a change here breaks wire compatibility between versions.
        assert_eq!(cluster_hash(""), 0x2d06800538d394c2);
        assert_ne!(cluster_hash("a"), cluster_hash("b"));
    }

    #[test]
    fn foreign_and_malformed_datagrams_are_told_apart() {
        let mine = cluster_hash("mine");
        let mut buf = Vec::new();
        write_header(&mut buf, Kind::Swim, cluster_hash("theirs"));
        assert_eq!(read(&buf, mine), Err(FrameError::ForeignCluster));
        assert_eq!(read(b"PG", mine), Err(FrameError::Malformed));
        let mut bad_version = buf.clone();
        bad_version[2] = 9;
        assert_eq!(read(&bad_version, mine), Err(FrameError::Malformed));
        let mut bad_kind = buf.clone();
        bad_kind[3] = 200;
        assert_eq!(read(&bad_kind, mine), Err(FrameError::Malformed));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = SmallRng::seed_from_u64(0xF0CA);
        let c = cluster_hash("peergrid");
        for _ in 0..10_000 {
            let len = rng.random_range(0..64);
            let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            let _ = read(&bytes, c);
        }
    }
}
