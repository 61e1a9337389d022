//! Datagram framing: the header in front of every gossip datagram, and its authentication.
//!
//! ```text
//! 0      2        3      4              12       16         24        32        40
//! +------+--------+------+--------------+--------+----------+---------+---------+---------+-----+
//! | "PG" | version| kind | cluster hash | key id | instance | counter | sent ms | payload | tag |
//! +------+--------+------+--------------+--------+----------+---------+---------+---------+-----+
//! ```
//!
//! All integers are big-endian. `cluster hash` is the XXH3-64 (seed 0) of the cluster name.
//! `kind` 0 carries a foca (SWIM) message, kind 1 a leave notice (the leaving member's identity,
//! postcard-encoded), kinds 2 to 4 the split-brain probes, their answers and merge orders
//! (postcard), kind 5 a heartbeat (the sender's id and generation, postcard) that members with
//! split-brain protection send every peer, to count who they recently heard from. `key id`
//! names the secret that signed the datagram (0: unsigned, and no tag follows); `instance` is a random number the sending member drew when it started, `counter`
//! numbers its datagrams, and `sent ms` is its clock (Unix milliseconds). The `tag` (16 bytes,
//! signed datagrams only) is HMAC-SHA256, truncated, over everything before it (see
//! [`crate::security`]).
//!
//! A datagram that is too short, has another magic, version or kind, belongs to another cluster,
//! lacks a valid tag, or was seen before is dropped and counted by the caller; decoding never
//! panics.

use crate::security::{AuthError, Keyring, ReplayError, ReplayGuard, TAG_LEN};

/// The first two bytes of every datagram.
pub(crate) const MAGIC: [u8; 2] = *b"PG";
/// The framing version this build speaks.
pub(crate) const VERSION: u8 = 2;
/// Length of the header in bytes.
pub(crate) const HEADER_LEN: usize = 40;
/// Bytes of a datagram that are not payload: the header and room for the tag.
pub(crate) const OVERHEAD: usize = HEADER_LEN + TAG_LEN;

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
    /// A member's heartbeat: its id and generation (postcard).
    Heartbeat = 5,
}

/// Why a datagram was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// Shorter than the header, wrong magic, unknown version or kind: not a peergrid datagram.
    Malformed,
    /// A peergrid datagram of another cluster.
    ForeignCluster,
    /// No valid tag where one is needed (or a tag this member cannot check).
    Unauthenticated(AuthError),
    /// Seen before, or stamped outside the replay window.
    Replayed(ReplayError),
}

/// A datagram's header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) kind: Kind,
    pub(crate) key_id: u32,
    pub(crate) instance: u64,
    pub(crate) counter: u64,
    pub(crate) sent_ms: u64,
}

/// What a sender stamps on each datagram.
pub(crate) struct Stamp {
    pub(crate) instance: u64,
    pub(crate) counter: u64,
    pub(crate) sent_ms: u64,
}

/// The stable hash of a cluster name that datagrams carry.
pub(crate) fn cluster_hash(cluster_name: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(cluster_name.as_bytes())
}

/// Writes the header for `kind` into `out`, which is cleared first. The authentication fields
/// are zero until [`seal`].
pub(crate) fn write_header(out: &mut Vec<u8>, kind: Kind, cluster: u64) {
    out.clear();
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&cluster.to_be_bytes());
    out.extend_from_slice(&[0u8; HEADER_LEN - 12]);
}

/// Stamps a datagram written with [`write_header`] and a payload, and appends its tag when a
/// secret is configured.
pub(crate) fn seal(datagram: &mut Vec<u8>, keys: &Keyring, stamp: &Stamp) {
    if datagram.len() < HEADER_LEN {
        return;
    }
    datagram[12..16].copy_from_slice(&keys.signing_id().to_be_bytes());
    datagram[16..24].copy_from_slice(&stamp.instance.to_be_bytes());
    datagram[24..32].copy_from_slice(&stamp.counter.to_be_bytes());
    datagram[32..40].copy_from_slice(&stamp.sent_ms.to_be_bytes());
    if let Some(tag) = keys.sign(datagram) {
        datagram.extend_from_slice(&tag);
    }
}

/// Checks the header and returns it with everything after it (payload and tag).
pub(crate) fn read(datagram: &[u8], cluster: u64) -> Result<(Header, &[u8]), FrameError> {
    let Some((header, rest)) = datagram.split_at_checked(HEADER_LEN) else {
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
        5 => Kind::Heartbeat,
        _ => return Err(FrameError::Malformed),
    };
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&header[at..at + 8]);
        u64::from_be_bytes(b)
    };
    if u64_at(4) != cluster {
        return Err(FrameError::ForeignCluster);
    }
    let mut key_id = [0u8; 4];
    key_id.copy_from_slice(&header[12..16]);
    Ok((
        Header {
            kind,
            key_id: u32::from_be_bytes(key_id),
            instance: u64_at(16),
            counter: u64_at(24),
            sent_ms: u64_at(32),
        },
        rest,
    ))
}

