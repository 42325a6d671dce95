//! The state store: one SQLite database (`<data_dir>/forkvm.db`).
//!
//! Instances are stored as JSON documents beside the columns the store must
//! enforce (`name` is UNIQUE). Network allocations live in their own table
//! whose primary key `(kind, value)` makes a duplicate IP, MAC or TAP
//! impossible even under concurrent allocation; releasing is a DELETE, so it
//! happens exactly once.

use crate::error::{CoreError, Result, StoreError};
use crate::model::{Base, ImageRecord, Instance, Layer, Snapshot};
use crate::observe::Observer;
use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Kinds of allocated network resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocKind {
    Ip,
    Mac,
    Tap,
    /// A published host port, `tcp/8080`.
    Port,
    /// The uid its QEMU runs as (`crate::vm_users`).
    VmUid,
}

impl AllocKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ip => "ip",
            Self::Mac => "mac",
            Self::Tap => "tap",
            Self::Port => "port",
            Self::VmUid => "vm_uid",
        }
    }
}

pub struct Store {
    // rusqlite's Connection is not Sync; every operation is short, so a mutex
    // around one connection is simpler than a pool and serialises writers.
    conn: Mutex<Connection>,
    /// Told of every committed instance and snapshot write (metrics, events).
    observer: Arc<Observer>,
}

fn db_err(e: rusqlite::Error) -> CoreError {
    CoreError::Store(StoreError::Db(e))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| CoreError::Store(StoreError::Encode(e)))
}

