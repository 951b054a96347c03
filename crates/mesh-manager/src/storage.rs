//! Persistent Raft storage in one redb file under `--data-dir`: the log, the vote, the commit
//! index and the latest snapshot. redb commits are atomic and durable, so a `meshd` killed
//! mid-write restarts from the last committed transaction.
//!
//! The state machine lives in memory ([`StoreState`]) and is rebuilt at start from the last
//! snapshot plus the committed log after it (openraft re-applies up to the saved commit index).
//!
//! Opened with the managers' data key (see `datakey`), every log entry and the snapshot's
//! data are sealed on disk (AES-256-GCM): a copy of `raft.redb` shows no service, spec or
//! environment. What is read is opened by its own form: plain entries written before the
//! store was sealed still read. The vote, commit index and snapshot metadata (log IDs and
//! membership) stay plain.

// openraft's trait signatures fix `StorageError` (224 bytes) as the error type.
#![allow(clippy::result_large_err)]

use std::borrow::Cow;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, LogState, RaftLogReader, RaftSnapshotBuilder,
};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::{watch, RwLock};
use tracing::info;

use crate::datakey::{self, DataKey};
use crate::history::{History, Pending};
use crate::raft_types::*;
use crate::state::{CommandResult, StoreState};

const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("logs");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";
const KEY_SNAPSHOT: &str = "snapshot";

/// Errors opening the store.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open raft store {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: redb::Error,
    },
    #[error("corrupt raft store {path}: {message}")]
    Corrupt { path: String, message: String },
}

fn io_err(verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError {
    StorageError::from_io_error(
        ErrorSubject::Store,
        verb,
        std::io::Error::other(e.to_string()),
    )
}

/// A snapshot as stored: its metadata and the serialized [`StoreState`].
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// The redb database shared by the log store and the state machine, and the key that seals
/// what they write.
#[derive(Clone)]
struct Db(Arc<Database>, Option<DataKey>);

impl Db {
    fn seal(&self, plain: Vec<u8>) -> Result<Vec<u8>, StorageError> {
        match &self.1 {
            Some(k) => k.seal(&plain).map_err(|e| io_err(ErrorVerb::Write, e)),
            None => Ok(plain),
        }
    }

    fn open<'a>(&self, stored: &'a [u8]) -> Result<Cow<'a, [u8]>, StorageError> {
        if !datakey::is_sealed(stored) {
            return Ok(Cow::Borrowed(stored));
        }
        let k = self.1.as_ref().ok_or_else(|| {
            io_err(
                ErrorVerb::Read,
                "the raft store is sealed and this manager has no data key",
            )
        })?;
        k.unseal(stored)
            .map(Cow::Owned)
            .map_err(|e| io_err(ErrorVerb::Read, e))
    }

    fn entry(&self, stored: &[u8]) -> Result<Entry, StorageError> {
        serde_json::from_slice(&self.open(stored)?).map_err(|e| io_err(ErrorVerb::Read, e))
    }

    /// `read` of the last entry in the log (its index and stored bytes); `None`: the log is
    /// empty.
    fn last_entry<T>(
        &self,
        read: impl FnOnce(u64, &[u8]) -> Result<T, StorageError>,
    ) -> Result<Option<T>, StorageError> {
        let txn = self
            .0
            .begin_read()
            .map_err(|e| io_err(ErrorVerb::Read, e))?;
        let table = txn
            .open_table(LOGS)
            .map_err(|e| io_err(ErrorVerb::Read, e))?;
        let last = table.last().map_err(|e| io_err(ErrorVerb::Read, e))?;
        last.map(|(k, v)| read(k.value(), v.value())).transpose()
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StorageError> {
        let txn = self
            .0
            .begin_read()
            .map_err(|e| io_err(ErrorVerb::Read, e))?;
        let table = txn
            .open_table(META)
            .map_err(|e| io_err(ErrorVerb::Read, e))?;
        let Some(v) = table.get(key).map_err(|e| io_err(ErrorVerb::Read, e))? else {
            return Ok(None);
        };
        serde_json::from_slice(v.value())
            .map(Some)
            .map_err(|e| io_err(ErrorVerb::Read, e))
    }

    fn put_meta<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(value).map_err(|e| io_err(ErrorVerb::Write, e))?;
        let txn = self
            .0
            .begin_write()
            .map_err(|e| io_err(ErrorVerb::Write, e))?;
        {
            let mut table = txn
                .open_table(META)
                .map_err(|e| io_err(ErrorVerb::Write, e))?;
            table
                .insert(key, bytes.as_slice())
                .map_err(|e| io_err(ErrorVerb::Write, e))?;
        }
        txn.commit().map_err(|e| io_err(ErrorVerb::Write, e))
    }
}

