//! The in-memory twin of the etcd backend, for unit tests of everything
//! above the store (sessions, admin service, bootstrap, placement, the
//! leader's duties) with no etcd.
//!
//! It keeps etcd's semantics where the coordinator relies on them: one
//! revision per transaction that writes; every guard of a transaction,
//! nested ones included, judged on the state before it; missing keys'
//! revisions 0; keys on a lease go with it; watches from any past revision
//! (the whole history is kept: nothing compacts); elections won by the
//! oldest candidate key. Leases never expire by time: tests end them with
//! [`MemoryBackend::revoke_lease`]. [`MemoryBackend::set_unavailable`]
//! makes every call fail as an unreachable etcd would.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use super::kv::{Change, Cmp, Kv, LeaderKey, Op, PutLease, Range, RangeOptions, Txn, TxnOutcome};
use super::BackendError;
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
struct Entry {
    kv: Kv,
    lease: Option<i64>,
}

#[derive(Debug, Default)]
struct State {
    revision: i64,
    keys: BTreeMap<Vec<u8>, Entry>,
    history: Vec<Change>,
    leases: BTreeSet<i64>,
    next_lease: i64,
}

/// etcd in a `BTreeMap`.
#[derive(Debug)]
pub struct MemoryBackend {
    state: Mutex<State>,
    revision: watch::Sender<i64>,
    unavailable: AtomicBool,
    /// How many keys reads have returned (tests count what a call reads).
    keys_read: AtomicU64,
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            revision: watch::channel(0).0,
            unavailable: AtomicBool::new(false),
            keys_read: AtomicU64::new(0),
        }
    }
}

fn unavailable(op: &'static str) -> Error {
    Error::Etcd {
        op,
        source: BackendError::Memory("unavailable (set by the test)".into()),
    }
}

impl State {
    fn holds(&self, cmp: &Cmp) -> bool {
        let entry = |key: &Vec<u8>| self.keys.get(key).map(|e| &e.kv);
        match cmp {
            Cmp::ModRevision(key, rev) => entry(key).map_or(0, |kv| kv.mod_revision) == *rev,
            Cmp::CreateRevision(key, rev) => entry(key).map_or(0, |kv| kv.create_revision) == *rev,
            Cmp::Present(key) => entry(key).is_some(),
        }
    }

    /// Judges every guard of `txn` on the current state: the outcome tree
    /// without revisions.
    fn judge(&self, txn: &Txn) -> TxnOutcome {
        let succeeded = txn.when.iter().all(|c| self.holds(c));
        let inner = if succeeded {
            txn.then
                .iter()
                .filter_map(|op| match op {
                    Op::Txn(inner) => Some(self.judge(inner)),
                    _ => None,
                })
                .collect()
        } else {
            Vec::new()
        };
        TxnOutcome {
            succeeded,
            revision: 0,
            inner,
        }
    }

    /// Applies the writes `verdict` allows, at `revision`; whether any key
    /// changed.
    fn apply(&mut self, txn: &Txn, verdict: &TxnOutcome, revision: i64) -> bool {
        if !verdict.succeeded {
            return false;
        }
        let mut changed = false;
        let mut inner = verdict.inner.iter();
        for op in &txn.then {
            match op {
                Op::Put { key, value, lease } => {
                    let old = self.keys.get(key);
                    let lease = match lease {
                        PutLease::None => None,
                        PutLease::Attach(id) => Some(*id),
                        PutLease::Keep => old.and_then(|e| e.lease),
                    };
                    let kv = Kv {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision: old.map_or(revision, |e| e.kv.create_revision),
                        mod_revision: revision,
                        version: old.map_or(1, |e| e.kv.version + 1),
                    };
                    self.history.push(Change::Put(kv.clone()));
                    self.keys.insert(key.clone(), Entry { kv, lease });
                    changed = true;
                }
                Op::Delete(key) => changed |= self.delete(key, revision),
                Op::DeletePrefix(prefix) => {
                    let doomed: Vec<Vec<u8>> = self
                        .keys
                        .keys()
                        .filter(|k| k.starts_with(prefix))
                        .cloned()
                        .collect();
                    for key in doomed {
                        changed |= self.delete(&key, revision);
                    }
                }
                Op::Txn(nested) => {
                    if let Some(v) = inner.next() {
                        changed |= self.apply(nested, v, revision);
                    }
                }
            }
        }
        changed
    }

