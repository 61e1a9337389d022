//! The distributed map: [`Map`], the typed handle, and [`ops`], the owner-side operations.
//!
//! A handle encodes keys and values at the edge (see `codec`), finds the key's partition, and
//! lets the router run the operation on the partition's primary: a direct call into the local
//! store when that is this member, a gRPC call otherwise.

pub(crate) mod listen;
pub(crate) mod near;
pub(crate) mod ops;
pub(crate) mod stats;

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec;
use crate::error::{Error, Result};
use crate::lock::state::HolderId;
use crate::lock::{LockTarget, Patience};
use crate::membership::MemberId;
use crate::node::{Node, Outcome};
use crate::partition::key::partition_of;
use crate::rpc::proto;
use ops::MapOp;

/// Longest loader error message stored for the callers waiting on a load, in bytes.
const MAX_LOAD_ERROR: usize = 512;
/// A distributed map from `K` to `V`, from [`crate::Grid::map`].
///
/// Entries live in the partition of their key, on its primary and backups. Every method is a
/// single round trip to the key's primary (none when this member is the primary); writes return
/// after the backups acknowledge, unless the map is configured with asynchronous backups.
/// Cloning is cheap.
///
/// Keys and values are encoded with serde: strings and byte buffers raw, everything else with
/// postcard. Methods take keys by `Borrow`, so a `Map<String, V>` accepts `&str`.
///
/// # Per-key locks
///
/// [`Map::lock`] locks one key, as Hazelcast's `IMap.lock` does: writes to the key through any
/// other handle wait until it is unlocked (reads do not). The holder is the handle value: each
/// [`crate::Grid::map`] call and each clone is a holder of its own, so tasks sharing a map
/// through clones exclude each other, and a task writes a key it locked through the handle that
/// locked it. The locks are reentrant, fenced, leased, FIFO and survive failover like
/// [`crate::Lock`]; their state lives in the key's partition.
pub struct Map<K, V> {
    node: Arc<Node>,
    name: Arc<str>,
    near: Option<Arc<near::NearCache>>,
    /// This handle's holder id for per-key locks.
    holder: u64,
    _types: PhantomData<fn(K) -> V>,
}

impl<K, V> Clone for Map<K, V> {
    /// Another handle to the same map: a new holder for per-key locks.
    fn clone(&self) -> Self {
        Map {
            node: self.node.clone(),
            name: self.name.clone(),
            near: self.near.clone(),
            holder: crate::lock::new_holder_id(),
            _types: PhantomData,
        }
    }
}

impl<K, V> std::fmt::Debug for Map<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Map").field("name", &self.name).finish()
    }
}