/// Opens (or creates) the store at `path` and returns its two halves; with `key`, what they
/// write is sealed.
///
/// Blocks while the file is locked by another process, at most [`LOCKED_WAIT`] (call it where
/// blocking is fine).
pub fn open(path: &Path, key: Option<DataKey>) -> Result<(LogStore, StateMachineStore), OpenError> {
    let db = create_when_unlocked(path, LOCKED_WAIT).map_err(|e| OpenError::Open {
        path: path.display().to_string(),
        source: e.into(),
    })?;
    // Create the tables so that read transactions always find them.
    let init = || -> Result<(), redb::Error> {
        let txn = db.begin_write()?;
        txn.open_table(LOGS)?;
        txn.open_table(META)?;
        txn.commit()?;
        Ok(())
    };
    init().map_err(|e| OpenError::Open {
        path: path.display().to_string(),
        source: e,
    })?;
    load(Db(Arc::new(db), key), path)
}

/// How long a store locked by another process is waited for before opening fails.
pub const LOCKED_WAIT: Duration = Duration::from_secs(5);

/// `Database::create`, waiting up to `wait` while another process holds the file's lock.
///
/// redb's lock is an `flock`, which belongs to the open file: every process the previous
/// daemon forked shares it from its fork to its exec, or to its death if the daemon died
/// first (a health check's child dies with its parent). A manager SIGKILLed at that moment
/// and restarted at once found its store "already open" and could not start; the holder is
/// gone within milliseconds. Only one daemon runs per exec root (`meshd`'s own lock), so a
/// lock that outlives the wait is someone else's: the error is then returned.
fn create_when_unlocked(path: &Path, wait: Duration) -> Result<Database, redb::DatabaseError> {
    let deadline = Instant::now() + wait;
    let mut said = false;
    loop {
        match Database::create(path) {
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                if !said {
                    info!(
                        path = %path.display(),
                        "the Raft store is locked by another process (a child of the daemon that ran before?): waiting"
                    );
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// The two halves over an open database: the state machine read from its snapshot.
fn load(db: Db, path: &Path) -> Result<(LogStore, StateMachineStore), OpenError> {
    let corrupt = |e: StorageError| OpenError::Corrupt {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let snapshot: Option<StoredSnapshot> = db.get_meta(KEY_SNAPSHOT).map_err(corrupt)?;
    let mut sm = SmData::default();
    if let Some(s) = &snapshot {
        let data = db.open(&s.data).map_err(corrupt)?;
        sm.state = serde_json::from_slice(&data).map_err(|e| OpenError::Corrupt {
            path: path.display().to_string(),
            message: format!("snapshot: {e}"),
        })?;
        sm.last_applied = s.meta.last_log_id;
        sm.membership = s.meta.last_membership.clone();
    }
    // Entries up to the last one written were applied before this start (or were about to
    // be): applying them again gives no events.
    sm.replayed_until = last_index(&db).map_err(corrupt)?;
    let (tx, _) = watch::channel(sm.state.clone());
    let sm = StateMachineStore {
        db: db.clone(),
        data: Arc::new(RwLock::new(sm)),
        changes: Arc::new(tx),
        history: Arc::new(History::default()),
    };
    Ok((LogStore { db }, sm))
}

/// The index of the last entry in the log (0: none).
fn last_index(db: &Db) -> Result<u64, StorageError> {
    Ok(db.last_entry(|index, _| Ok(index))?.unwrap_or(0))
}

/// The Raft log, vote and commit index.
#[derive(Clone)]
pub struct LogStore {
    db: Db,
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let txn = self
            .db
            .0
            .begin_read()
            .map_err(|e| io_err(ErrorVerb::Read, e))?;
        let table = txn
            .open_table(LOGS)
            .map_err(|e| io_err(ErrorVerb::Read, e))?;
        let mut out = Vec::new();
        for item in table.range(range).map_err(|e| io_err(ErrorVerb::Read, e))? {
            let (_, v) = item.map_err(|e| io_err(ErrorVerb::Read, e))?;
            out.push(self.db.entry(v.value())?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.db.get_meta(KEY_PURGED)?;
        let last = self
            .db
            .last_entry(|_, stored| Ok(self.db.entry(stored)?.log_id))?
            .or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.db.put_meta(KEY_VOTE, vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.db.get_meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.db.put_meta(KEY_COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.db.get_meta::<Option<LogId>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let txn = self
            .db
            .0
            .begin_write()
            .map_err(|e| io_err(ErrorVerb::Write, e))?;
        {
            let mut table = txn
                .open_table(LOGS)
                .map_err(|e| io_err(ErrorVerb::Write, e))?;
            for entry in entries {
                let bytes = self
                    .db
                    .seal(serde_json::to_vec(&entry).map_err(|e| io_err(ErrorVerb::Write, e))?)?;
                table
                    .insert(entry.log_id.index, bytes.as_slice())
                    .map_err(|e| io_err(ErrorVerb::Write, e))?;
            }
        }
        let res = txn
            .commit()
            .map_err(|e| std::io::Error::other(e.to_string()));
        let failed = res.as_ref().err().map(|e| io_err(ErrorVerb::Write, e));
        callback.log_io_completed(res);
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.delete_range(log_id.index..)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.db.put_meta(KEY_PURGED, &log_id)?;
        self.delete_range(..=log_id.index)
    }
}

impl LogStore {
    fn delete_range(&self, range: impl RangeBounds<u64>) -> Result<(), StorageError> {
        let txn = self
            .db
            .0
            .begin_write()
            .map_err(|e| io_err(ErrorVerb::Delete, e))?;
        {
            let mut table = txn
                .open_table(LOGS)
                .map_err(|e| io_err(ErrorVerb::Delete, e))?;
            let keys: Vec<u64> = table
                .range(range)
                .map_err(|e| io_err(ErrorVerb::Delete, e))?
                .map(|item| item.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()
                .map_err(|e| io_err(ErrorVerb::Delete, e))?;
            for k in keys {
                table.remove(k).map_err(|e| io_err(ErrorVerb::Delete, e))?;
            }
        }
        txn.commit().map_err(|e| io_err(ErrorVerb::Delete, e))
    }
}

#[derive(Default)]
struct SmData {
    state: StoreState,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    /// Entries up to this index are applied again at start: no events for them.
    replayed_until: u64,
}

/// The state machine: the in-memory [`StoreState`], plus a watch channel that publishes every
/// applied change to the rest of the manager, and the events the changes gave ([`History`]).
#[derive(Clone)]
pub struct StateMachineStore {
    db: Db,
    data: Arc<RwLock<SmData>>,
    changes: Arc<watch::Sender<StoreState>>,
    history: Arc<History>,
}

impl StateMachineStore {
    /// The current state, as applied on this manager.
    pub async fn state(&self) -> StoreState {
        self.data.read().await.state.clone()
    }

    /// The recent changes, as events.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// A receiver that sees every applied state.
    pub fn subscribe(&self) -> watch::Receiver<StoreState> {
        self.changes.subscribe()
    }

    /// Reads a value derived from the state without cloning all of it.
    pub async fn with_state<T>(&self, f: impl FnOnce(&StoreState) -> T) -> T {
        f(&self.data.read().await.state)
    }

    /// The index of the last applied entry and a digest of the state at that index (64-bit
    /// SipHash of its JSON, the snapshot's form): two managers at the same index with
    /// different digests have diverged. For checks and `mesh info`, not for security.
    pub async fn applied_digest(&self) -> (Option<u64>, String) {
        use std::hash::{Hash, Hasher};
        let data = self.data.read().await;
        let json = serde_json::to_vec(&data.state).unwrap_or_default();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        json.hash(&mut h);
        (
            data.last_applied.map(|l| l.index),
            format!("{:016x}", h.finish()),
        )
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let (data, meta) = {
            let sm = self.data.read().await;
            let data = serde_json::to_vec(&sm.state).map_err(|e| io_err(ErrorVerb::Write, e))?;
            let snapshot_id = match sm.last_applied {
                Some(l) => format!("{}-{}-{}", l.leader_id.term, l.leader_id.node_id, l.index),
                None => "empty".to_string(),
            };
            let meta = SnapshotMeta {
                last_log_id: sm.last_applied,
                last_membership: sm.membership.clone(),
                snapshot_id,
            };
            (data, meta)
        };
        self.db.put_meta(
            KEY_SNAPSHOT,
            &StoredSnapshot {
                meta: meta.clone(),
                data: self.db.seal(data.clone())?,
            },
        )?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let sm = self.data.read().await;
        Ok((sm.last_applied, sm.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut sm = self.data.write().await;
        let mut out = Vec::new();
        let mut changed = false;
        for entry in entries {
            sm.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => out.push(CommandResult::Ok),
                EntryPayload::Normal(cmd) => {
                    let index = entry.log_id.index;
                    let pending =
                        (index > sm.replayed_until).then(|| Pending::before(&sm.state, &cmd));
                    let r = sm.state.apply(&cmd);
                    if let (Some(p), CommandResult::Ok) = (pending, &r) {
                        self.history
                            .record(p, &sm.state, index, mesh_api::human::now_ns());
                    }
                    changed |= r == CommandResult::Ok;
                    out.push(r);
                }
                EntryPayload::Membership(m) => {
                    sm.membership = StoredMembership::new(Some(entry.log_id), m);
                    out.push(CommandResult::Ok);
                }
            }
        }
        if changed {
            self.changes.send_replace(sm.state.clone());
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let state: StoreState =
            serde_json::from_slice(&data).map_err(|e| io_err(ErrorVerb::Read, e))?;
        self.db.put_meta(
            KEY_SNAPSHOT,
            &StoredSnapshot {
                meta: meta.clone(),
                data: self.db.seal(data)?,
            },
        )?;
        let mut sm = self.data.write().await;
        if let Some(l) = meta.last_log_id {
            self.history
                .record_replaced(&sm.state, &state, l.index, mesh_api::human::now_ns());
        }
        sm.state = state;
        sm.last_applied = meta.last_log_id;
        sm.membership = meta.last_membership.clone();
        self.changes.send_replace(sm.state.clone());
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let stored: Option<StoredSnapshot> = self.db.get_meta(KEY_SNAPSHOT)?;
        let Some(s) = stored else {
            return Ok(None);
        };
        let data = self.db.open(&s.data)?.into_owned();
        Ok(Some(Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

/// What [`rebuild_single_voter`] made of a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuilt {
    /// The index of the last committed entry, where the new store starts.
    pub index: u64,
    /// Entries after it that had not been committed, dropped (as etcd's and swarmkit's
    /// `--force-new-cluster` drop them).
    pub dropped: u64,
    /// The Raft IDs of the members left out.
    pub removed: Vec<RaftId>,
}

/// The file a rebuilt store is written to before it is renamed over the store.
fn rebuild_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".rebuild");
    path.with_file_name(name)
}

/// `swarm init --force-new-cluster`: replaces the store at `path` with one that holds the
/// state machine as of its last committed entry, as a snapshot whose membership is
/// `raft_id` (at `addr`) alone, with no log after it. Started on it, Raft elects this node
/// by itself (a new term) and goes on from that index; the other members are forgotten.
///
/// Crash-safe: the new store is written to `raft.redb.rebuild` (redb commits are durable)
/// and renamed over `path`, then the directory is synced, so a daemon killed at any point
/// finds either the old store or the new one (a stale `.rebuild` file is replaced by the
/// next attempt). Nothing may write to the store meanwhile (its Raft instance is shut down).
pub async fn rebuild_single_voter(
    path: &Path,
    key: Option<DataKey>,
    raft_id: RaftId,
    addr: &str,
) -> Result<Rebuilt, OpenError> {
    if !path.exists() {
        return Err(OpenError::Corrupt {
            path: path.display().to_string(),
            message: "no raft store to rebuild".into(),
        });
    }
    let (log, _) = open(path, key)?;
    rebuild(log.db, path, raft_id, addr).await
}

/// [`rebuild_single_voter`] through the database a Raft instance, shut down, had open:
/// whatever still holds a handle of it (a call that was waiting on it) keeps the file
/// locked, so it is not opened a second time; the rebuilt file replaces it on disk.
pub async fn rebuild_single_voter_of(
    sm: &StateMachineStore,
    path: &Path,
    raft_id: RaftId,
    addr: &str,
) -> Result<Rebuilt, OpenError> {
    rebuild(sm.db.clone(), path, raft_id, addr).await
}

async fn rebuild(db: Db, path: &Path, raft_id: RaftId, addr: &str) -> Result<Rebuilt, OpenError> {
    use openraft::{LogIdOptionExt, Membership};

    let corrupt = |message: String| OpenError::Corrupt {
        path: path.display().to_string(),
        message,
    };
    let key = db.1.clone();
    // A state machine of its own, read from the snapshot: the one the Raft instance had
    // is left as it was.
    let (mut log, mut sm) = load(db, path)?;
    let se = |e: StorageError| corrupt(e.to_string());
    let committed = log.read_committed().await.map_err(se)?;
    let last_log = log.get_log_state().await.map_err(se)?.last_log_id;
    let (applied, _) = sm.applied_state().await.map_err(se)?;
    // The state as of the commit index: the snapshot plus the committed entries after it.
    if committed > applied {
        let (from, to) = (applied.next_index(), committed.next_index());
        let entries = log.try_get_log_entries(from..to).await.map_err(se)?;
        if entries.len() as u64 != to - from {
            return Err(corrupt(format!(
                "committed entries {from}..{to} are missing from the log"
            )));
        }
        sm.apply(entries).await.map_err(se)?;
    }
    let (last, old_membership) = sm.applied_state().await.map_err(se)?;
    let Some(last) = last else {
        return Err(corrupt("the store holds no committed state".into()));
    };
    let removed: Vec<RaftId> = old_membership
        .nodes()
        .map(|(id, _)| *id)
        .filter(|id| *id != raft_id)
        .collect();
    let data = {
        let d = sm.data.read().await;
        serde_json::to_vec(&d.state).map_err(|e| corrupt(e.to_string()))?
    };
    let vote = log.read_vote().await.map_err(se)?;
    let term = vote
        .map(|v| v.leader_id.term)
        .unwrap_or_default()
        .max(last.leader_id.term);
    drop((log, sm));

    let membership = Membership::new(
        vec![[raft_id].into()],
        std::collections::BTreeMap::from([(raft_id, openraft::BasicNode::new(addr))]),
    );
    let meta = SnapshotMeta {
        last_log_id: Some(last),
        last_membership: StoredMembership::new(Some(last), membership),
        snapshot_id: format!(
            "{}-{}-{}-new-cluster",
            last.leader_id.term, raft_id, last.index
        ),
    };
    let tmp = rebuild_path(path);
    let _ = std::fs::remove_file(&tmp);
    {
        let (new_log, _) = open(&tmp, key)?;
        let db = &new_log.db;
        let write = || -> Result<(), StorageError> {
            db.put_meta(
                KEY_SNAPSHOT,
                &StoredSnapshot {
                    meta: meta.clone(),
                    data: db.seal(data)?,
                },
            )?;
            db.put_meta(KEY_PURGED, &last)?;
            db.put_meta(KEY_COMMITTED, &Some(last))?;
            // A vote for itself, not committed: Raft starts as a follower and elects itself
            // in a term above every term it saw.
            db.put_meta(KEY_VOTE, &Vote::new(term, raft_id))
        };
        write().map_err(se)?;
    }
    let io = |e: std::io::Error| OpenError::Open {
        path: path.display().to_string(),
        source: redb::Error::Io(e),
    };
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    let dropped = last_log.next_index().saturating_sub(last.index + 1);
    Ok(Rebuilt {
        index: last.index,
        dropped,
        removed,
    })
}

#[cfg(test)]
mod tests {
    use openraft::testing::{StoreBuilder, Suite};

    use super::*;

    /// The previous daemon's child still holds the store's lock (here: another open file of
    /// this process): the open waits for it to go, and gives up on a lock that stays.
    #[test]
    fn a_store_locked_for_a_moment_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        let holder = Database::create(&path).unwrap();
        let err = create_when_unlocked(&path, Duration::from_millis(200)).unwrap_err();
        assert!(
            matches!(err, redb::DatabaseError::DatabaseAlreadyOpen),
            "{err}"
        );
        let opening = std::thread::spawn({
            let path = path.clone();
            move || create_when_unlocked(&path, Duration::from_secs(10))
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(!opening.is_finished(), "opened while the lock was held");
        drop(holder);
        opening
            .join()
            .unwrap()
            .expect("not opened once the lock was released");
    }

    /// Stores opened plain, or sealed with a key.
    struct Builder(Option<DataKey>);

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
            let dir = tempfile::tempdir().map_err(|e| io_err(ErrorVerb::Write, e))?;
            let (log, sm) = open(&dir.path().join("raft.redb"), self.0.clone())
                .map_err(|e| io_err(ErrorVerb::Read, e))?;
            Ok((dir, log, sm))
        }
    }

    /// openraft's conformance suite for log and state-machine storage.
    #[test]
    fn openraft_storage_suite() -> Result<(), StorageError> {
        Suite::test_all(Builder(None))?;
        Suite::test_all(Builder(Some(DataKey::generate().expect("a key"))))
    }

    /// A store reopened after a (simulated) crash has its vote, log and snapshot.
    #[tokio::test]
    async fn reopen_keeps_vote_log_and_snapshot() {
        use openraft::{CommittedLeaderId, EntryPayload};

        use crate::state::Command;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        let key = DataKey::generate().unwrap();
        let lid = |i| LogId::new(CommittedLeaderId::new(1, 7), i);
        let secret = |i: u64| {
            if i < 3 {
                format!("written-plain-{i}")
            } else {
                format!("written-sealed-{i}")
            }
        };
        {
            let (mut log, mut sm) = open(&path, Some(key.clone())).unwrap();
            log.save_vote(&Vote::new(3, 7)).await.unwrap();
            let entries: Vec<Entry> = (1..=3)
                .map(|i| Entry {
                    log_id: lid(i),
                    payload: EntryPayload::Normal(Command::RotateSecret {
                        role: mesh_api::NodeRole::Worker,
                        secret: secret(i),
                    }),
                })
                .collect();
            // Entries 1 and 2 as a store written before it was sealed, 3 sealed. Applying
            // before init fails inside the state machine, but is still applied.
            let txn = log.db.0.begin_write().unwrap();
            {
                let mut t = txn.open_table(LOGS).unwrap();
                for e in &entries {
                    let mut bytes = serde_json::to_vec(e).unwrap();
                    if e.log_id.index == 3 {
                        bytes = log.db.seal(bytes).unwrap();
                    }
                    t.insert(e.log_id.index, bytes.as_slice()).unwrap();
                }
            }
            txn.commit().unwrap();
            sm.apply(entries).await.unwrap();
            sm.build_snapshot().await.unwrap();
            log.save_committed(Some(lid(3))).await.unwrap();
        }
        let raw = std::fs::read(&path).unwrap();
        let has = |s: &str| raw.windows(s.len()).any(|w| w == s.as_bytes());
        assert!(has(&secret(1)), "the plain entry is where it was written");
        assert!(!has(&secret(3)), "a sealed entry is readable in the file");
        let (mut log, mut sm) = open(&path, Some(key)).unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 7)));
        assert_eq!(log.read_committed().await.unwrap(), Some(lid(3)));
        assert_eq!(log.get_log_state().await.unwrap().last_log_id, Some(lid(3)));
        let entries = log.try_get_log_entries(1..4).await.unwrap();
        assert_eq!(entries.len(), 3);
        assert!(matches!(
            &entries[2].payload,
            EntryPayload::Normal(Command::RotateSecret { secret: s, .. }) if *s == secret(3)
        ));
        let (applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(applied, Some(lid(3)));
        assert!(sm.get_current_snapshot().await.unwrap().is_some());
        drop((log, sm));
        // Without the key, the sealed parts say why they cannot be read.
        match open(&path, None) {
            Err(e) => assert!(e.to_string().contains("no data key"), "{e}"),
            Ok((mut log, _)) => {
                let e = log.try_get_log_entries(3..4).await.unwrap_err();
                assert!(e.to_string().contains("no data key"), "{e}");
            }
        }
    }

    /// Entries applied before a restart give no events when openraft applies them again at
    /// start (up to the last one written: [`last_index`]); the next one does.
    #[tokio::test]
    async fn entries_applied_again_at_start_give_no_events() {
        use mesh_api::events::PER_ENTRY;
        use openraft::{CommittedLeaderId, EntryPayload};

        use crate::state::Command;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        let node = |i: u64| {
            mesh_api::Node::new(
                format!("n{i}"),
                format!("h{i}"),
                mesh_api::NodeRole::Worker,
                format!("10.0.0.{i}:2377"),
            )
        };
        let entry = |i: u64| Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), i),
            payload: EntryPayload::Normal(if i == 1 {
                Command::InitCluster {
                    cluster: crate::state::test_cluster(),
                    node: node(1),
                }
            } else {
                Command::AddNode { node: node(i) }
            }),
        };
        let write = |log: &LogStore, entries: &[Entry]| {
            let txn = log.db.0.begin_write().unwrap();
            {
                let mut t = txn.open_table(LOGS).unwrap();
                for e in entries {
                    let bytes = serde_json::to_vec(e).unwrap();
                    t.insert(e.log_id.index, bytes.as_slice()).unwrap();
                }
            }
            txn.commit().unwrap();
        };
        let seqs = |sm: &StateMachineStore| -> Vec<u64> {
            let b = sm.history().read(None, Some(0));
            b.events.iter().map(|e| e.seq / PER_ENTRY).collect()
        };
        let first: Vec<Entry> = (1..=3).map(entry).collect();
        {
            // A new store: every entry applied gives its event.
            let (log, mut sm) = open(&path, None).unwrap();
            write(&log, &first);
            sm.apply(first.clone()).await.unwrap();
            assert_eq!(seqs(&sm), [1, 2, 3]);
        }
        // Restarted without a snapshot: 1 to 3 applied again give nothing, 4 does.
        let (log, mut sm) = open(&path, None).unwrap();
        sm.apply(first).await.unwrap();
        assert_eq!(seqs(&sm), Vec::<u64>::new());
        write(&log, &[entry(4)]);
        sm.apply([entry(4)]).await.unwrap();
        assert_eq!(seqs(&sm), [4]);
    }

    /// `--force-new-cluster`: a store of a three-voter group, with entries after its commit
    /// index, becomes one whose only voter is this node, holding the committed state only;
    /// openraft reads it back as such, and a leftover temporary file does not matter.
    #[tokio::test]
    async fn rebuild_keeps_the_committed_state_with_one_voter() {
        use openraft::storage::StorageHelper;
        use openraft::{CommittedLeaderId, EntryPayload, Membership};

        use crate::state::Command;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        let key = DataKey::generate().unwrap();
        let lid = |i| LogId::new(CommittedLeaderId::new(4, 2), i);
        let three = Membership::new(
            vec![[1, 2, 3].into()],
            std::collections::BTreeMap::from([
                (1, openraft::BasicNode::new("10.0.0.1:2377")),
                (2, openraft::BasicNode::new("10.0.0.2:2377")),
                (3, openraft::BasicNode::new("10.0.0.3:2377")),
            ]),
        );
        let rotate = |i: u64| {
            EntryPayload::Normal(Command::RotateSecret {
                role: mesh_api::NodeRole::Worker,
                secret: format!("secret-{i}"),
            })
        };
        {
            let (mut log, mut sm) = open(&path, Some(key.clone())).unwrap();
            log.save_vote(&Vote::new(4, 2)).await.unwrap();
            let mut entries = vec![Entry {
                log_id: lid(1),
                payload: EntryPayload::Membership(three),
            }];
            let init = Command::InitCluster {
                cluster: mesh_api::Cluster {
                    id: "c1".into(),
                    created_at: 1,
                    ca_cert_pem: "cert".into(),
                    ca_key_pem: "key".into(),
                    worker_secret: "w".into(),
                    manager_secret: "m".into(),
                    unlock_key: None,
                    settings: Default::default(),
                    ca_chain_pem: String::new(),
                    ca_rotation: None,
                },
                node: mesh_api::Node {
                    raft_id: 1,
                    created_at: 1,
                    updated_at: 1,
                    ..mesh_api::Node::new("n1", "h1", mesh_api::NodeRole::Manager, "10.0.0.1:2377")
                },
            };
            entries.push(Entry {
                log_id: lid(2),
                payload: EntryPayload::Normal(init),
            });
            entries.extend((3..=6).map(|i| Entry {
                log_id: lid(i),
                payload: rotate(i),
            }));
            let txn = log.db.0.begin_write().unwrap();
            {
                let mut t = txn.open_table(LOGS).unwrap();
                for e in &entries {
                    let bytes = log.db.seal(serde_json::to_vec(e).unwrap()).unwrap();
                    t.insert(e.log_id.index, bytes.as_slice()).unwrap();
                }
            }
            txn.commit().unwrap();
            // A snapshot at 2, committed up to 4: 5 and 6 were never committed.
            sm.apply(entries[..2].to_vec()).await.unwrap();
            sm.build_snapshot().await.unwrap();
            log.save_committed(Some(lid(4))).await.unwrap();
        }
        std::fs::write(rebuild_path(&path), b"half-written").unwrap();
        let r = rebuild_single_voter(&path, Some(key.clone()), 1, "10.0.0.1:2377")
            .await
            .unwrap();
        assert_eq!(
            r,
            Rebuilt {
                index: 4,
                dropped: 2,
                removed: vec![2, 3],
            }
        );
        assert!(!rebuild_path(&path).exists());

        let (mut log, mut sm) = open(&path, Some(key)).unwrap();
        let st = StorageHelper::new(&mut log, &mut sm)
            .get_initial_state()
            .await
            .unwrap();
        let voters: Vec<u64> = st.membership_state.effective().voter_ids().collect();
        assert_eq!(voters, vec![1]);
        assert_eq!(st.committed, Some(lid(4)));
        assert_eq!(log.get_log_state().await.unwrap().last_log_id, Some(lid(4)));
        assert_eq!(st.vote_ref().leader_id().voted_for(), Some(1));
        assert!(!st.vote_ref().is_committed());
        assert!(log.try_get_log_entries(0..10).await.unwrap().is_empty());
        // The state is the one at 4: the secret written by entry 4, not by 6.
        let state = sm.state().await;
        let c = state.cluster.as_ref().expect("the cluster record");
        assert_eq!(c.id, "c1");
        assert_eq!(c.worker_secret, "secret-4");
    }
}