    fn delete(&mut self, key: &[u8], revision: i64) -> bool {
        if self.keys.remove(key).is_none() {
            return false;
        }
        self.history.push(Change::Delete {
            key: key.to_vec(),
            revision,
        });
        true
    }
}

fn stamp(outcome: &mut TxnOutcome, revision: i64) {
    outcome.revision = revision;
    for inner in &mut outcome.inner {
        stamp(inner, revision);
    }
}

impl MemoryBackend {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock can only come from a test that
        // already failed; its state is still consistent enough to read.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self, op: &'static str) -> Result<()> {
        if self.unavailable.load(Ordering::Relaxed) {
            return Err(unavailable(op));
        }
        Ok(())
    }

    /// While `true`, every call fails like a call to an unreachable etcd.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.unavailable.store(unavailable, Ordering::Relaxed);
    }

    /// How many keys every read so far returned (gets, ranges, pages; the
    /// watches' changes are not reads).
    pub fn keys_read(&self) -> u64 {
        self.keys_read.load(Ordering::Relaxed)
    }

    fn count_read(&self, keys: usize) {
        self.keys_read.fetch_add(keys as u64, Ordering::Relaxed);
    }

    /// The current revision.
    pub fn revision(&self) -> i64 {
        self.state().revision
    }

    pub async fn get(&self, key: &[u8], op: &'static str) -> Result<Option<Kv>> {
        self.check(op)?;
        let kv = self.state().keys.get(key).map(|e| e.kv.clone());
        self.count_read(usize::from(kv.is_some()));
        Ok(kv)
    }

    pub async fn range(
        &self,
        prefix: &[u8],
        options: RangeOptions,
        op: &'static str,
    ) -> Result<Range> {
        self.check(op)?;
        let state = self.state();
        let matching = state
            .keys
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, e)| {
                let mut kv = e.kv.clone();
                if options.keys_only {
                    kv.value.clear();
                }
                kv
            });
        let mut kvs: Vec<Kv> = matching.collect();
        if options.descending {
            kvs.reverse();
        }
        if options.limit > 0 {
            kvs.truncate(options.limit);
        }
        self.count_read(kvs.len());
        Ok(Range {
            kvs,
            revision: state.revision,
        })
    }

    /// How many keys `prefix` holds (returns no key: not a read of them).
    pub async fn count(&self, prefix: &[u8], op: &'static str) -> Result<i64> {
        self.check(op)?;
        let state = self.state();
        let n = state
            .keys
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .count();
        Ok(n as i64)
    }

    /// Up to `limit` keys in `[start, end)`. The twin keeps no history:
    /// it answers from its current state whatever `revision` asks.
    pub async fn range_page(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        _revision: i64,
        op: &'static str,
    ) -> Result<Range> {
        self.check(op)?;
        let state = self.state();
        if start >= end {
            return Ok(Range {
                kvs: Vec::new(),
                revision: state.revision,
            });
        }
        let kvs: Vec<Kv> = state
            .keys
            .range(start.to_vec()..end.to_vec())
            .take(limit)
            .map(|(_, e)| e.kv.clone())
            .collect();
        self.count_read(kvs.len());
        Ok(Range {
            kvs,
            revision: state.revision,
        })
    }

    pub async fn get_many(&self, keys: &[Vec<u8>], op: &'static str) -> Result<Vec<Kv>> {
        self.check(op)?;
        let state = self.state();
        let found: Vec<Kv> = keys
            .iter()
            .filter_map(|k| state.keys.get(k).map(|e| e.kv.clone()))
            .collect();
        self.count_read(found.len());
        Ok(found)
    }

    pub async fn txn(&self, txn: Txn, op: &'static str) -> Result<TxnOutcome> {
        self.check(op)?;
        let mut state = self.state();
        let mut verdict = state.judge(&txn);
        let next = state.revision + 1;
        if state.apply(&txn, &verdict, next) {
            state.revision = next;
            self.revision.send_replace(next);
        }
        stamp(&mut verdict, state.revision);
        Ok(verdict)
    }

    /// One unconditional write.
    pub async fn put(
        &self,
        key: &[u8],
        value: Vec<u8>,
        lease: PutLease,
        op: &'static str,
    ) -> Result<()> {
        let put = Op::put_on_lease(key.to_vec(), value, lease);
        self.txn(Txn::new().and_then([put]), op).await.map(drop)
    }

    /// Deletes one key; whether it existed.
    pub async fn delete(&self, key: &[u8], op: &'static str) -> Result<bool> {
        let existed = self.get(key, op).await?.is_some();
        self.txn(Txn::new().and_then([Op::delete(key.to_vec())]), op)
            .await?;
        Ok(existed)
    }

    /// Watches `prefixes` from `start_revision` (history is never
    /// compacted).
    pub async fn watch(
        self: &Arc<Self>,
        prefixes: &[Vec<u8>],
        start_revision: i64,
    ) -> Result<MemoryWatch> {
        self.check("watch prefix")?;
        Ok(MemoryWatch {
            backend: self.clone(),
            prefixes: prefixes.to_vec(),
            next_revision: start_revision,
            revision: self.revision.subscribe(),
        })
    }

    pub async fn grant_lease(&self, _ttl_s: i64) -> Result<i64> {
        self.check("grant lease")?;
        let mut state = self.state();
        state.next_lease += 1;
        let id = state.next_lease;
        state.leases.insert(id);
        Ok(id)
    }

    /// Ends a lease and deletes every key on it, as an expiry would.
    pub async fn revoke_lease(&self, lease: i64) -> Result<()> {
        self.check("revoke lease")?;
        let mut state = self.state();
        state.leases.remove(&lease);
        let doomed: Vec<Vec<u8>> = state
            .keys
            .iter()
            .filter(|(_, e)| e.lease == Some(lease))
            .map(|(k, _)| k.clone())
            .collect();
        let next = state.revision + 1;
        let mut changed = false;
        for key in doomed {
            changed |= state.delete(&key, next);
        }
        if changed {
            state.revision = next;
            self.revision.send_replace(next);
        }
        Ok(())
    }

    /// The remaining TTL of `lease` (0: it is gone). Leases here never run
    /// out by time, so any positive number will do.
    pub fn lease_ttl(&self, lease: i64, op: &'static str) -> Result<i64> {
        self.check(op)?;
        Ok(if self.state().leases.contains(&lease) {
            60
        } else {
            0
        })
    }

    /// The oldest candidate key under `name/`.
    fn leading(&self, name: &[u8]) -> Option<Kv> {
        let mut prefix = name.to_vec();
        prefix.push(b'/');
        self.state()
            .keys
            .values()
            .filter(|e| e.kv.key.starts_with(&prefix))
            .min_by_key(|e| e.kv.create_revision)
            .map(|e| e.kv.clone())
    }

    pub async fn campaign(&self, name: &[u8], value: &[u8], lease: i64) -> Result<LeaderKey> {
        self.check("campaign")?;
        let mut key = name.to_vec();
        key.extend_from_slice(format!("/{lease:x}").as_bytes());
        self.txn(
            Txn::new()
                .when([Cmp::absent(key.clone())])
                .and_then([Op::put_on_lease(
                    key.clone(),
                    value.to_vec(),
                    PutLease::Attach(lease),
                )]),
            "campaign",
        )
        .await?;
        let mut revisions = self.revision.subscribe();
        loop {
            let Some(mine) = self.get(&key, "campaign").await? else {
                return Err(Error::WatchInterrupted("the campaign's lease ended".into()));
            };
            if self.leading(name).is_some_and(|kv| kv.key == key) {
                return Ok(LeaderKey {
                    name: name.to_vec(),
                    key,
                    revision: mine.create_revision,
                    lease,
                });
            }
            if revisions.changed().await.is_err() {
                return Err(Error::ShuttingDown);
            }
        }
    }

    pub async fn leader(&self, name: &[u8]) -> Result<Option<Vec<u8>>> {
        self.check("read leader")?;
        Ok(self.leading(name).map(|kv| kv.value))
    }

    pub async fn resign(&self, key: &LeaderKey) -> Result<()> {
        self.txn(
            Txn::new()
                .when([Cmp::create_revision(key.key.clone(), key.revision)])
                .and_then([Op::delete(key.key.clone())]),
            "resign",
        )
        .await?;
        Ok(())
    }
}