/// Checks a received datagram: header, tag (when this member has a secret, or the datagram
/// claims one) and freshness. Returns its kind and payload.
pub(crate) fn open<'a>(
    datagram: &'a [u8],
    cluster: u64,
    keys: &Keyring,
    replay: &mut ReplayGuard,
    now_ms: u64,
    now: std::time::Instant,
) -> Result<(Kind, &'a [u8]), FrameError> {
    let (header, rest) = read(datagram, cluster)?;
    if !keys.is_enabled() {
        return if header.key_id == 0 {
            Ok((header.kind, rest))
        } else {
            Err(FrameError::Unauthenticated(AuthError::Missing))
        };
    }
    let Some(signed_len) = datagram
        .len()
        .checked_sub(TAG_LEN)
        .filter(|n| *n >= HEADER_LEN)
    else {
        return Err(FrameError::Unauthenticated(AuthError::Missing));
    };
    let (signed, tag) = datagram.split_at(signed_len);
    keys.verify(header.key_id, signed, tag)
        .map_err(FrameError::Unauthenticated)?;
    replay
        .check(header.instance, header.counter, header.sent_ms, now_ms, now)
        .map_err(FrameError::Replayed)?;
    Ok((header.kind, &signed[HEADER_LEN..]))
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
        let (header, payload) = read(&buf, c).unwrap();
        assert_eq!(header.kind, Kind::Leave);
        assert_eq!(payload, b"payload");
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
        assert_eq!(read(&buf, mine).err(), Some(FrameError::ForeignCluster));
        assert_eq!(read(b"PG", mine).err(), Some(FrameError::Malformed));
        let mut bad_version = buf.clone();
        bad_version[2] = 9;
        assert_eq!(read(&bad_version, mine).err(), Some(FrameError::Malformed));
        let mut bad_kind = buf.clone();
        bad_kind[3] = 200;
        assert_eq!(read(&bad_kind, mine).err(), Some(FrameError::Malformed));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = SmallRng::seed_from_u64(0xF0CA);
        let c = cluster_hash("peergrid");
        for _ in 0..10_000 {
            let len = rng.random_range(0..96);
            let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            let _ = read(&bytes, c);
        }
    }

    fn keyring(secret: Option<&str>) -> Keyring {
        Keyring::new(
            "peergrid",
            &crate::config::SecurityConfig {
                secret: secret.map(crate::config::Secret::new),
                ..Default::default()
            },
        )
    }

    fn sealed(keys: &Keyring, counter: u64, now_ms: u64) -> Vec<u8> {
        let mut buf = Vec::new();
        write_header(&mut buf, Kind::Swim, cluster_hash("peergrid"));
        buf.extend_from_slice(b"swim payload");
        let stamp = Stamp {
            instance: 42,
            counter,
            sent_ms: now_ms,
        };
        seal(&mut buf, keys, &stamp);
        buf
    }

    #[test]
    fn sealed_datagrams_open_once_and_only_untampered() {
        let keys = keyring(Some("sixteen bytes at least"));
        let c = cluster_hash("peergrid");
        let now = std::time::Instant::now();
        let t = 1_700_000_000_000;
        let mut guard = ReplayGuard::new(std::time::Duration::from_secs(60));
        let d = sealed(&keys, 1, t);
        assert_eq!(d.len(), OVERHEAD + b"swim payload".len());
        assert_eq!(
            open(&d, c, &keys, &mut guard, t, now),
            Ok((Kind::Swim, &b"swim payload"[..]))
        );
        assert_eq!(
            open(&d, c, &keys, &mut guard, t, now),
            Err(FrameError::Replayed(ReplayError::Seen))
        );
        // Every single flipped bit after the cluster hash breaks the tag (or the header).
        let d = sealed(&keys, 2, t);
        for i in 12..d.len() {
            for bit in 0..8 {
                let mut bad = d.clone();
                bad[i] ^= 1 << bit;
                assert!(
                    open(&bad, c, &keys, &mut guard, t, now).is_err(),
                    "byte {i} bit {bit}"
                );
            }
        }
        assert!(open(&d, c, &keys, &mut guard, t, now).is_ok());
        // Unsigned datagrams are refused by a member with a secret, and signed ones by a member
        // without one.
        let plain = sealed(&keyring(None), 3, t);
        assert_eq!(
            open(&plain, c, &keys, &mut guard, t, now),
            Err(FrameError::Unauthenticated(AuthError::Missing))
        );
        let mut open_guard = ReplayGuard::new(std::time::Duration::from_secs(60));
        assert!(open(&plain, c, &keyring(None), &mut open_guard, t, now).is_ok());
        assert_eq!(
            open(
                &sealed(&keys, 4, t),
                c,
                &keyring(None),
                &mut open_guard,
                t,
                now
            ),
            Err(FrameError::Unauthenticated(AuthError::Missing))
        );
        // Another secret.
        assert_eq!(
            open(
                &sealed(&keyring(Some("another sixteen bytes")), 5, t),
                c,
                &keys,
                &mut guard,
                t,
                now
            ),
            Err(FrameError::Unauthenticated(AuthError::UnknownKey))
        );
        // Stale.
        assert_eq!(
            open(&sealed(&keys, 6, t - 61_000), c, &keys, &mut guard, t, now),
            Err(FrameError::Replayed(ReplayError::OutsideWindow))
        );
    }
}
