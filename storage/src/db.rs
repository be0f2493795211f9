//! The node's state database (`<root>/state.redb`: image records and pod state),
//! shared by the image store and the pod store, and reopened after an I/O error.
//!
//! redb latches the first failed write (a full disk, say): every later transaction
//! of that `Database` fails with `PreviousIo` until it is closed and opened again.
//! Users therefore take the database per transaction ([`Db::get`]) and never keep
//! it; after a failure one of them calls [`Db::reopen`], which waits for the
//! transactions in flight to end, closes the file and opens it again (redb repairs
//! it from its last commit). Space coming back then needs no restart of vesseld.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redb::Database;

/// How long a reopen waits for the transactions in flight to end.
const DRAIN_PATIENCE: Duration = Duration::from_secs(5);

/// Opens the database again (a file by path; a test's backend).
type Opener = Box<dyn Fn() -> Result<Database, redb::DatabaseError> + Send + Sync>;

/// Why the database cannot be used now.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// Opening the file failed.
    #[error("state database {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// What redb said.
        #[source]
        source: redb::DatabaseError,
    },
    /// A reopen found transactions that did not end in time.
    #[error("state database {0}: transactions still running; retry")]
    Busy(PathBuf),
    /// The database is closed (a reopen failed earlier and will be retried).
    #[error("state database {0} is closed after an I/O error; retry once the disk has room")]
    Closed(PathBuf),
}

/// The shared, reopenable database.
pub struct Db {
    path: PathBuf,
    opener: Opener,
    current: RwLock<Option<Arc<Database>>>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("path", &self.path).finish()
    }
}

impl Db {
    /// Opens (creating) the database file at `path`.
    pub fn open(path: impl Into<PathBuf>) -> Result<Arc<Self>, DbError> {
        let path = path.into();
        let p = path.clone();
        Self::with_opener(path, Box::new(move || Database::create(&p)))
    }

    /// A database opened (and reopened) by `opener`; `name` names it in errors.
    pub fn with_opener(name: impl Into<PathBuf>, opener: Opener) -> Result<Arc<Self>, DbError> {
        let path = name.into();
        let db = opener().map_err(|source| DbError::Open {
            path: path.clone(),
            source,
        })?;
        Ok(Arc::new(Db {
            path,
            opener,
            current: RwLock::new(Some(Arc::new(db))),
        }))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The database, for one transaction (drop it when the transaction ends: a
    /// reopen waits for every holder).
    pub fn get(&self) -> Result<Arc<Database>, DbError> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| DbError::Closed(self.path.clone()))
    }

    /// Closes the database and opens it again, after an I/O error latched it.
    /// Blocking: waits up to a few seconds for transactions in flight.
    pub fn reopen(&self) -> Result<(), DbError> {
        self.reopen_within(DRAIN_PATIENCE)
    }

    fn reopen_within(&self, patience: Duration) -> Result<(), DbError> {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if let Some(db) = current.take() {
            let deadline = Instant::now() + patience;
            let mut db = db;
            // Only this handle may be left when the file is closed.
            loop {
                match Arc::try_unwrap(db) {
                    Ok(owned) => {
                        drop(owned);
                        break;
                    }
                    Err(shared) if Instant::now() < deadline => {
                        db = shared;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(shared) => {
                        *current = Some(shared);
                        return Err(DbError::Busy(self.path.clone()));
                    }
                }
            }
        }
        let db = (self.opener)().map_err(|source| DbError::Open {
            path: self.path.clone(),
            source,
        })?;
        *current = Some(Arc::new(db));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{ReadableDatabase, TableDefinition};

    const T: TableDefinition<&str, u64> = TableDefinition::new("t");

    #[test]
    fn reopen_waits_for_holders_and_keeps_committed_data() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path().join("state.redb")).unwrap();
        {
            let d = db.get().unwrap();
            let w = d.begin_write().unwrap();
            w.open_table(T).unwrap().insert("a", 1).unwrap();
            w.commit().unwrap();
        }
        // A holder that lets go shortly after the reopen starts.
        let held = db.get().unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(held);
        });
        db.reopen().unwrap();
        t.join().unwrap();
        let d = db.get().unwrap();
        let r = d.begin_read().unwrap();
        assert_eq!(
            r.open_table(T).unwrap().get("a").unwrap().unwrap().value(),
            1
        );
    }

    #[test]
    fn a_holder_that_never_lets_go_makes_reopen_busy() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path().join("state.redb")).unwrap();
        let _held = db.get().unwrap();
        let busy = db.reopen_within(Duration::from_millis(50));
        assert!(matches!(busy, Err(DbError::Busy(_))), "{busy:?}");
        // Still usable.
        db.get().unwrap().begin_read().unwrap();
    }
}
