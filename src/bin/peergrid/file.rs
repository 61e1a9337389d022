//! The TOML file of `peergrid node --config FILE`.
//!
//! Top-level keys are the `PEERGRID_*` environment variables in lower case without the prefix
//! (`cluster_name`, `bind`, `seeds = ["10.0.0.5:5701"]`, `rpc_timeout_ms`, ...), applied through
//! [`GridConfig::with_env_vars`] so a file and the environment accept the same settings and
//! check them the same way; an unknown key is an error. Tables `[maps.NAME]`, `[queues.NAME]`
//! and `[locks.NAME]` configure structures by name or `prefix*` pattern.

use std::collections::BTreeMap;
use std::time::Duration;

use peergrid::{
    EvictionPolicy, GridConfig, LockConfig, MapConfig, QueueConfig, SplitBrainProtection,
};
use serde::Deserialize;

/// One `[maps.NAME]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MapSection {
    backup_count: Option<u8>,
    async_backups: Option<bool>,
    ttl_ms: Option<u64>,
    max_idle_ms: Option<u64>,
    eviction: Option<String>,
    max_entries_per_member: Option<u64>,
    max_bytes_per_member: Option<u64>,
    min_cluster_size: Option<usize>,
}

/// One `[queues.NAME]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct QueueSection {
    capacity: Option<u64>,
    backup_count: Option<u8>,
    min_cluster_size: Option<usize>,
}

/// One `[locks.NAME]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LockSection {
    reentry_limit: Option<u32>,
    min_cluster_size: Option<usize>,
}

