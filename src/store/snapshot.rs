//! Partition snapshots: the one extension point through which every kind of partition state
//! travels when a replica is copied.
//!
//! A [`Snapshot`] is a consistent copy of one partition, taken under its write lock (cheap: values
//! are reference-counted `Bytes`). It is sent as a stream of [`proto::SnapshotChunk`]s: a header
//! with the sequence number, digest and entry count, then the contents in chunks of about
//! [`crate::GridConfig::snapshot_chunk_size`], so neither side ever encodes or decodes one message the size of a partition.
//! The receiver collects the chunks in a [`Staging`] area and installs them only once the stream
//! is complete and matches its header; a stream cut halfway leaves the receiver's previous copy
//! untouched, and the transfer is simply retried.
//!
//! Maps are the only structure today; queues and locks add their own chunk kind here (an arm in
//! [`Snapshot::chunks`], [`Staging::push`] and [`Staged`]) and nothing else in the migration path
//! changes.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use super::{Entries, Record};
use crate::rpc::proto;

/// Why a received snapshot stream was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum SnapshotError {
    /// The stream did not start with a header, or had a second one.
    #[error("snapshot stream out of order: {0}")]
    OutOfOrder(&'static str),
    /// The stream ended with fewer or more entries than its header announced.
    #[error("snapshot stream incomplete: header announced {announced} entries, got {received}")]
    Incomplete {
        /// Entries the header announced.
        announced: u64,
        /// Entries received.
        received: u64,
    },
    /// The contents do not hash to the header's digest.
    #[error("snapshot digest mismatch")]
    Digest,
}

/// The digest contribution of one entry; a partition's digest is the wrapping sum over its
/// entries, so it does not depend on iteration order.
pub(crate) fn entry_digest(map: &str, key: &[u8], record: &Record) -> u64 {
    digest_of(
        map,
        key,
        &record.value,
        record.version,
        record.expires_at_ms,
    )
}

/// [`entry_digest`] of a stored entry.
pub(crate) fn stored_digest(map: &str, entry: &super::entries::Stored) -> u64 {
    digest_of(
        map,
        entry.key(),
        entry.value(),
        entry.version(),
        entry.expires_at_ms(),
    )
}

