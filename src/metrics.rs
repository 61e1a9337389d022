//! Operating figures: [`Metrics`], the snapshot [`crate::Grid::metrics`] returns, the operation
//! latency histograms behind it, and the optional HTTP listener that serves them as Prometheus
//! text on `/metrics` with a readiness probe on `/health`.

use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::map::stats::MapStats;
use crate::membership::DatagramStats;
use crate::partition::PartitionStats;

/// A snapshot of one member's figures, from [`crate::Grid::metrics`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Metrics {
    /// Live members this member sees, itself included.
    pub members: usize,
    /// Partitions in the table.
    pub partition_count: u32,
    /// Partitions this member leads (primary).
    pub partitions_owned: u32,
    /// Partitions this member backs up.
    pub partitions_backed_up: u32,
    /// Migrations, partition losses and repairs since the member started.
    pub migrations: PartitionStats,
    /// Per map (internal maps excluded), by name: operations served as primary, hits and
    /// misses, entries, bytes, near cache.
    pub maps: Vec<(String, MapStats)>,
    /// Mutations queued for this member's backups and not yet acknowledged: how far the
    /// backups trail the primaries here.
    pub replication_lag: u64,
    /// Latency of map reads called on this member (local or remote, as the caller sees it).
    pub read_latency: Latency,
    /// Latency of map writes called on this member, backups included.
    pub write_latency: Latency,
    /// The gossip socket's counters, drops by reason included.
    pub datagrams: DatagramStats,
}

impl Metrics {
    /// Gossip datagrams dropped for any reason.
    pub fn dropped_datagrams(&self) -> u64 {
        self.datagrams
            .dropped_by_reason()
            .iter()
            .map(|(_, n)| n)
            .sum()
    }
}

/// Map operation latency: one operation in 16 is timed (per thread), and the quantiles are
/// estimated from histogram buckets (each bucket 1.5 times the last, from 2 µs).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[non_exhaustive]
pub struct Latency {
    /// Operations timed since the member started (about one in 16 of those called).
    pub count: u64,
    /// Median, `None` before the first operation.
    pub p50: Option<Duration>,
    /// 99th percentile, `None` before the first operation.
    pub p99: Option<Duration>,
}

/// One operation in this many is timed: a local get takes well under a microsecond, and
/// timing each one would add a tenth to it.
pub(crate) const SAMPLE_EVERY: u32 = 16;

