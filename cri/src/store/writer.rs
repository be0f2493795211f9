//! The one thread that commits the state store's changes to redb, in the order the
//! store applied them in memory. Each batch of queued changes is one write
//! transaction (one fsync), so a burst of changes from many pods costs one commit,
//! and no async worker ever waits for the disk.
//!
//! A failed commit (a full disk, say) keeps its changes and the writer retries
//! them every [`RETRY_PAUSE`], reopening the database first (redb refuses every
//! transaction after an I/O error until then), with the changes queued behind them,
//! in order. Meanwhile the store refuses new changes (`send` fails before memory
//! changes), so memory stays what the file holds plus what is retried and the file
//! always holds a prefix of what was applied. Once a retry commits, the store takes
//! changes again: space coming back needs no restart.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use redb::TableDefinition;
use vessel_storage::db::Db;

use super::StoreError;

/// A change the writer commits, or a flush marker it answers once everything
/// queued before it is committed.
pub(super) enum Op {
    Put {
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        id: String,
        raw: Vec<u8>,
    },
    Delete {
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        id: String,
    },
    Flush(tokio::sync::oneshot::Sender<Result<(), String>>),
}

/// How many queued changes one transaction takes at most (bounds its size).
const MAX_BATCH: usize = 1024;
/// Pause between retries of a failed commit.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// The handle the store sends changes through; dropping the last one lets the
/// thread commit what is queued and then joins it.
pub(super) struct Writer {
    tx: Option<mpsc::Sender<Op>>,
    thread: Option<JoinHandle<()>>,
    /// The first commit error, once one happened.
    failed: Arc<Mutex<Option<String>>>,
}

impl Writer {
    pub(super) fn start(db: Arc<Db>) -> Result<Self, StoreError> {
        let (tx, rx) = mpsc::channel();
        let failed = Arc::new(Mutex::new(None));
        let failed_in_thread = failed.clone();
        let thread = std::thread::Builder::new()
            .name("state-writer".into())
            .spawn(move || run(&db, &rx, &failed_in_thread))
            .map_err(|e| StoreError::Db(format!("cannot start the state writer thread: {e}")))?;
        Ok(Writer {
            tx: Some(tx),
            thread: Some(thread),
            failed,
        })
    }

    /// The commit error the writer is retrying past, if any.
    pub(super) fn check(&self) -> Result<(), StoreError> {
        match &*self.failed.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(failed_error(e)),
            None => Ok(()),
        }
    }

    /// Queues `op` behind everything sent before it.
    pub(super) fn send(&self, op: Op) -> Result<(), StoreError> {
        self.check()?;
        let sent = self.tx.as_ref().map(|tx| tx.send(op));
        match sent {
            Some(Ok(())) => Ok(()),
            _ => Err(StoreError::Db("the state writer thread is gone".into())),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop after the last batch.
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the state writer thread panicked; recent changes may be lost");
            }
        }
    }
}

pub(super) fn failed_error(e: &str) -> StoreError {
    StoreError::Unsaved(format!(
        "the state store cannot save changes ({e}); vesseld retries every second and \
         takes changes again once a save works: free space on the disk of its root, then \
         retry the call"
    ))
}

fn run(db: &Db, rx: &mpsc::Receiver<Op>, failed: &Mutex<Option<String>>) {
    // Changes not committed yet (only after a failure): retried, in order, ahead of
    // everything later.
    let mut pending: Vec<Op> = Vec::new();
    loop {
        let first = if pending.is_empty() {
            match rx.recv() {
                Ok(op) => Some(op),
                Err(_) => return, // closed, nothing left
            }
        } else {
            match rx.recv_timeout(RETRY_PAUSE) {
                Ok(op) => Some(op),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    if let Err(e) = retry(db, &pending) {
                        tracing::error!(error = %e, changes = pending.len(),
                            "state commit failed at shutdown: these changes are not saved");
                    }
                    return;
                }
            }
        };
        let mut waiters = Vec::new();
        for op in first
            .into_iter()
            .chain(std::iter::from_fn(|| rx.try_recv().ok()))
        {
            match op {
                Op::Flush(w) => waiters.push(w),
                change => pending.push(change),
            }
            if pending.len() >= MAX_BATCH {
                break;
            }
        }
        let result = if pending.is_empty() {
            Ok(())
        } else {
            let retrying = failed.lock().unwrap_or_else(|p| p.into_inner()).is_some();
            let done = if retrying {
                retry(db, &pending)
            } else {
                commit(db, &pending)
            };
            let mut f = failed.lock().unwrap_or_else(|p| p.into_inner());
            match done {
                Ok(()) => {
                    pending.clear();
                    if f.take().is_some() {
                        tracing::info!("state commits work again; the store takes changes");
                    }
                    Ok(())
                }
                Err(e) => {
                    if f.is_none() {
                        tracing::error!(error = %e, changes = pending.len(),
                            "state commit failed: new changes are refused while it is retried");
                    }
                    *f = Some(e.clone());
                    Err(e)
                }
            }
        };
        for w in waiters {
            // A flusher that gave up is no error.
            let _ = w.send(result.clone());
        }
    }
}

/// A retry after a failure: the database is reopened first (redb refuses every
/// transaction after an I/O error until it is).
fn retry(db: &Db, changes: &[Op]) -> Result<(), String> {
    db.reopen().map_err(|e| e.to_string())?;
    commit(db, changes)
}

/// One write transaction applying `changes` in order.
fn commit(db: &Db, changes: &[Op]) -> Result<(), String> {
    let db = db.get().map_err(|e| e.to_string())?;
    let wtx = db.begin_write().map_err(|e| e.to_string())?;
    for op in changes {
        match op {
            Op::Put { table, id, raw } => {
                let mut t = wtx.open_table(*table).map_err(|e| e.to_string())?;
                t.insert(id.as_str(), raw.as_slice())
                    .map_err(|e| format!("{id}: {e}"))?;
            }
            Op::Delete { table, id } => {
                let mut t = wtx.open_table(*table).map_err(|e| e.to_string())?;
                t.remove(id.as_str()).map_err(|e| format!("{id}: {e}"))?;
            }
            Op::Flush(_) => {}
        }
    }
    wtx.commit().map_err(|e| e.to_string())
}