/// A watch on the in-memory backend.
pub struct MemoryWatch {
    backend: Arc<MemoryBackend>,
    prefixes: Vec<Vec<u8>>,
    next_revision: i64,
    revision: watch::Receiver<i64>,
}

impl MemoryWatch {
    /// The next changes at or after the revision this watch is at.
    pub async fn next(&mut self) -> Result<Option<Vec<Change>>> {
        loop {
            self.backend.check("watch prefix")?;
            let (changes, revision) = {
                let state = self.backend.state();
                let changes: Vec<Change> = state
                    .history
                    .iter()
                    .filter(|c| c.revision() >= self.next_revision)
                    .filter(|c| self.prefixes.iter().any(|p| c.key().starts_with(p)))
                    .cloned()
                    .collect();
                (changes, state.revision)
            };
            self.next_revision = self.next_revision.max(revision + 1);
            if !changes.is_empty() {
                return Ok(Some(changes));
            }
            if self.revision.changed().await.is_err() {
                return Ok(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str) -> Op {
        Op::put(key, value.as_bytes().to_vec())
    }

    #[tokio::test]
    async fn a_transaction_is_one_revision_and_guards_are_judged_before_it() {
        let m = MemoryBackend::new();
        let first = m
            .txn(Txn::new().and_then([put("a", "1"), put("b", "1")]), "t")
            .await
            .unwrap();
        assert!(first.succeeded);
        assert_eq!(first.revision, 1);
        let a = m.get(b"a", "t").await.unwrap().unwrap();
        assert_eq!((a.create_revision, a.mod_revision, a.version), (1, 1, 1));

        // The nested guard sees `a` at 1 although the outer txn rewrites it.
        let nested = Txn::new()
            .when([Cmp::mod_revision("a", 1)])
            .and_then([put("x", "y")]);
        let failing = Txn::new()
            .when([Cmp::absent("a")])
            .and_then([put("z", "z")]);
        let outcome = m
            .txn(
                Txn::new().and_then([put("a", "2"), Op::Txn(nested), Op::Txn(failing)]),
                "t",
            )
            .await
            .unwrap();
        assert!(outcome.succeeded);
        assert_eq!(
            outcome
                .inner
                .iter()
                .map(|o| o.succeeded)
                .collect::<Vec<_>>(),
            [true, false]
        );
        assert_eq!(outcome.revision, 2);
        assert!(m.get(b"x", "t").await.unwrap().is_some());
        assert!(m.get(b"z", "t").await.unwrap().is_none());
        let a = m.get(b"a", "t").await.unwrap().unwrap();
        assert_eq!((a.create_revision, a.mod_revision, a.version), (1, 2, 2));

        // A failed guard writes nothing and moves no revision.
        let refused = m
            .txn(
                Txn::new()
                    .when([Cmp::mod_revision("a", 1)])
                    .and_then([put("a", "3")]),
                "t",
            )
            .await
            .unwrap();
        assert!(!refused.succeeded);
        assert_eq!(m.revision(), 2);
    }

    #[tokio::test]
    async fn watches_replay_from_a_revision_and_follow_prefixes() {
        let m = MemoryBackend::new();
        m.txn(Txn::new().and_then([put("p/a", "1"), put("q/a", "1")]), "t")
            .await
            .unwrap();
        let mut watch = m.watch(&[b"p/".to_vec()], 1).await.unwrap();
        let changes = watch.next().await.unwrap().unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].key(), b"p/a");
        m.txn(Txn::new().and_then([Op::delete_prefix("p/")]), "t")
            .await
            .unwrap();
        let changes = watch.next().await.unwrap().unwrap();
        assert_eq!(
            changes,
            [Change::Delete {
                key: b"p/a".to_vec(),
                revision: 2
            }]
        );
    }

    #[tokio::test]
    async fn the_oldest_candidate_leads_until_its_lease_ends() {
        let m = MemoryBackend::new();
        let one = m.grant_lease(5).await.unwrap();
        let two = m.grant_lease(5).await.unwrap();
        let first = m.campaign(b"e", b"one", one).await.unwrap();
        assert_eq!(m.leader(b"e").await.unwrap().as_deref(), Some(&b"one"[..]));
        let second = {
            let m = m.clone();
            tokio::spawn(async move { m.campaign(b"e", b"two", two).await })
        };
        tokio::task::yield_now().await;
        assert!(!second.is_finished());
        m.revoke_lease(one).await.unwrap();
        let second = tokio::time::timeout(std::time::Duration::from_secs(5), second)
            .await
            .expect("elected within the deadline")
            .unwrap()
            .unwrap();
        assert!(second.revision > first.revision);
        assert_eq!(m.leader(b"e").await.unwrap().as_deref(), Some(&b"two"[..]));
        assert_eq!(m.lease_ttl(one, "t").unwrap(), 0);
    }
}