thread_local! {
    static OPS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// The latency histograms of map operations, shared by every handle of a member.
pub(crate) struct OpLatency {
    pub(crate) reads: Histogram,
    pub(crate) writes: Histogram,
}

impl OpLatency {
    pub(crate) fn new() -> Self {
        let histogram = |name: &str, help: &str| {
            let opts = HistogramOpts::new(name, help).buckets(
                prometheus::exponential_buckets(0.000_002, 1.5, 36)
                    .expect("constant, valid bucket parameters"),
            );
            Histogram::with_opts(opts).expect("constant, valid histogram options")
        };
        OpLatency {
            reads: histogram(
                "peergrid_map_read_seconds",
                "Latency of map reads called on this member",
            ),
            writes: histogram(
                "peergrid_map_write_seconds",
                "Latency of map writes called on this member, backups included",
            ),
        }
    }

    /// The start time of an operation to time, for one operation in [`SAMPLE_EVERY`] (counted
    /// per thread, so the hot path shares no counter).
    pub(crate) fn start(&self) -> Option<std::time::Instant> {
        OPS.with(|n| {
            let next = n.get().wrapping_add(1);
            n.set(next);
            (next % SAMPLE_EVERY == 0).then(std::time::Instant::now)
        })
    }

    pub(crate) fn record(&self, read: bool, elapsed: Duration) {
        let h = if read { &self.reads } else { &self.writes };
        h.observe(elapsed.as_secs_f64());
    }

    pub(crate) fn summary(histogram: &Histogram) -> Latency {
        let count = histogram.get_sample_count();
        let families = histogram.collect();
        let Some(h) = families
            .first()
            .and_then(|f| f.get_metric().first())
            .map(|m| m.get_histogram().clone())
        else {
            return Latency::default();
        };
        let buckets: Vec<(f64, u64)> = h
            .get_bucket()
            .iter()
            .map(|b| (b.upper_bound(), b.cumulative_count()))
            .collect();
        let quantile = |q: f64| -> Option<Duration> {
            if count == 0 {
                return None;
            }
            let rank = (q * count as f64).ceil().max(1.0) as u64;
            let mut lower = (0.0, 0u64);
            for &(bound, cumulative) in &buckets {
                if cumulative >= rank {
                    // Linear within the bucket.
                    let within = (rank - lower.1) as f64 / (cumulative - lower.1).max(1) as f64;
                    return Some(Duration::from_secs_f64(
                        lower.0 + (bound - lower.0) * within,
                    ));
                }
                lower = (bound, cumulative);
            }
            // Beyond the last bucket: its bound is the best estimate.
            Some(Duration::from_secs_f64(lower.0))
        };
        Latency {
            count,
            p50: quantile(0.5),
            p99: quantile(0.99),
        }
    }
}

/// The wire form of [`Metrics`], for [`crate::Client`] (`Status` rpc), and back: every field
/// travels, so a member's figures read remotely are the ones it reports locally.
pub(crate) mod wire {
    use std::time::Duration;

    use super::{Latency, Metrics};
    use crate::map::stats::MapStats;
    use crate::membership::DatagramStats;
    use crate::partition::PartitionStats;
    use crate::rpc::proto;

    fn latency_to(l: &Latency) -> proto::LatencyMetrics {
        let nanos =
            |d: Option<Duration>| d.map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        proto::LatencyMetrics {
            count: l.count,
            p50_nanos: nanos(l.p50),
            p99_nanos: nanos(l.p99),
        }
    }

    fn latency_from(l: Option<proto::LatencyMetrics>) -> Latency {
        let l = l.unwrap_or_default();
        let at = |n: u64| (l.count > 0).then(|| Duration::from_nanos(n));
        Latency {
            count: l.count,
            p50: at(l.p50_nanos),
            p99: at(l.p99_nanos),
        }
    }

    /// `metrics` as sent by the `Status` rpc.
    pub(crate) fn to_proto(m: &Metrics) -> proto::MemberMetrics {
        let d = &m.datagrams;
        let p = &m.migrations;
        proto::MemberMetrics {
            members: u32::try_from(m.members).unwrap_or(u32::MAX),
            partition_count: m.partition_count,
            partitions_owned: m.partitions_owned,
            partitions_backed_up: m.partitions_backed_up,
            migrations_started: p.migrations_started,
            migrations_finished: p.migrations_finished,
            partitions_lost: p.partitions_lost,
            migration_bytes_received: p.migration_bytes_received,
            migration_bytes_sent: p.migration_bytes_sent,
            backup_snapshot_bytes_sent: p.backup_snapshot_bytes_sent,
            anti_entropy_repairs: p.anti_entropy_repairs,
            replication_lag: m.replication_lag,
            read_latency: Some(latency_to(&m.read_latency)),
            write_latency: Some(latency_to(&m.write_latency)),
            datagrams_received: d.received,
            datagrams_sent: d.sent,
            dropped_malformed: d.dropped_malformed,
            dropped_foreign_cluster: d.dropped_foreign_cluster,
            dropped_oversized: d.dropped_oversized,
            dropped_invalid_payload: d.dropped_invalid_payload,
            dropped_by_fault_switch: d.dropped_by_fault_switch,
            dropped_unauthenticated: d.dropped_unauthenticated,
            dropped_replayed: d.dropped_replayed,
            send_errors: d.send_errors,
            maps: m
                .maps
                .iter()
                .map(|(name, s)| proto::MapMetrics {
                    name: name.clone(),
                    gets: s.gets,
                    hits: s.hits,
                    misses: s.misses,
                    puts: s.puts,
                    removes: s.removes,
                    expirations: s.expirations,
                    evictions: s.evictions,
                    owned_entries: s.owned_entries,
                    backup_entries: s.backup_entries,
                    owned_bytes: s.owned_bytes,
                    owned_memory_bytes: s.owned_memory_bytes,
                    near_cache_hits: s.near_cache_hits,
                    near_cache_misses: s.near_cache_misses,
                    near_cache_entries: s.near_cache_entries,
                    near_cache_evictions: s.near_cache_evictions,
                    near_cache_expirations: s.near_cache_expirations,
                    near_cache_invalidations: s.near_cache_invalidations,
                    near_cache_partitions_dropped: s.near_cache_partitions_dropped,
                })
                .collect(),
        }
    }

    /// The figures a `Status` answer carries.
    pub(crate) fn from_proto(m: proto::MemberMetrics) -> Metrics {
        Metrics {
            members: m.members as usize,
            partition_count: m.partition_count,
            partitions_owned: m.partitions_owned,
            partitions_backed_up: m.partitions_backed_up,
            migrations: PartitionStats {
                migrations_started: m.migrations_started,
                migrations_finished: m.migrations_finished,
                partitions_lost: m.partitions_lost,
                migration_bytes_received: m.migration_bytes_received,
                migration_bytes_sent: m.migration_bytes_sent,
                backup_snapshot_bytes_sent: m.backup_snapshot_bytes_sent,
                anti_entropy_repairs: m.anti_entropy_repairs,
            },
            maps: m
                .maps
                .into_iter()
                .map(|s| {
                    let stats = MapStats {
                        gets: s.gets,
                        hits: s.hits,
                        misses: s.misses,
                        puts: s.puts,
                        removes: s.removes,
                        expirations: s.expirations,
                        evictions: s.evictions,
                        owned_entries: s.owned_entries,
                        backup_entries: s.backup_entries,
                        owned_bytes: s.owned_bytes,
                        owned_memory_bytes: s.owned_memory_bytes,
                        near_cache_hits: s.near_cache_hits,
                        near_cache_misses: s.near_cache_misses,
                        near_cache_entries: s.near_cache_entries,
                        near_cache_evictions: s.near_cache_evictions,
                        near_cache_expirations: s.near_cache_expirations,
                        near_cache_invalidations: s.near_cache_invalidations,
                        near_cache_partitions_dropped: s.near_cache_partitions_dropped,
                    };
                    (s.name, stats)
                })
                .collect(),
            replication_lag: m.replication_lag,
            read_latency: latency_from(m.read_latency),
            write_latency: latency_from(m.write_latency),
            datagrams: DatagramStats {
                received: m.datagrams_received,
                sent: m.datagrams_sent,
                dropped_malformed: m.dropped_malformed,
                dropped_foreign_cluster: m.dropped_foreign_cluster,
                dropped_oversized: m.dropped_oversized,
                dropped_invalid_payload: m.dropped_invalid_payload,
                dropped_by_fault_switch: m.dropped_by_fault_switch,
                dropped_unauthenticated: m.dropped_unauthenticated,
                dropped_replayed: m.dropped_replayed,
                send_errors: m.send_errors,
            },
        }
    }
}

/// Gauges registered while rendering one scrape.
struct Families {
    registry: Registry,
    labelled: std::collections::HashMap<String, IntGaugeVec>,
}

impl Families {
    fn gauge(&self, name: &str, help: &str, value: u64) {
        if let Ok(g) = IntGauge::with_opts(Opts::new(name, help)) {
            g.set(i64::try_from(value).unwrap_or(i64::MAX));
            let _ = self.registry.register(Box::new(g));
        }
    }

    /// One sample of `name` labelled `label=value_label`; the family is created on first use.
    fn labelled(&mut self, name: &str, help: &str, label: &str, value_label: &str, value: u64) {
        if !self.labelled.contains_key(name) {
            let Ok(vec) = IntGaugeVec::new(Opts::new(name, help), &[label]) else {
                return;
            };
            if self.registry.register(Box::new(vec.clone())).is_err() {
                return;
            }
            self.labelled.insert(name.to_string(), vec);
        }
        if let Some(vec) = self.labelled.get(name) {
            vec.with_label_values(&[value_label])
                .set(i64::try_from(value).unwrap_or(i64::MAX));
        }
    }
}

/// Renders `metrics` and the latency histograms as Prometheus text (format 0.0.4).
pub(crate) fn render(metrics: &Metrics, latency: &OpLatency, ready: bool) -> String {
    let mut f = Families {
        registry: Registry::new(),
        labelled: std::collections::HashMap::new(),
    };
    f.gauge(
        "peergrid_ready",
        "1 when the member is joined and the cluster is safe",
        u64::from(ready),
    );
    f.gauge(
        "peergrid_members",
        "Live members this member sees",
        metrics.members as u64,
    );
    f.gauge(
        "peergrid_partitions",
        "Partitions in the table",
        u64::from(metrics.partition_count),
    );
    f.gauge(
        "peergrid_partitions_owned",
        "Partitions this member leads",
        u64::from(metrics.partitions_owned),
    );
    f.gauge(
        "peergrid_partitions_backed_up",
        "Partitions this member backs up",
        u64::from(metrics.partitions_backed_up),
    );
    f.gauge(
        "peergrid_replication_lag",
        "Mutations queued for backups, not yet acknowledged",
        metrics.replication_lag,
    );
    let m = &metrics.migrations;
    f.gauge(
        "peergrid_migrations_started",
        "Takeovers started since the member started",
        m.migrations_started,
    );
    f.gauge(
        "peergrid_migrations_finished",
        "Takeovers finished since the member started",
        m.migrations_finished,
    );
    f.gauge(
        "peergrid_partitions_lost",
        "Partitions taken over with no replica left",
        m.partitions_lost,
    );
    f.gauge(
        "peergrid_migration_bytes_received",
        "Bytes pulled from previous primaries",
        m.migration_bytes_received,
    );
    f.gauge(
        "peergrid_migration_bytes_sent",
        "Bytes streamed to new primaries",
        m.migration_bytes_sent,
    );
    let d = &metrics.datagrams;
    f.gauge(
        "peergrid_datagrams_received",
        "Gossip datagrams accepted",
        d.received,
    );
    f.gauge("peergrid_datagrams_sent", "Gossip datagrams sent", d.sent);
    for (reason, value) in d.dropped_by_reason() {
        f.labelled(
            "peergrid_datagrams_dropped",
            "Gossip datagrams dropped, by reason",
            "reason",
            reason,
            value,
        );
    }
    for (name, s) in &metrics.maps {
        for (metric, help, value) in [
            ("peergrid_map_gets", "Reads served as primary", s.gets),
            ("peergrid_map_hits", "Reads that found an entry", s.hits),
            ("peergrid_map_misses", "Reads that found none", s.misses),
            ("peergrid_map_puts", "Writes served as primary", s.puts),
            (
                "peergrid_map_entries",
                "Live entries this member leads",
                s.owned_entries,
            ),
            (
                "peergrid_map_backup_entries",
                "Entries this member backs up",
                s.backup_entries,
            ),
            (
                "peergrid_map_bytes",
                "Key and value bytes this member leads",
                s.owned_bytes,
            ),
            (
                "peergrid_map_near_cache_hits",
                "Reads the near cache answered",
                s.near_cache_hits,
            ),
            (
                "peergrid_map_near_cache_misses",
                "Reads the near cache could not answer",
                s.near_cache_misses,
            ),
            (
                "peergrid_map_near_cache_entries",
                "Entries in the near cache",
                s.near_cache_entries,
            ),
        ] {
            f.labelled(metric, help, "map", name, value);
        }
    }
    let _ = f.registry.register(Box::new(latency.reads.clone()));
    let _ = f.registry.register(Box::new(latency.writes.clone()));
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&f.registry.gather(), &mut out) {
        tracing::warn!(error = %e, "could not encode metrics");
    }
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_figure_survives_the_wire() {
        let mut map = MapStats::default();
        for (i, field) in [
            &mut map.gets,
            &mut map.hits,
            &mut map.misses,
            &mut map.puts,
            &mut map.removes,
            &mut map.expirations,
            &mut map.evictions,
            &mut map.owned_entries,
            &mut map.backup_entries,
            &mut map.owned_bytes,
            &mut map.owned_memory_bytes,
            &mut map.near_cache_hits,
            &mut map.near_cache_misses,
            &mut map.near_cache_entries,
            &mut map.near_cache_evictions,
            &mut map.near_cache_expirations,
            &mut map.near_cache_invalidations,
            &mut map.near_cache_partitions_dropped,
        ]
        .into_iter()
        .enumerate()
        {
            *field = 100 + i as u64;
        }
        let metrics = Metrics {
            members: 3,
            partition_count: 271,
            partitions_owned: 90,
            partitions_backed_up: 91,
            migrations: PartitionStats {
                migrations_started: 1,
                migrations_finished: 2,
                partitions_lost: 3,
                migration_bytes_received: 4,
                migration_bytes_sent: 5,
                backup_snapshot_bytes_sent: 6,
                anti_entropy_repairs: 7,
            },
            maps: vec![("a".into(), map), ("b".into(), MapStats::default())],
            replication_lag: 8,
            read_latency: Latency {
                count: 9,
                p50: Some(Duration::from_micros(10)),
                p99: Some(Duration::from_micros(11)),
            },
            write_latency: Latency::default(),
            datagrams: DatagramStats {
                received: 12,
                sent: 13,
                dropped_malformed: 14,
                dropped_foreign_cluster: 15,
                dropped_oversized: 16,
                dropped_invalid_payload: 17,
                dropped_by_fault_switch: 18,
                dropped_unauthenticated: 19,
                dropped_replayed: 20,
                send_errors: 21,
            },
        };
        assert_eq!(wire::from_proto(wire::to_proto(&metrics)), metrics);
    }

    #[test]
    fn quantiles_come_from_the_buckets() {
        let latency = OpLatency::new();
        assert_eq!(OpLatency::summary(&latency.reads), Latency::default());
        // 98 fast reads of 100 µs, 2 slow ones of 10 ms.
        for _ in 0..98 {
            latency.record(true, Duration::from_micros(100));
        }
        for _ in 0..2 {
            latency.record(true, Duration::from_millis(10));
        }
        let s = OpLatency::summary(&latency.reads);
        assert_eq!(s.count, 100);
        let (p50, p99) = (s.p50.unwrap(), s.p99.unwrap());
        // Within the bucket around each value (buckets grow by 1.5x).
        assert!(
            p50 > Duration::from_micros(66) && p50 <= Duration::from_micros(150),
            "{p50:?}"
        );
        assert!(
            p99 > Duration::from_micros(6600) && p99 <= Duration::from_millis(15),
            "{p99:?}"
        );
        assert_eq!(OpLatency::summary(&latency.writes).count, 0);
    }

    #[test]
    fn one_operation_in_sample_every_is_timed() {
        let latency = OpLatency::new();
        let timed = (0..SAMPLE_EVERY * 10)
            .filter(|_| latency.start().is_some())
            .count();
        assert_eq!(timed, 10);
    }

    #[test]
    fn the_text_format_names_every_family_once() {
        let latency = OpLatency::new();
        latency.record(false, Duration::from_micros(300));
        let metrics = Metrics {
            members: 3,
            partition_count: 271,
            partitions_owned: 90,
            partitions_backed_up: 91,
            migrations: PartitionStats::default(),
            maps: vec![
                ("a".to_string(), MapStats::default()),
                ("b".to_string(), MapStats::default()),
            ],
            replication_lag: 4,
            read_latency: Latency::default(),
            write_latency: OpLatency::summary(&latency.writes),
            datagrams: DatagramStats::default(),
        };
        let text = render(&metrics, &latency, true);
        assert!(text.contains("peergrid_members 3"), "{text}");
        assert!(text.contains("peergrid_map_entries{map=\"b\"} 0"), "{text}");
        assert!(
            text.contains("peergrid_map_write_seconds_count 1"),
            "{text}"
        );
        assert_eq!(text.matches("# TYPE peergrid_map_entries ").count(), 1);
        assert!(text.contains("peergrid_ready 1"));
    }
}
