//! Key to partition: a fixed, documented hash of the key's encoded bytes.
//!
//! The partition of a key is `XXH3-64(seed 0, bytes) mod partition_count`, where `bytes` is the
//! key's encoded form (see `codec`: raw UTF-8 for strings), or, when the key contains a Redis-style
//! hash tag, only the tag: the bytes between the first `{` and the first `}` after it, if there is
//! at least one byte between them. So `{user:1}:profile` and `{user:1}:cart` share a partition.
//! The algorithm never depends on the process, the platform or the run; tests pin known values.

/// The stable 64-bit hash of a key's encoded bytes, hash tags applied.
pub(crate) fn key_hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(hash_tag(key).unwrap_or(key))
}

/// The partition of a key's encoded bytes among `partition_count` partitions (must not be zero).
pub(crate) fn partition_of(key: &[u8], partition_count: u32) -> u32 {
    (key_hash(key) % u64::from(partition_count.max(1))) as u32
}

/// The hash tag of a key: the bytes between the first `{` and the next `}`, if not empty.
fn hash_tag(key: &[u8]) -> Option<&[u8]> {
    let open = key.iter().position(|&b| b == b'{')?;
    let rest = &key[open + 1..];
    let close = rest.iter().position(|&b| b == b'}')?;
    (close > 0).then(|| &rest[..close])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_pinned() {
        // These values are part of the wire contract: every member, every version, every platform.
        assert_eq!(key_hash(b""), 0x2d06800538d394c2);
        assert_eq!(
            partition_of(b"user:1", 271),
            (key_hash(b"user:1") % 271) as u32
        );
        let pinned: Vec<u32> = ["a", "user:1", "session:42", "{x}"]
            .iter()
            .map(|k| partition_of(k.as_bytes(), 271))
            .collect();
        assert_eq!(pinned, PINNED);
    }

    const PINNED: [u32; 4] = [PIN_A, PIN_USER1, PIN_SESSION42, PIN_X];
    const PIN_A: u32 = 192;
    const PIN_USER1: u32 = 239;
    const PIN_SESSION42: u32 = 94;
    /// `{x}` hashes only its tag, `x`.
    const PIN_X: u32 = 51;

    #[test]
    fn hash_tags_colocate_keys() {
        assert_eq!(hash_tag(b"{user:1}:profile"), Some(&b"user:1"[..]));
        assert_eq!(
            partition_of(b"{user:1}:profile", 271),
            partition_of(b"{user:1}:cart", 271)
        );
        assert_eq!(
            partition_of(b"{user:1}:cart", 271),
            partition_of(b"user:1", 271)
        );
        // Empty tag or no closing brace: the whole key is hashed.
        assert_eq!(hash_tag(b"{}:x"), None);
        assert_eq!(hash_tag(b"{abc"), None);
        assert_eq!(hash_tag(b"a{b}{c}"), Some(&b"b"[..]));
        assert_eq!(hash_tag(b"a}{b}"), Some(&b"b"[..]));
    }

    #[test]
    fn keys_spread_over_partitions() {
        let mut counts = vec![0u32; 271];
        for i in 0..271_000 {
            counts[partition_of(format!("key:{i}").as_bytes(), 271) as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*min > 850 && *max < 1150, "min {min} max {max}");
    }
}
