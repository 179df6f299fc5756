//! The store's own words for key-value requests: compares, writes,
//! transactions and what they answered, reads, watch changes, leader keys.
//!
//! Both backends (etcd, in memory) take and give these, so nothing outside
//! `store` names an etcd type. Semantics are etcd's: one revision per
//! transaction that writes, every compare of a transaction (nested ones
//! included) judged on the state before it, a missing key's revisions 0.

/// A guard of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cmp {
    /// The key's mod revision equals this (0: the key does not exist).
    ModRevision(Vec<u8>, i64),
    /// The key's create revision equals this (0: the key does not exist).
    CreateRevision(Vec<u8>, i64),
    /// The key exists.
    Present(Vec<u8>),
}

impl Cmp {
    pub fn mod_revision(key: impl Into<Vec<u8>>, revision: i64) -> Self {
        Cmp::ModRevision(key.into(), revision)
    }
    pub fn create_revision(key: impl Into<Vec<u8>>, revision: i64) -> Self {
        Cmp::CreateRevision(key.into(), revision)
    }
    /// The key does not exist.
    pub fn absent(key: impl Into<Vec<u8>>) -> Self {
        Cmp::CreateRevision(key.into(), 0)
    }
    pub fn present(key: impl Into<Vec<u8>>) -> Self {
        Cmp::Present(key.into())
    }
}

/// Which etcd lease a put leaves the key on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutLease {
    /// None: the key lives until deleted.
    None,
    /// This lease: the key goes when the lease does.
    Attach(i64),
    /// Whatever lease the key already has.
    Keep,
}

/// One write of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        lease: PutLease,
    },
    Delete(Vec<u8>),
    /// Every key starting with this.
    DeletePrefix(Vec<u8>),
    /// A nested transaction: its guards decide its own writes only.
    Txn(Txn),
}

impl Op {
    pub fn put(key: impl Into<Vec<u8>>, value: Vec<u8>) -> Self {
        Op::Put {
            key: key.into(),
            value,
            lease: PutLease::None,
        }
    }
    pub fn put_on_lease(key: impl Into<Vec<u8>>, value: Vec<u8>, lease: PutLease) -> Self {
        Op::Put {
            key: key.into(),
            value,
            lease,
        }
    }
    pub fn delete(key: impl Into<Vec<u8>>) -> Self {
        Op::Delete(key.into())
    }
    pub fn delete_prefix(prefix: impl Into<Vec<u8>>) -> Self {
        Op::DeletePrefix(prefix.into())
    }
}

/// Writes that happen together, and only if every guard holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub when: Vec<Cmp>,
    pub then: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn when(mut self, compares: impl IntoIterator<Item = Cmp>) -> Self {
        self.when.extend(compares);
        self
    }
    pub fn and_then(mut self, ops: impl IntoIterator<Item = Op>) -> Self {
        self.then.extend(ops);
        self
    }
}

/// What a transaction answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TxnOutcome {
    /// Every guard held, so the writes happened.
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: i64,
    /// One outcome per [`Op::Txn`] among the writes, in order (empty when
    /// this transaction did not succeed).
    pub inner: Vec<TxnOutcome>,
}

/// One key as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    /// How many times the key was written since it was created.
    pub version: i64,
}

/// Keys read at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Range {
    pub kvs: Vec<Kv>,
    pub revision: i64,
}

/// How a prefix is read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RangeOptions {
    /// Newest key (by key order) first.
    pub descending: bool,
    /// At most this many keys; 0: all.
    pub limit: usize,
    /// Values left empty.
    pub keys_only: bool,
}

/// One change a watch saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The key's new value.
    Put(Kv),
    /// The key went at `revision`.
    Delete { key: Vec<u8>, revision: i64 },
}

impl Change {
    pub fn key(&self) -> &[u8] {
        match self {
            Change::Put(kv) => &kv.key,
            Change::Delete { key, .. } => key,
        }
    }
    pub fn revision(&self) -> i64 {
        match self {
            Change::Put(kv) => kv.mod_revision,
            Change::Delete { revision, .. } => *revision,
        }
    }
}

/// This replica's key in an election: it leads while the key exists, and
/// the key's create revision is its epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderKey {
    pub name: Vec<u8>,
    pub key: Vec<u8>,
    pub revision: i64,
    pub lease: i64,
}