fn digest_of(map: &str, key: &[u8], value: &[u8], version: u64, expires_at_ms: u64) -> u64 {
    let mut bytes = Vec::with_capacity(map.len() + key.len() + value.len() + 18);
    bytes.extend_from_slice(map.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(key);
    bytes.push(0);
    bytes.extend_from_slice(value);
    bytes.extend_from_slice(&version.to_be_bytes());
    bytes.extend_from_slice(&expires_at_ms.to_be_bytes());
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

/// A consistent copy of one partition.
pub(crate) struct Snapshot {
    pub(crate) partition: u32,
    /// The sequence number of the last mutation it reflects.
    pub(crate) seq: u64,
    pub(crate) digest: u64,
    pub(crate) entries: u64,
    /// Approximate payload size (keys and values).
    pub(crate) bytes: u64,
    /// The copy's lineage (see `PartitionData::lineage`).
    pub(crate) lineage: u64,
    maps: Vec<(Arc<str>, CopiedEntries)>,
}

/// One map's entries, copied out of the partition.
type CopiedEntries = Vec<(Bytes, Record)>;

impl Snapshot {
    /// Copies `maps` (the caller holds the partition's write lock, so `seq` matches).
    pub(crate) fn take(
        partition: u32,
        seq: u64,
        maps: &dashmap::DashMap<Arc<str>, Arc<Entries>>,
    ) -> Self {
        let mut digest = 0u64;
        let mut entries = 0u64;
        let mut bytes = 0u64;
        let maps = maps
            .iter()
            .map(|m| {
                let name = m.key().clone();
                let mut copied: Vec<(Bytes, Record)> = Vec::with_capacity(m.value().len());
                m.value().for_each(|e| {
                    digest = digest.wrapping_add(stored_digest(&name, e));
                    bytes += (e.key().len() + e.value().len()) as u64;
                    copied.push((Bytes::copy_from_slice(e.key()), e.record()));
                });
                entries += copied.len() as u64;
                (name, copied)
            })
            .collect();
        Snapshot {
            partition,
            seq,
            digest,
            entries,
            bytes,
            lineage: 0,
            maps,
        }
    }

    /// The header of this snapshot; `full` says whether contents follow.
    pub(crate) fn header(&self, table_version: u64, full: bool) -> proto::SnapshotHeader {
        proto::SnapshotHeader {
            partition: self.partition,
            seq: self.seq,
            digest: self.digest,
            entries: if full { self.entries } else { 0 },
            table_version,
            full,
            lineage: self.lineage,
        }
    }

    /// The whole stream: the header, then the contents in chunks of about `chunk_bytes`. Chunks
    /// are cut lazily, as the stream is consumed.
    pub(crate) fn chunks(
        self,
        table_version: u64,
        chunk_bytes: usize,
    ) -> impl Iterator<Item = proto::SnapshotChunk> + Send + 'static {
        let header = proto::SnapshotChunk {
            part: Some(proto::snapshot_chunk::Part::Header(
                self.header(table_version, true),
            )),
        };
        let maps = self.maps.into_iter().flat_map(move |(name, entries)| {
            let mut entries = entries.into_iter().peekable();
            std::iter::from_fn(move || {
                entries.peek()?;
                let mut size = 0;
                let mut chunk = Vec::new();
                while size < chunk_bytes {
                    let Some((key, record)) = entries.next() else {
                        break;
                    };
                    size += key.len() + record.value.len() + 16;
                    chunk.push(proto::SnapshotEntry {
                        key,
                        record: Some(proto::Record::from(&record)),
                    });
                }
                Some(proto::SnapshotChunk {
                    part: Some(proto::snapshot_chunk::Part::Map(proto::SnapshotMap {
                        name: name.to_string(),
                        entries: chunk,
                    })),
                })
            })
        });
        std::iter::once(header).chain(maps)
    }
}

/// `chunks` as sent, ending right after the first chunk of contents (the header and one chunk)
/// when `fault` says this stream is to break. A receiver then sees an incomplete stream. Returns
/// whether it breaks.
pub(crate) fn maybe_broken<I: Iterator<Item = proto::SnapshotChunk>>(
    chunks: I,
    fault: Option<&crate::FaultSwitch>,
) -> (std::iter::Take<I>, bool) {
    let broken = fault.is_some_and(|f| f.take_stream_break());
    (chunks.take(if broken { 2 } else { usize::MAX }), broken)
}

/// A received snapshot, checked and ready to replace a partition's contents.
pub(crate) struct Staged {
    pub(crate) header: proto::SnapshotHeader,
    pub(crate) maps: HashMap<String, Entries>,
}

/// Collects a snapshot stream.
#[derive(Default)]
pub(crate) struct Staging {
    header: Option<proto::SnapshotHeader>,
    maps: HashMap<String, Entries>,
    received: u64,
    digest: u64,
}

impl Staging {
    /// The header, once received.
    pub(crate) fn header(&self) -> Option<&proto::SnapshotHeader> {
        self.header.as_ref()
    }

    /// Takes one chunk.
    pub(crate) fn push(&mut self, chunk: proto::SnapshotChunk) -> Result<(), SnapshotError> {
        match chunk.part {
            Some(proto::snapshot_chunk::Part::Header(header)) => {
                if self.header.is_some() {
                    return Err(SnapshotError::OutOfOrder("second header"));
                }
                self.header = Some(header);
            }
            Some(proto::snapshot_chunk::Part::Map(map)) => {
                if self.header.is_none() {
                    return Err(SnapshotError::OutOfOrder("contents before the header"));
                }
                let mut digest = 0u64;
                let mut records = Vec::with_capacity(map.entries.len());
                for entry in map.entries {
                    let record = Record::from(&entry.record.unwrap_or_default());
                    digest = digest.wrapping_add(entry_digest(&map.name, &entry.key, &record));
                    records.push((entry.key, record));
                }
                self.received += records.len() as u64;
                let announced = self.header.as_ref().map_or(0, |h| h.entries);
                if self.received > announced {
                    return Err(SnapshotError::Incomplete {
                        announced,
                        received: self.received,
                    });
                }
                self.digest = self.digest.wrapping_add(digest);
                let entries = self.maps.entry(map.name).or_default();
                for (key, record) in records {
                    entries.insert(&key, &record);
                }
            }
            None => return Err(SnapshotError::OutOfOrder("empty chunk")),
        }
        Ok(())
    }

    /// Checks the stream against its header once it ended.
    pub(crate) fn finish(self) -> Result<Staged, SnapshotError> {
        let header = self.header.ok_or(SnapshotError::OutOfOrder("no header"))?;
        if header.entries != self.received {
            return Err(SnapshotError::Incomplete {
                announced: header.entries,
                received: self.received,
            });
        }
        if header.digest != self.digest {
            return Err(SnapshotError::Digest);
        }
        Ok(Staged {
            header,
            maps: self.maps,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(entries: usize) -> dashmap::DashMap<Arc<str>, Arc<Entries>> {
        let maps = dashmap::DashMap::new();
        for name in ["a", "b"] {
            let map = Entries::new();
            for i in 0..entries {
                map.insert(
                    format!("k{i}").as_bytes(),
                    &Record {
                        value: Bytes::from(vec![i as u8; 100]),
                        version: i as u64 + 1,
                        ..Record::default()
                    },
                );
            }
            maps.insert(Arc::from(name), Arc::new(map));
        }
        maps
    }

    #[test]
    fn a_snapshot_streams_in_bounded_chunks_and_stages_exactly() {
        let maps = source(5_000);
        let snapshot = Snapshot::take(7, 42, &maps);
        assert_eq!(snapshot.entries, 10_000);
        let digest = snapshot.digest;
        let chunks: Vec<_> = snapshot.chunks(3, 64 << 10).collect();
        // 2 maps of ~580 KB each in 64 KiB chunks, plus the header.
        assert!(chunks.len() > 10, "{} chunks", chunks.len());
        let mut staging = Staging::default();
        for chunk in chunks {
            staging.push(chunk).unwrap();
        }
        let staged = staging.finish().unwrap();
        assert_eq!(staged.header.seq, 42);
        assert_eq!(staged.header.table_version, 3);
        assert_eq!(staged.header.digest, digest);
        assert_eq!(staged.maps["a"].len(), 5_000);
        assert_eq!(staged.maps["b"].get(&b"k9"[..]).unwrap().version, 10);
    }

    #[test]
    fn a_stream_cut_halfway_or_out_of_order_is_refused() {
        let maps = source(1_000);
        let chunks: Vec<_> = Snapshot::take(0, 1, &maps).chunks(1, 8 << 10).collect();
        let mut staging = Staging::default();
        for chunk in chunks.iter().take(chunks.len() / 2).cloned() {
            staging.push(chunk).unwrap();
        }
        assert!(matches!(
            staging.finish(),
            Err(SnapshotError::Incomplete {
                announced: 2_000,
                ..
            })
        ));

        let mut staging = Staging::default();
        assert_eq!(
            staging.push(chunks[1].clone()),
            Err(SnapshotError::OutOfOrder("contents before the header"))
        );
        staging.push(chunks[0].clone()).unwrap();
        assert_eq!(
            staging.push(chunks[0].clone()),
            Err(SnapshotError::OutOfOrder("second header"))
        );

        // A tampered entry is caught by the digest.
        let mut staging = Staging::default();
        for mut chunk in chunks.iter().cloned() {
            if let Some(proto::snapshot_chunk::Part::Map(map)) = &mut chunk.part {
                map.entries[0].record.as_mut().unwrap().version += 1;
            }
            staging.push(chunk).unwrap();
        }
        assert_eq!(staging.finish().err(), Some(SnapshotError::Digest));
    }
}