/// Applies the file's text (`path` names it in errors) to `config`.
pub(crate) fn apply(config: GridConfig, path: &str, text: &str) -> Result<GridConfig, String> {
    let mut table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| format!("{path}: {}", e.message()))?;
    let section = |table: &mut toml::Table, name: &str| table.remove(name);
    let maps = section(&mut table, "maps");
    let queues = section(&mut table, "queues");
    let locks = section(&mut table, "locks");

    let mut vars = Vec::new();
    for (key, value) in table {
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(n) => n.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(items) => items
                .into_iter()
                .map(|item| match item {
                    toml::Value::String(s) => Ok(s),
                    toml::Value::Integer(n) => Ok(n.to_string()),
                    other => Err(format!(
                        "{path}: `{key}` holds a {}; expected strings",
                        other.type_str()
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?
                .join(","),
            other => {
                return Err(format!(
                    "{path}: `{key}` holds a {}; expected a string, number, boolean or list",
                    other.type_str()
                ));
            }
        };
        vars.push((format!("PEERGRID_{}", key.to_ascii_uppercase()), text));
    }
    let mut config = config
        .with_env_vars(vars)
        .map_err(|e| format!("{path}: {}", from_file(&e.to_string())))?;

    let guard = |min: Option<usize>| min.map(SplitBrainProtection::new);
    for (name, s) in sections::<MapSection>(path, "maps", maps)? {
        let mut map = MapConfig::default();
        map.backup_count = s.backup_count;
        map.async_backups = s.async_backups.unwrap_or(map.async_backups);
        map.ttl = s.ttl_ms.map(Duration::from_millis);
        map.max_idle = s.max_idle_ms.map(Duration::from_millis);
        if let Some(policy) = &s.eviction {
            map.eviction.policy = match policy.to_ascii_lowercase().as_str() {
                "none" => EvictionPolicy::None,
                "lru" => EvictionPolicy::Lru,
                "lfu" => EvictionPolicy::Lfu,
                other => {
                    return Err(format!(
                        "{path}: [maps.{name}] eviction = {other:?}; expected \"none\", \"lru\" or \"lfu\""
                    ));
                }
            };
        }
        map.eviction.max_entries_per_member = s.max_entries_per_member;
        map.eviction.max_bytes_per_member = s.max_bytes_per_member;
        map.split_brain_protection = guard(s.min_cluster_size);
        config.maps.push((name, map));
    }
    for (name, s) in sections::<QueueSection>(path, "queues", queues)? {
        let mut queue = QueueConfig::default();
        queue.capacity = s.capacity.unwrap_or(queue.capacity);
        queue.backup_count = s.backup_count;
        queue.split_brain_protection = guard(s.min_cluster_size);
        config.queues.push((name, queue));
    }
    for (name, s) in sections::<LockSection>(path, "locks", locks)? {
        let mut lock = LockConfig::default();
        lock.reentry_limit = s.reentry_limit.unwrap_or(lock.reentry_limit);
        lock.split_brain_protection = guard(s.min_cluster_size);
        config.locks.push((name, lock));
    }
    Ok(config)
}

/// The named tables under `[kind.NAME]`, in name order.
fn sections<T: serde::de::DeserializeOwned>(
    path: &str,
    kind: &str,
    value: Option<toml::Value>,
) -> Result<BTreeMap<String, T>, String> {
    match value {
        None => Ok(BTreeMap::new()),
        Some(value) => value
            .try_into::<BTreeMap<String, T>>()
            .map_err(|e| format!("{path}: [{kind}]: {}", e.message())),
    }
}

/// An environment-variable error reworded for a file key.
fn from_file(message: &str) -> String {
    message.replace("environment variable PEERGRID_", "setting ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_sets_the_member_and_its_structures() {
        let text = r#"
            cluster_name = "orders"
            member_name = "node-a"
            bind = "127.0.0.2"
            seeds = ["127.0.0.2:5701", "127.0.0.3:5701"]
            partitions = 64
            backups = 2
            rpc_timeout_ms = 2500

            [maps.sessions]
            backup_count = 1
            ttl_ms = 60000
            eviction = "lru"
            max_entries_per_member = 1000
            min_cluster_size = 2

            [queues.jobs]
            capacity = 100

            [locks."leader*"]
            reentry_limit = 4
        "#;
        let config = apply(GridConfig::default(), "test.toml", text).unwrap();
        assert_eq!(config.cluster_name, "orders");
        assert_eq!(config.member_name.as_deref(), Some("node-a"));
        assert_eq!(config.gossip_bind, "127.0.0.2:5701".parse().unwrap());
        assert_eq!(config.seeds.len(), 2);
        assert_eq!(config.partition_count, 64);
        assert_eq!(config.backup_count, 2);
        assert_eq!(config.rpc_timeout, Duration::from_millis(2500));
        let (name, map) = &config.maps[0];
        assert_eq!(name, "sessions");
        assert_eq!(map.backup_count, Some(1));
        assert_eq!(map.ttl, Some(Duration::from_secs(60)));
        assert_eq!(map.eviction.policy, EvictionPolicy::Lru);
        assert_eq!(map.eviction.max_entries_per_member, Some(1000));
        assert_eq!(
            map.split_brain_protection.map(|p| p.min_cluster_size),
            Some(2)
        );
        assert_eq!(config.queues[0].0, "jobs");
        assert_eq!(config.queues[0].1.capacity, 100);
        assert_eq!(config.locks[0].0, "leader*");
        assert_eq!(config.locks[0].1.reentry_limit, 4);
        config.validate().unwrap();
    }

    #[test]
    fn the_readme_example_file_is_valid() {
        let readme = include_str!("../../../README.md");
        let start = readme
            .find("```toml\n")
            .expect("a toml block in the README")
            + 8;
        let end = start + readme[start..].find("```").expect("the block ends");
        let config = apply(GridConfig::default(), "README.md", &readme[start..end]).unwrap();
        // Beyond loopback the member needs the secret, from the environment as the README says.
        let secret = [(
            "PEERGRID_SECRET".to_string(),
            "a-secret-of-enough-length".to_string(),
        )];
        let config = config.with_env_vars(secret).unwrap();
        config.validate().unwrap();
        assert_eq!(config.cluster_name, "shop");
        assert_eq!(config.maps.len(), 2);
        assert_eq!(config.queues.len(), 1);
        assert_eq!(config.locks.len(), 1);
        assert!(config.maps.iter().any(|(name, _)| name == "accounts*"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let err = apply(GridConfig::default(), "f.toml", "clustr_name = \"x\"").unwrap_err();
        assert!(
            err.contains("f.toml") && err.contains("CLUSTR_NAME"),
            "{err}"
        );
        let err = apply(GridConfig::default(), "f.toml", "partitions = \"many\"").unwrap_err();
        assert!(err.contains("PARTITIONS"), "{err}");
        let err = apply(GridConfig::default(), "f.toml", "[maps.a]\nttl = 5").unwrap_err();
        assert!(err.contains("[maps]") && err.contains("ttl"), "{err}");
        let err = apply(
            GridConfig::default(),
            "f.toml",
            "[maps.a]\neviction = \"fifo\"",
        )
        .unwrap_err();
        assert!(err.contains("fifo"), "{err}");
        let err = apply(GridConfig::default(), "f.toml", "seeds = [1.5]").unwrap_err();
        assert!(err.contains("seeds"), "{err}");
        let err = apply(GridConfig::default(), "f.toml", "not toml at all").unwrap_err();
        assert!(err.starts_with("f.toml"), "{err}");
    }
}