impl<K, V> Map<K, V>
where
    K: Serialize,
    V: Serialize + DeserializeOwned,
{
    pub(crate) fn new(node: Arc<Node>, name: &str) -> Self {
        Map {
            near: node.near_cache(name),
            node,
            name: Arc::from(name),
            holder: crate::lock::new_holder_id(),
            _types: PhantomData,
        }
    }

    /// This handle as a per-key lock holder, right now.
    fn writer(&self) -> HolderId {
        crate::lock::holder_of(&self.node, self.holder)
    }

    /// The map's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn check_name(&self) -> Result<()> {
        if self.name.starts_with('\0') {
            return Err(Error::ReservedName {
                name: self.name.to_string(),
            });
        }
        Ok(())
    }

    /// The partition that holds `key` (its replicas are
    /// `Grid::partition_table().replicas[partition]`): the same for every member of a cluster.
    pub fn partition_of<Q: Serialize + ?Sized>(&self, key: &Q) -> Result<u32> {
        self.key(key).map(|(partition, _)| partition)
    }

    fn key<Q: Serialize + ?Sized>(&self, key: &Q) -> Result<(u32, Bytes)> {
        self.check_name()?;
        let bytes = codec::encode(key)?;
        let max = self.node.config.max_key_size;
        if bytes.len() > max {
            return Err(Error::TooLarge {
                what: "key",
                size: bytes.len(),
                max,
            });
        }
        Ok((
            partition_of(&bytes, self.node.config.partition_count),
            bytes,
        ))
    }

    fn value(&self, value: &V) -> Result<Bytes> {
        let bytes = codec::encode(value)?;
        let max = self.node.config.max_value_size;
        if bytes.len() > max {
            return Err(Error::TooLarge {
                what: "value",
                size: bytes.len(),
                max,
            });
        }
        Ok(bytes)
    }

    async fn run<Q: Serialize + ?Sized>(&self, key: &Q, op: MapOp) -> Result<ops::OpResult> {
        let (partition, key) = self.key(key)?;
        let read = op.is_read();
        let timer = self.node.latency.start();
        let result = if read {
            self.read(partition, key, op).await
        } else {
            self.write(partition, key, op).await
        };
        if let Some(start) = timer {
            self.node.latency.record(read, start.elapsed());
        }
        result
    }

    /// A write, with the near cache kept coherent around it.
    async fn write(&self, partition: u32, key: Bytes, op: MapOp) -> Result<ops::OpResult> {
        let writer = Some(self.writer());
        let Some(near) = &self.near else {
            return self
                .node
                .route_as(partition, &self.name, key, op, writer)
                .await;
        };
        // Before, and after: a read that raced with the write must not keep the old value.
        near.invalidate(&key);
        let result = self
            .node
            .route_as(partition, &self.name, key.clone(), op, writer)
            .await;
        near.invalidate(&key);
        result
    }

    /// A read: from the near cache when it holds the key, else from the key's primary (and kept
    /// in the near cache when it may be).
    async fn read(&self, partition: u32, key: Bytes, op: MapOp) -> Result<ops::OpResult> {
        let Some(near) = &self.near else {
            return self.node.route(partition, &self.name, key, op).await;
        };
        let table = self.node.table.current();
        let Some(primary) = table.primary(partition).filter(|p| *p != self.node.me) else {
            // This member leads the key: its store is already in process.
            return self.node.route(partition, &self.name, key, op).await;
        };
        // Split-brain protection guards near-cache hits too.
        self.node.check_quorum(&self.name, &key, &op)?;
        if let Some(value) = near.lookup(&key, primary) {
            return Ok(ops::OpResult {
                found: true,
                value: Some(value),
                ..ops::OpResult::default()
            });
        }
        let ticket = near.reserve(&key, partition, primary, table.version);
        let result = self
            .node
            .route(partition, &self.name, key, MapOp::Get)
            .await?;
        if let Some(ticket) = ticket {
            near.fill(ticket, &result, self.node.table.current().version);
        }
        Ok(result)
    }

    fn decode_previous(result: ops::OpResult) -> Result<Option<V>> {
        match result.value {
            Some(bytes) if result.found => codec::decode(&bytes).map(Some),
            _ => Ok(None),
        }
    }

    /// The value of `key`, if any.
    pub async fn get<Q>(&self, key: &Q) -> Result<Option<V>>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        Self::decode_previous(self.run(key, MapOp::Get).await?)
    }

    /// Whether `key` has a value.
    pub async fn contains_key<Q>(&self, key: &Q) -> Result<bool>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        Ok(self.run(key, MapOp::ContainsKey).await?.found)
    }

    /// The member that leads `key` in this member's current partition table (`None` while no
    /// member does, before the first table). The answer can change with the next table.
    pub fn owner<Q>(&self, key: &Q) -> Result<Option<MemberId>>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        let (partition, _) = self.key(key)?;
        Ok(self.node.table.current().primary(partition))
    }

    /// This map's statistics on this member: the operations it executed as the primary of their
    /// keys, and the entries it holds. Local and cheap to ask for; sum over members for the
    /// cluster.
    pub fn local_stats(&self) -> crate::MapStats {
        let mut stats = self.node.map_stats(&self.name);
        if let Some(near) = &self.near {
            stats.add_near_cache(&near.stats());
        }
        stats
    }

    /// Stores `value` under `key` and returns the previous value.
    pub async fn put<Q>(&self, key: &Q, value: &V) -> Result<Option<V>>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        let value = self.value(value)?;
        Self::decode_previous(self.run(key, MapOp::Put(value)).await?)
    }

    /// Stores `value` under `key` without returning the previous value (cheaper than `put`).
    pub async fn set<Q>(&self, key: &Q, value: &V) -> Result<()>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        let value = self.value(value)?;
        self.run(key, MapOp::Set(value)).await.map(|_| ())
    }

    /// Stores `value` under `key` to expire `ttl` after this write, and returns the previous
    /// value. An expired entry is never returned; its expiry is decided by the key's primary and
    /// replicated, so a backup promoted later does not bring it back. `Duration::ZERO`: the entry
    /// never expires (whatever the map's default time to live).
    pub async fn put_with_ttl<Q>(
        &self,
        key: &Q,
        value: &V,
        ttl: std::time::Duration,
    ) -> Result<Option<V>>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        let value = self.value(value)?;
        Self::decode_previous(self.run(key, MapOp::PutWithTtl(value, ttl)).await?)
    }

    /// [`Map::put_with_ttl`] without returning the previous value.
    pub async fn set_with_ttl<Q>(&self, key: &Q, value: &V, ttl: std::time::Duration) -> Result<()>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        let value = self.value(value)?;
        self.run(key, MapOp::SetWithTtl(value, ttl))
            .await
            .map(|_| ())
    }

    /// Makes an existing entry expire `ttl` from now (`Duration::ZERO`: never); returns whether
    /// the entry existed. The value is unchanged.
    pub async fn set_ttl<Q>(&self, key: &Q, ttl: std::time::Duration) -> Result<bool>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        Ok(self.run(key, MapOp::Expire(ttl)).await?.applied)
    }

    /// The value of `key`, loaded with `loader` if there is none, with one load per key in the
    /// whole cluster at a time (stampede protection).
    ///
    /// The key's primary coordinates: the first caller anywhere gets the right to load and runs
    /// `loader` in its own process; every other caller, on any member, waits for that load and
    /// gets its value. The loaded value is stored like a `set` (the map's default time to live
    /// applies) before the waiters get it. A loader that fails returns [`Error::LoadFailed`] to
    /// its caller and to every waiter, and nothing is stored: the next call loads again. A loader
    /// whose member is declared down, or that holds the key longer than a 30 s lease, loses it to
    /// the next caller. If the key's primary fails over mid-load, the load may run once more.
    ///
    /// With [`crate::MapConfig::early_refresh`], a caller may be chosen to reload a live entry
    /// shortly before it expires; it gets the new value (or the current one if its loader
    /// fails), and everyone else keeps getting the current value meanwhile. A hit in this
    /// member's near cache answers without asking the primary (and so never refreshes).
    pub async fn get_or_load<Q, F, Fut, E>(&self, key: &Q, loader: F) -> Result<V>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<V, E>>,
        E: std::fmt::Display,
    {
        let (partition, key) = self.key(key)?;
        self.node.check_quorum(
            &self.name,
            &key,
            &ops::MapOp::LoadBegin {
                member: self.node.me,
                claim: 0,
            },
        )?;
        if let Some(near) = &self.near
            && let Some(primary) = self.node.table.current().primary(partition)
            && primary != self.node.me
            && let Some(value) = near.lookup(&key, primary)
        {
            return codec::decode(&value);
        }
        let claim: u64 = rand::random();
        let begin = MapOp::LoadBegin {
            member: self.node.me,
            claim,
        };
        loop {
            let answer = self
                .node
                .route(partition, &self.name, key.clone(), begin.clone())
                .await?;
            if answer.found && answer.applied {
                // Chosen for an early refresh: reload, and fall back to the current value.
                let current = answer.value.clone();
                let refresh_of = Some(answer.version);
                return match self
                    .finish_load(partition, key, claim, refresh_of, loader)
                    .await
                {
                    Ok(value) => Ok(value),
                    Err(Error::LoadFailed { .. }) if current.is_some() => {
                        codec::decode(current.as_deref().unwrap_or_default())
                    }
                    Err(e) => Err(e),
                };
            }
            if answer.found {
                return match answer.value {
                    Some(bytes) => codec::decode(&bytes),
                    None => Err(Error::LoadFailed {
                        message: "the primary answered without a value".to_string(),
                    }),
                };
            }
            if answer.applied {
                break;
            }
            if let Some(message) = answer.value.filter(|m| !m.is_empty()) {
                return Err(Error::LoadFailed {
                    message: String::from_utf8_lossy(&message).into_owned(),
                });
            }
            // Another caller's load is still running: ask again.
        }
        self.finish_load(partition, key, claim, None, loader).await
    }

    /// Runs a load this caller was granted and hands its outcome to the key's primary.
    async fn finish_load<F, Fut, E>(
        &self,
        partition: u32,
        key: Bytes,
        claim: u64,
        refresh_of: Option<u64>,
        loader: F,
    ) -> Result<V>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<V, E>>,
        E: std::fmt::Display,
    {
        let (outcome, result) = match loader().await {
            Ok(value) => match self.value(&value) {
                Ok(bytes) => (ops::LoadOutcome::Loaded(bytes), Ok(value)),
                Err(e) => (ops::LoadOutcome::Failed(e.to_string()), Err(e)),
            },
            Err(e) => {
                let mut message = e.to_string();
                // The message travels as the entry's value to its owner: kept well within the
                // value size limit.
                if message.len() > MAX_LOAD_ERROR {
                    let mut end = MAX_LOAD_ERROR;
                    while !message.is_char_boundary(end) {
                        end -= 1;
                    }
                    message.truncate(end);
                }
                (
                    ops::LoadOutcome::Failed(message.clone()),
                    Err(Error::LoadFailed { message }),
                )
            }
        };
        let end = self
            .node
            .route_as(
                partition,
                &self.name,
                key.clone(),
                MapOp::LoadEnd {
                    claim,
                    outcome,
                    refresh_of,
                },
                Some(self.writer()),
            )
            .await?;
        if let Some(near) = &self.near {
            near.invalidate(&key);
        }
        // An early refresh that lost to a newer value (a write, or another refresh) returns it.
        if !end.applied
            && end.found
            && let Some(newer) = end.value
        {
            return codec::decode(&newer);
        }
        result
    }

    /// A stream of this map's entry changes (added, updated, removed, expired, evicted) from
    /// now on, cluster-wide: from this member's primaries, and from every other member and every
    /// member that joins later. Returns once it is listening to every current member. With
    /// `include_values`, events carry the new (or last) value.
    ///
    /// Delivery is at most once, and in order per key except across a change of the key's
    /// primary: see the `map::listen` module. Events whose key or value does not decode as `K`
    /// or `V` are skipped. The stream ends when this member stops.
    pub async fn listen(&self, include_values: bool) -> crate::EventStream<listen::EntryEvent<K, V>>
    where
        K: DeserializeOwned + Clone + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
    {
        let raw = listen::subscribe(&self.node, self.name.clone(), include_values).await;
        listen::forward(&self.node, raw, move |event| {
            Some(listen::EntryEvent {
                kind: event.kind,
                key: codec::decode::<K>(&event.key).ok()?,
                value: listen::decode_value::<V>(event, include_values)?,
            })
        })
    }

    /// Removes `key` and returns its value.
    pub async fn remove<Q>(&self, key: &Q) -> Result<Option<V>>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        Self::decode_previous(self.run(key, MapOp::Remove).await?)
    }

    /// Removes `key` without returning its value; returns whether it existed.
    pub async fn delete<Q>(&self, key: &Q) -> Result<bool>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        Ok(self.run(key, MapOp::Delete).await?.found)
    }

    /// Stores `value` only if `key` has no value. Returns the existing value if there was one
    /// (and nothing was stored), `None` if `value` was stored.
    pub async fn put_if_absent<Q>(&self, key: &Q, value: &V) -> Result<Option<V>>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        let value = self.value(value)?;
        Self::decode_previous(self.run(key, MapOp::PutIfAbsent(value)).await?)
    }

    /// Stores `value` only if `key` has a value; returns the replaced value (`None`: nothing
    /// stored).
    pub async fn replace<Q>(&self, key: &Q, value: &V) -> Result<Option<V>>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        let value = self.value(value)?;
        Self::decode_previous(self.run(key, MapOp::Replace(value)).await?)
    }

    /// Compare-and-set: stores `value` only if the current value equals `expected` (compared as
    /// encoded bytes). Returns whether it was stored.
    pub async fn replace_if_equal<Q>(&self, key: &Q, expected: &V, value: &V) -> Result<bool>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        let expected = codec::encode(expected)?;
        let value = self.value(value)?;
        Ok(self
            .run(key, MapOp::ReplaceIfEqual { expected, value })
            .await?
            .applied)
    }

    /// The values of `keys` that have one. Keys are grouped by the member that owns them, with
    /// one call per member, sent concurrently.
    pub async fn get_all<'a, I>(&self, keys: I) -> Result<HashMap<K, V>>
    where
        I: IntoIterator<Item = &'a K>,
        K: Clone + Eq + Hash + 'a,
    {
        let keys: Vec<&K> = keys.into_iter().collect();
        self.check_batch(keys.len())?;
        let mut encoded = Vec::new();
        let mut out = HashMap::new();
        let table = self.near.as_ref().map(|_| self.node.table.current());
        for key in keys {
            let (partition, bytes) = self.key(key)?;
            if let (Some(near), Some(table)) = (&self.near, &table)
                && let Some(primary) = table.primary(partition).filter(|p| *p != self.node.me)
                && let Some(value) = near.lookup(&bytes, primary)
            {
                out.insert(key.clone(), codec::decode(&value)?);
                continue;
            }
            encoded.push((key.clone(), partition, bytes, Bytes::new()));
        }
        let results = self.batch(false, &encoded).await?;
        for ((key, ..), value) in encoded.into_iter().zip(results) {
            if let Some(bytes) = value {
                out.insert(key, codec::decode(&bytes)?);
            }
        }
        Ok(out)
    }

    /// Refuses a batch of more than [`crate::GridConfig::max_batch_keys`] keys.
    fn check_batch(&self, count: usize) -> Result<()> {
        let max = self.node.config.max_batch_keys;
        if count > max {
            return Err(Error::TooManyKeys { count, max });
        }
        Ok(())
    }

    /// Stores every entry, grouped by owning member, one call per member, sent concurrently.
    /// Each entry is stored (and backed up) on its own; on an error, some entries may be stored.
    /// A call with more than [`crate::GridConfig::max_batch_keys`] entries, or a key or value
    /// beyond its limit, is refused before anything is sent
    /// ([`Error::TooManyKeys`], [`Error::TooLarge`]).
    pub async fn put_all<I>(&self, entries: I) -> Result<()>
    where
        I: IntoIterator<Item = (K, V)>,
    {
        let mut encoded = Vec::new();
        for (key, value) in entries {
            let (partition, bytes) = self.key(&key)?;
            encoded.push(((), partition, bytes, self.value(&value)?));
        }
        self.check_batch(encoded.len())?;
        let Some(near) = &self.near else {
            return self.batch(true, &encoded).await.map(|_| ());
        };
        let invalidate = || {
            encoded
                .iter()
                .for_each(|(_, _, key, _)| near.invalidate(key))
        };
        invalidate();
        let result = self.batch(true, &encoded).await.map(|_| ());
        invalidate();
        result
    }

    /// Runs a batch: local entries directly, remote ones one call per owner, concurrently; entries
    /// whose owner moved are retried one by one through the router.
    async fn batch<T>(
        &self,
        put: bool,
        entries: &[(T, u32, Bytes, Bytes)],
    ) -> Result<Vec<Option<Bytes>>> {
        self.node.check_map_quorum(&self.name, put)?;
        let table = self.node.table.current();
        let version = table.version;
        let mut by_owner: BTreeMap<Option<MemberId>, Vec<usize>> = BTreeMap::new();
        for (i, (_, partition, ..)) in entries.iter().enumerate() {
            by_owner
                .entry(table.primary(*partition))
                .or_default()
                .push(i);
        }
        let calls = by_owner.into_iter().map(|(owner, indexes)| async move {
            let answers = match owner {
                Some(owner) if owner != self.node.me => {
                    match self
                        .remote_batch(owner, put, entries, &indexes, version)
                        .await
                    {
                        Ok(answers) => answers,
                        // The owner refused the call: asking again key by key would get
                        // around its limits.
                        Err(
                            e @ (Error::TooLarge { .. }
                            | Error::TooManyKeys { .. }
                            | Error::Unauthenticated { .. }),
                        ) => return Err(e),
                        // Not processed (moved, unreachable): retried one by one through the
                        // router.
                        Err(
                            Error::NotOwner { .. }
                            | Error::NoOwner { .. }
                            | Error::Unreachable { .. }
                            | Error::UnknownMember(_),
                        ) => vec![None; indexes.len()],
                        // Timed out, not backed up: maybe applied. Writing the entries again
                        // could undo another client's later writes; the caller decides.
                        Err(e) if put => return Err(e),
                        Err(_) => vec![None; indexes.len()],
                    }
                }
                Some(_) => self.local_batch(put, entries, &indexes).await?,
                None => vec![None; indexes.len()],
            };
            Ok::<_, Error>(indexes.into_iter().zip(answers).collect::<Vec<_>>())
        });
        let mut results = vec![None; entries.len()];
        let mut retry = Vec::new();
        for group in futures::future::join_all(calls).await {
            for (i, answer) in group? {
                match answer {
                    Some(value) => results[i] = value,
                    None => retry.push(i),
                }
            }
        }
        for i in retry {
            let (_, partition, key, value) = &entries[i];
            let op = if put {
                MapOp::Set(value.clone())
            } else {
                MapOp::Get
            };
            let writer = put.then(|| self.writer());
            let result = self
                .node
                .route_as(*partition, &self.name, key.clone(), op, writer)
                .await?;
            results[i] = if result.found { result.value } else { None };
        }
        Ok(results)
    }

    /// Per entry: `Some(value or None)` when done, `None` when it must be retried.
    async fn local_batch<T>(
        &self,
        put: bool,
        entries: &[(T, u32, Bytes, Bytes)],
        indexes: &[usize],
    ) -> Result<Vec<Option<Option<Bytes>>>> {
        let mut answers = Vec::with_capacity(indexes.len());
        let mut acks = Vec::new();
        for &i in indexes {
            let (_, partition, key, value) = &entries[i];
            let op = if put {
                MapOp::Set(value.clone())
            } else {
                MapOp::Get
            };
            let data = self.node.store.partition(*partition);
            if data.is_some_and(|d| d.is_pending()) {
                answers.push(None);
                continue;
            }
            match self.node.apply(
                *partition,
                &self.name,
                key.clone(),
                &op,
                Some(&self.writer()),
            )? {
                (Outcome::Done(result), mut new_acks) => {
                    acks.append(&mut new_acks);
                    answers.push(Some(if result.found { result.value } else { None }));
                }
                (Outcome::NotOwner { .. } | Outcome::Pending | Outcome::Locked, _) => {
                    answers.push(None)
                }
            }
        }
        self.node.await_acks(acks).await?;
        Ok(answers)
    }

    async fn remote_batch<T>(
        &self,
        owner: MemberId,
        put: bool,
        entries: &[(T, u32, Bytes, Bytes)],
        indexes: &[usize],
        table_version: u64,
    ) -> Result<Vec<Option<Option<Bytes>>>> {
        // Calls stay within half the rpc message limit: a large batch goes as several calls.
        let budget = self.node.config.max_message_size() / 2;
        let mut chunks: Vec<&[usize]> = Vec::new();
        let (mut start, mut bytes) = (0, 0);
        for (n, &i) in indexes.iter().enumerate() {
            let size = entries[i].2.len() + entries[i].3.len() + 16;
            if n > start && bytes + size > budget {
                chunks.push(&indexes[start..n]);
                (start, bytes) = (n, 0);
            }
            bytes += size;
        }
        chunks.push(&indexes[start..]);
        let calls = chunks
            .into_iter()
            .map(|chunk| self.remote_batch_call(owner, put, entries, chunk, table_version));
        let mut out = Vec::with_capacity(indexes.len());
        for answers in futures::future::join_all(calls).await {
            out.extend(answers?);
        }
        Ok(out)
    }

    async fn remote_batch_call<T>(
        &self,
        owner: MemberId,
        put: bool,
        entries: &[(T, u32, Bytes, Bytes)],
        indexes: &[usize],
        table_version: u64,
    ) -> Result<Vec<Option<Option<Bytes>>>> {
        let request = proto::MapBatchRequest {
            table_version,
            map: self.name.to_string(),
            put,
            entries: indexes
                .iter()
                .map(|&i| proto::BatchEntry {
                    partition: entries[i].1,
                    key: entries[i].2.clone(),
                    value: entries[i].3.clone(),
                })
                .collect(),
        };
        let mut call = self.node.peer_client(owner)?;
        let response = call
            .client
            .map_batch(self.node.rpc.request(request))
            .await
            .map_err(|status| call.error("map_batch", status))?
            .into_inner();
        if response.results.len() != indexes.len() {
            return Err(Error::Remote {
                member: owner,
                code: tonic::Code::Internal,
                message: "batch answer of the wrong length".to_string(),
            });
        }
        Ok(response
            .results
            .into_iter()
            .map(|r| (!r.not_owner).then(|| r.found.then_some(r.value)))
            .collect())
    }

    fn key_lock<Q: Serialize + ?Sized>(&self, key: &Q) -> Result<LockTarget> {
        let (partition, key) = self.key(key)?;
        Ok(LockTarget::keyed(
            self.node.clone(),
            &self.name,
            partition,
            &key,
        ))
    }

    /// Locks `key` for this handle, waiting as long as it takes; returns the holding's fencing
    /// token. Writes to the key through other handles wait until [`Map::unlock`]. Reentrant: a
    /// second lock by this handle needs a second unlock and returns the same fence.
    pub async fn lock<Q>(&self, key: &Q) -> Result<u64>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        let target = self.key_lock(key)?;
        Ok(target
            .acquire(self.writer(), None, Patience::Forever)
            .await?
            .0)
    }

    /// [`Map::lock`] with a lease: the key is unlocked by itself `lease` after the grant.
    pub async fn lock_with_lease<Q>(&self, key: &Q, lease: std::time::Duration) -> Result<u64>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        let target = self.key_lock(key)?;
        Ok(target
            .acquire(self.writer(), Some(lease), Patience::Forever)
            .await?
            .0)
    }

    /// Locks `key` if it can within `timeout` (zero: only if it is free now); returns the
    /// fencing token, or [`Error::LockTimeout`] ([`Error::LockBusy`] for a zero timeout).
    pub async fn try_lock<Q>(&self, key: &Q, timeout: std::time::Duration) -> Result<u64>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        let target = self.key_lock(key)?;
        let patience = if timeout.is_zero() {
            Patience::Try
        } else {
            Patience::For(timeout)
        };
        Ok(target.acquire(self.writer(), None, patience).await?.0)
    }

    /// Releases this handle's latest hold of `key`'s lock: [`Error::NotLockHolder`] if it holds
    /// none, [`Error::LeaseExpired`] or [`Error::LockLost`] if it lost it.
    pub async fn unlock<Q>(&self, key: &Q) -> Result<()>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        let target = self.key_lock(key)?;
        target.release(self.writer(), 0).await.map(|_| ())
    }

    /// Whether any handle holds `key`'s lock.
    pub async fn is_locked<Q>(&self, key: &Q) -> Result<bool>
    where
        K: Borrow<Q>,
        Q: Serialize + ?Sized,
    {
        Ok(self.key_lock(key)?.holder().await?.0.is_some())
    }

    /// The number of entries in the whole cluster (each partition counted once, on its primary).
    pub async fn size(&self) -> Result<u64> {
        self.scan(false).await
    }

    /// Removes every entry in the whole cluster.
    pub async fn clear(&self) -> Result<()> {
        let result = self.scan(true).await.map(|_| ());
        if let Some(near) = &self.near {
            near.invalidate_all();
        }
        result
    }

    /// Asks every member for its primaries' count; retries while the answers do not cover every
    /// partition exactly once (a table change was in flight).
    async fn scan(&self, clear: bool) -> Result<u64> {
        self.check_name()?;
        self.node.check_map_quorum(&self.name, clear)?;
        let node = &self.node;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let version = node.table.current().version;
            let mut members: Vec<MemberId> =
                node.membership.members().iter().map(|m| m.id).collect();
            members.sort();
            let calls = members.into_iter().map(|member| async move {
                if member == node.me {
                    return node.scan(&self.name, clear, version).await;
                }
                let mut call = node.peer_client(member)?;
                let response = call
                    .client
                    .map_scan(node.rpc.request(proto::MapScanRequest {
                        table_version: version,
                        map: self.name.to_string(),
                        clear,
                    }))
                    .await
                    .map_err(|status| call.error("map_scan", status))?
                    .into_inner();
                Ok((response.entries, response.partitions))
            });
            let mut total = 0;
            let mut covered = BTreeSet::new();
            let mut complete = true;
            let mut last_error = None;
            for answer in futures::future::join_all(calls).await {
                match answer {
                    Ok((count, partitions)) => {
                        total += count;
                        for p in partitions {
                            complete &= covered.insert(p);
                        }
                    }
                    Err(e) => {
                        complete = false;
                        last_error = Some(e);
                    }
                }
            }
            if complete && covered.len() == node.config.partition_count as usize {
                return Ok(total);
            }
            if attempts >= crate::routing::MAX_ATTEMPTS {
                return Err(Error::RetriesExhausted {
                    partition: 0,
                    attempts,
                    last: Box::new(last_error.unwrap_or(Error::NoOwner { partition: 0 })),
                });
            }
            node.await_table_change(version).await;
        }
    }
}