impl Store {
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path).map_err(db_err)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=NORMAL;
             PRAGMA foreign_keys=ON;
             PRAGMA busy_timeout=5000;
             CREATE TABLE IF NOT EXISTS instances (
                 id   TEXT PRIMARY KEY,
                 name TEXT NOT NULL UNIQUE,
                 doc  TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS allocations (
                 kind        TEXT NOT NULL,
                 value       TEXT NOT NULL,
                 instance_id TEXT NOT NULL,
                 PRIMARY KEY (kind, value)
             );
             CREATE INDEX IF NOT EXISTS allocations_by_instance ON allocations(instance_id);
             CREATE TABLE IF NOT EXISTS snapshots (
                 id   TEXT PRIMARY KEY,
                 name TEXT UNIQUE,
                 doc  TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS bases (
                 id  TEXT PRIMARY KEY,
                 doc TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS layers (
                 id  TEXT PRIMARY KEY,
                 doc TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS images (
                 name TEXT PRIMARY KEY,
                 doc  TEXT NOT NULL
             );",
        )
        .map_err(db_err)?;
        let store = Self {
            conn: Mutex::new(conn),
            observer: Arc::default(),
        };
        store.observer.seed(&store.list_instances()?);
        Ok(store)
    }

    /// Metrics and events of what this store records.
    pub fn observer(&self) -> &Arc<Observer> {
        &self.observer
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Connection>> {
        self.conn
            .lock()
            .map_err(|_| CoreError::Store(StoreError::Poisoned))
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let conn = self.lock()?;
        f(&conn).map_err(db_err)
    }

    /// Insert a new instance; a taken name is a Conflict.
    pub fn insert_instance(&self, inst: &Instance) -> Result<()> {
        let doc = encode(inst)?;
        let conn = self.lock()?;
        match conn.execute(
            "INSERT INTO instances (id, name, doc) VALUES (?1, ?2, ?3)",
            params![inst.id, inst.name, doc],
        ) {
            Ok(_) => {
                self.observer.instance(inst);
                Ok(())
            }
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(CoreError::Conflict(format!(
                    "an instance named {:?} already exists",
                    inst.name
                )))
            }
            Err(e) => Err(db_err(e)),
        }
    }

    pub fn update_instance(&self, inst: &Instance) -> Result<()> {
        let doc = encode(inst)?;
        let n = self.with(|c| {
            c.execute(
                "UPDATE instances SET doc = ?2 WHERE id = ?1",
                params![inst.id, doc],
            )
        })?;
        if n == 0 {
            return Err(CoreError::NotFound(format!(
                "instance {} not found",
                inst.id
            )));
        }
        self.observer.instance(inst);
        Ok(())
    }

    pub fn delete_instance(&self, id: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "DELETE FROM allocations WHERE instance_id = ?1",
                params![id],
            )?;
            c.execute("DELETE FROM instances WHERE id = ?1", params![id])
        })?;
        self.observer.instance_deleted(id);
        Ok(())
    }

    /// Look up by id first, then by name.
    pub fn find_instance(&self, id_or_name: &str) -> Result<Option<Instance>> {
        let doc: Option<String> = self.with(|c| {
            c.query_row(
                "SELECT doc FROM instances WHERE id = ?1
                 UNION ALL SELECT doc FROM instances WHERE name = ?1 LIMIT 1",
                params![id_or_name],
                |r| r.get(0),
            )
            .optional()
        })?;
        doc.map(|d| decode(&d, "instance")).transpose()
    }

    pub fn list_instances(&self) -> Result<Vec<Instance>> {
        let docs: Vec<String> = self.with(|c| {
            let mut st = c.prepare("SELECT doc FROM instances ORDER BY rowid")?;
            let rows = st.query_map([], |r| r.get(0))?;
            rows.collect()
        })?;
        docs.iter().map(|d| decode(d, "instance")).collect()
    }

    /// Claim `value` of `kind` for `instance_id`. Returns false if another
    /// instance holds it (the primary key decides, not a prior read).
    pub fn try_allocate(&self, kind: AllocKind, value: &str, instance_id: &str) -> Result<bool> {
        let n = self.with(|c| {
            c.execute(
                "INSERT OR IGNORE INTO allocations (kind, value, instance_id) VALUES (?1, ?2, ?3)",
                params![kind.as_str(), value, instance_id],
            )
        })?;
        Ok(n == 1)
    }

    /// Release everything of `kind` held by the instance; returns how many
    /// rows went away (0 when already released).
    pub fn release(&self, kind: AllocKind, instance_id: &str) -> Result<usize> {
        self.with(|c| {
            c.execute(
                "DELETE FROM allocations WHERE kind = ?1 AND instance_id = ?2",
                params![kind.as_str(), instance_id],
            )
        })
    }

    pub fn allocated(&self, kind: AllocKind) -> Result<Vec<(String, String)>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT value, instance_id FROM allocations WHERE kind = ?1")?;
            let rows = st.query_map(params![kind.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }

    pub fn allocations_of(&self, instance_id: &str) -> Result<Vec<(String, String)>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT kind, value FROM allocations WHERE instance_id = ?1")?;
            let rows = st.query_map(params![instance_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }
}

impl Store {
    pub fn insert_snapshot(&self, snap: &Snapshot) -> Result<()> {
        self.insert_snapshot_with_base(snap, None)
    }

    /// A snapshot and the new base that holds its memory, in one
    /// transaction: a base never exists without something referring to it.
    pub fn insert_snapshot_with_base(&self, snap: &Snapshot, base: Option<&Base>) -> Result<()> {
        let mut conn = self.lock()?;
        let tx = conn.transaction().map_err(db_err)?;
        insert_snapshot_in(&tx, snap)?;
        if let Some(b) = base {
            insert_base_in(&tx, b)?;
        }
        tx.commit().map_err(db_err)?;
        self.observer.snapshot_created(snap);
        Ok(())
    }

    /// Records a standby in one transaction: the snapshot, its new base and
    /// the instance that now points at it.
    pub fn commit_standby(&self, snap: &Snapshot, base: &Base, inst: &Instance) -> Result<()> {
        let inst_doc = encode(inst)?;
        let mut conn = self.lock()?;
        let tx = conn.transaction().map_err(db_err)?;
        insert_snapshot_in(&tx, snap)?;
        insert_base_in(&tx, base)?;
        let n = tx
            .execute(
                "UPDATE instances SET doc = ?2 WHERE id = ?1",
                params![inst.id, inst_doc],
            )
            .map_err(db_err)?;
        if n == 0 {
            return Err(CoreError::NotFound(format!(
                "instance {} not found",
                inst.id
            )));
        }
        tx.commit().map_err(db_err)?;
        self.observer.snapshot_created(snap);
        self.observer.instance(inst);
        Ok(())
    }

    /// A finished handover in one transaction: the instance on its new VMM
    /// (copy-on-write of its old file) and that file's base record.
    pub fn commit_handover(&self, inst: &Instance, base: &Base) -> Result<()> {
        let inst_doc = encode(inst)?;
        let mut conn = self.lock()?;
        let tx = conn.transaction().map_err(db_err)?;
        insert_base_in(&tx, base)?;
        tx.execute(
            "UPDATE instances SET doc = ?2 WHERE id = ?1",
            params![inst.id, inst_doc],
        )
        .map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        self.observer.instance(inst);
        Ok(())
    }

    /// A base known before (an upgraded legacy snapshot's memory).
    pub fn insert_base(&self, base: &Base) -> Result<()> {
        let conn = self.lock()?;
        insert_base_in(&conn, base)
    }

    pub fn delete_base(&self, id: &str) -> Result<()> {
        self.with(|c| c.execute("DELETE FROM bases WHERE id = ?1", params![id]))?;
        Ok(())
    }

    pub fn list_bases(&self) -> Result<Vec<Base>> {
        let docs: Vec<String> = self.with(|c| {
            let mut st = c.prepare("SELECT doc FROM bases ORDER BY rowid")?;
            let rows = st.query_map([], |r| r.get(0))?;
            rows.collect()
        })?;
        docs.iter().map(|d| decode(d, "base")).collect()
    }

    /// A disk layer, recorded before its file is made (a crash leaves a
    /// record nobody refers to, which collection removes).
    pub fn insert_layer(&self, layer: &Layer) -> Result<()> {
        let doc = encode(layer)?;
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO layers (id, doc) VALUES (?1, ?2)",
                params![layer.id, doc],
            )
        })?;
        Ok(())
    }

    pub fn delete_layer(&self, id: &str) -> Result<()> {
        self.with(|c| c.execute("DELETE FROM layers WHERE id = ?1", params![id]))?;
        Ok(())
    }

    pub fn find_layer(&self, id: &str) -> Result<Option<Layer>> {
        let doc: Option<String> = self.with(|c| {
            c.query_row("SELECT doc FROM layers WHERE id = ?1", params![id], |r| {
                r.get(0)
            })
            .optional()
        })?;
        doc.map(|d| decode(&d, "layer")).transpose()
    }

    pub fn list_layers(&self) -> Result<Vec<Layer>> {
        let docs: Vec<String> = self.with(|c| {
            let mut st = c.prepare("SELECT doc FROM layers ORDER BY rowid")?;
            let rows = st.query_map([], |r| r.get(0))?;
            rows.collect()
        })?;
        docs.iter().map(|d| decode(d, "layer")).collect()
    }

    /// Records a new image; a name already recorded is a Conflict.
    pub fn insert_image(&self, img: &ImageRecord) -> Result<()> {
        let doc = encode(img)?;
        match self.with(|c| {
            c.execute(
                "INSERT INTO images (name, doc) VALUES (?1, ?2)",
                params![img.name, doc],
            )
        }) {
            Err(CoreError::Store(StoreError::Db(rusqlite::Error::SqliteFailure(e, _))))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(CoreError::Conflict(format!(
                    "image {:?} is already known",
                    img.name
                )))
            }
            r => r.map(|_| ()),
        }
    }

    pub fn update_image(&self, img: &ImageRecord) -> Result<()> {
        let doc = encode(img)?;
        self.with(|c| {
            c.execute(
                "UPDATE images SET doc = ?2 WHERE name = ?1",
                params![img.name, doc],
            )
        })?;
        Ok(())
    }

    pub fn delete_image(&self, name: &str) -> Result<()> {
        self.with(|c| c.execute("DELETE FROM images WHERE name = ?1", params![name]))?;
        Ok(())
    }

    pub fn find_image(&self, name: &str) -> Result<Option<ImageRecord>> {
        let doc: Option<String> = self.with(|c| {
            c.query_row(
                "SELECT doc FROM images WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()
        })?;
        doc.map(|d| decode(&d, "image")).transpose()
    }

    pub fn list_images(&self) -> Result<Vec<ImageRecord>> {
        let docs: Vec<String> = self.with(|c| {
            let mut st = c.prepare("SELECT doc FROM images ORDER BY rowid")?;
            let rows = st.query_map([], |r| r.get(0))?;
            rows.collect()
        })?;
        docs.iter().map(|d| decode(d, "image")).collect()
    }

    pub fn delete_snapshot(&self, id: &str) -> Result<()> {
        let n = self.with(|c| c.execute("DELETE FROM snapshots WHERE id = ?1", params![id]))?;
        if n > 0 {
            self.observer.snapshot_deleted(id);
        }
        Ok(())
    }

    pub fn find_snapshot(&self, id_or_name: &str) -> Result<Option<Snapshot>> {
        let doc: Option<String> = self.with(|c| {
            c.query_row(
                "SELECT doc FROM snapshots WHERE id = ?1
                 UNION ALL SELECT doc FROM snapshots WHERE name = ?1 LIMIT 1",
                params![id_or_name],
                |r| r.get(0),
            )
            .optional()
        })?;
        doc.map(|d| decode(&d, "snapshot")).transpose()
    }

    pub fn list_snapshots(&self) -> Result<Vec<Snapshot>> {
        let docs: Vec<String> = self.with(|c| {
            let mut st = c.prepare("SELECT doc FROM snapshots ORDER BY rowid")?;
            let rows = st.query_map([], |r| r.get(0))?;
            rows.collect()
        })?;
        docs.iter().map(|d| decode(d, "snapshot")).collect()
    }
}

