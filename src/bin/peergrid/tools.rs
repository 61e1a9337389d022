//! `peergrid status` and `peergrid map ...`: a [`Client`] and what it prints.

use std::fmt::Write as _;

use peergrid::{Client, ClientConfig, ClusterStatus, GridConfig};

use crate::ClientArgs;

/// Connects as the arguments and `PEERGRID_*` variables say.
async fn connect(args: &ClientArgs) -> Result<Client, String> {
    let mut grid = GridConfig::from_env().map_err(|e| e.to_string())?;
    if let Some(name) = &args.cluster_name {
        grid.cluster_name = name.clone();
    }
    let config = ClientConfig::new(args.seeds.iter().copied()).with_grid_config(&grid);
    Client::connect(config).await.map_err(|e| e.to_string())
}

/// `peergrid status`.
pub(crate) async fn status(args: &ClientArgs) -> Result<(), String> {
    let client = connect(args).await?;
    let status = client.status().await.map_err(|e| e.to_string())?;
    print!("{}", render_status(&status));
    Ok(())
}

/// The status report: members, partitions, safety, per-map figures summed over members.
pub(crate) fn render_status(status: &ClusterStatus) -> String {
    let mut out = String::new();
    let partitions = status
        .members
        .iter()
        .find_map(|m| m.metrics.as_ref().ok())
        .map_or(0, |m| m.partition_count);
    let safe = match &status.safe {
        Ok(true) => "yes".to_string(),
        Ok(false) => "no (partitions without a primary or with backups out of sync)".to_string(),
        Err(e) => format!("unknown ({e})"),
    };
    let _ = writeln!(
        out,
        "cluster: {} members, {} partitions, table version {}",
        status.members.len(),
        partitions,
        status.table_version
    );
    let _ = writeln!(out, "safe: {safe}");
    let _ = writeln!(
        out,
        "partitions led: {} of {}",
        status.partitions_led(),
        partitions
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "members");
    let _ = writeln!(
        out,
        "  {:<24} {:<16} {:<21} {:<21} {:>4} {:>7} {:>5} {:>10} {:>9} {:>9}",
        "name",
        "id",
        "gossip",
        "rpc",
        "led",
        "backups",
        "lag",
        "migrations",
        "read p99",
        "write p99"
    );
    for m in &status.members {
        let marker = if m.member.is_local { "*" } else { " " };
        match &m.metrics {
            Ok(metrics) => {
                let p99 = |l: &peergrid::Latency| {
                    l.p99.map_or("-".to_string(), |d| {
                        format!("{:.0}µs", d.as_secs_f64() * 1e6)
                    })
                };
                let _ = writeln!(
                    out,
                    "{marker} {:<24} {:<16} {:<21} {:<21} {:>4} {:>7} {:>5} {:>10} {:>9} {:>9}",
                    m.member.name,
                    m.member.id.to_string(),
                    m.member.gossip_addr.to_string(),
                    m.member.rpc_addr.to_string(),
                    metrics.partitions_owned,
                    metrics.partitions_backed_up,
                    metrics.replication_lag,
                    metrics.migrations.migrations_finished,
                    p99(&metrics.read_latency),
                    p99(&metrics.write_latency),
                );
            }
            Err(e) => {
                let _ = writeln!(
                    out,
                    "{marker} {:<24} {:<16} {:<21} {:<21} unavailable: {e}",
                    m.member.name,
                    m.member.id.to_string(),
                    m.member.gossip_addr.to_string(),
                    m.member.rpc_addr.to_string(),
                );
            }
        }
    }
    let maps = status.map_totals();
    let _ = writeln!(out);
    if maps.is_empty() {
        let _ = writeln!(out, "maps: none used yet");
        return out;
    }
    let _ = writeln!(out, "maps (summed over members)");
    let _ = writeln!(
        out,
        "  {:<24} {:>10} {:>10} {:>12} {:>10} {:>10} {:>10} {:>9} {:>10}",
        "name", "entries", "backups", "bytes", "gets", "hits", "misses", "hit ratio", "near hits"
    );
    for (name, s) in maps {
        let ratio = s.hit_ratio().map_or("-".to_string(), |r| format!("{r:.2}"));
        let _ = writeln!(
            out,
            "  {:<24} {:>10} {:>10} {:>12} {:>10} {:>10} {:>10} {:>9} {:>10}",
            name,
            s.owned_entries,
            s.backup_entries,
            s.owned_bytes,
            s.gets,
            s.hits,
            s.misses,
            ratio,
            s.near_cache_hits
        );
    }
    out
}

/// A value as text: printable UTF-8 as is, anything else (other encodings, control characters
/// that could drive the terminal) as hex.
fn show(value: Option<bytes::Bytes>) -> String {
    match value {
        None => "(nil)".to_string(),
        Some(v) => match std::str::from_utf8(&v) {
            Ok(text) if !text.chars().any(char::is_control) => text.to_string(),
            _ => {
                let mut hex = String::with_capacity(2 + v.len() * 2);
                hex.push_str("0x");
                for b in v.iter() {
                    let _ = write!(hex, "{b:02x}");
                }
                hex
            }
        },
    }
}

/// `peergrid map get`.
pub(crate) async fn get(args: &ClientArgs, name: &str, key: &str) -> Result<(), String> {
    let client = connect(args).await?;
    let value = client.map_get(name, key).await.map_err(|e| e.to_string())?;
    println!("{}", show(value));
    Ok(())
}

/// `peergrid map put`.
pub(crate) async fn put(
    args: &ClientArgs,
    name: &str,
    key: &str,
    value: &str,
) -> Result<(), String> {
    let client = connect(args).await?;
    let previous = client
        .map_put(name, key, value)
        .await
        .map_err(|e| e.to_string())?;
    println!("{}", show(previous));
    Ok(())
}

/// `peergrid map remove`.
pub(crate) async fn remove(args: &ClientArgs, name: &str, key: &str) -> Result<(), String> {
    let client = connect(args).await?;
    let previous = client
        .map_remove(name, key)
        .await
        .map_err(|e| e.to_string())?;
    println!("{}", show(previous));
    Ok(())
}

/// `peergrid map size`.
pub(crate) async fn size(args: &ClientArgs, name: &str) -> Result<(), String> {
    let client = connect(args).await?;
    let size = client.map_size(name).await.map_err(|e| e.to_string())?;
    println!("{size}");
    Ok(())
}