fn insert_snapshot_in(c: &Connection, snap: &Snapshot) -> Result<()> {
    let doc = encode(snap)?;
    match c.execute(
        "INSERT INTO snapshots (id, name, doc) VALUES (?1, ?2, ?3)",
        params![snap.id, snap.name, doc],
    ) {
        Ok(_) => Ok(()),
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            Err(CoreError::Conflict(format!(
                "a snapshot named {:?} already exists",
                snap.name.as_deref().unwrap_or_default()
            )))
        }
        Err(e) => Err(db_err(e)),
    }
}

fn insert_base_in(c: &Connection, base: &Base) -> Result<()> {
    let doc = encode(base)?;
    c.execute(
        "INSERT INTO bases (id, doc) VALUES (?1, ?2)",
        params![base.id, doc],
    )
    .map_err(db_err)?;
    Ok(())
}

fn decode<T: serde::de::DeserializeOwned>(doc: &str, what: &'static str) -> Result<T> {
    serde_json::from_str(doc)
        .map_err(|source| CoreError::Store(StoreError::Corrupt { what, source }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;
    use std::sync::Arc;

    fn inst(id: &str, name: &str) -> Instance {
        Instance::created(
            id.into(),
            name.into(),
            "default".into(),
            1,
            256,
            chrono::Utc::now(),
        )
    }

    #[test]
    fn names_are_unique_and_lookup_by_id_or_name() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db")).unwrap();
        s.insert_instance(&inst("i1", "web")).unwrap();
        let err = s.insert_instance(&inst("i2", "web")).unwrap_err();
        assert!(matches!(err, CoreError::Conflict(_)), "{err}");
        assert_eq!(s.find_instance("i1").unwrap().unwrap().name, "web");
        assert_eq!(s.find_instance("web").unwrap().unwrap().id, "i1");
        assert!(s.find_instance("nope").unwrap().is_none());
        assert_eq!(s.list_instances().unwrap().len(), 1);
    }

    #[test]
    fn allocation_is_exclusive_and_released_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db")).unwrap();
        assert!(s.try_allocate(AllocKind::Ip, "10.0.0.2", "a").unwrap());
        assert!(!s.try_allocate(AllocKind::Ip, "10.0.0.2", "b").unwrap());
        // Same value of another kind is independent.
        assert!(s.try_allocate(AllocKind::Tap, "10.0.0.2", "b").unwrap());
        assert_eq!(s.release(AllocKind::Ip, "a").unwrap(), 1);
        assert_eq!(s.release(AllocKind::Ip, "a").unwrap(), 0);
        assert!(s.try_allocate(AllocKind::Ip, "10.0.0.2", "b").unwrap());
    }

    #[test]
    fn concurrent_allocation_never_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(Store::open(&dir.path().join("db")).unwrap());
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let mut won = vec![];
                    for v in 0..50 {
                        if s.try_allocate(AllocKind::Ip, &format!("ip{v}"), &format!("t{t}"))
                            .unwrap()
                        {
                            won.push(v);
                        }
                    }
                    won
                })
            })
            .collect();
        let mut all: Vec<i32> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        all.sort();
        assert_eq!(all, (0..50).collect::<Vec<_>>());
    }
}
