//! The one thread that commits the state store's changes to redb, in the order the
//! store applied them in memory. Each batch of queued changes is one write
//! transaction (one fsync), so a burst of changes from many pods costs one commit,
//! and no async worker ever waits for the disk.
//!
//! A failed commit stops the writer for good: later changes are dropped rather
//! than committed after a lost one (the file always holds a prefix of what was
//! applied), and every later write and flush returns the error.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use redb::{Database, TableDefinition};

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

/// The handle the store sends changes through; dropping the last one lets the
/// thread commit what is queued and then joins it.
pub(super) struct Writer {
    tx: Option<mpsc::Sender<Op>>,
    thread: Option<JoinHandle<()>>,
    /// The first commit error, once one happened.
    failed: Arc<Mutex<Option<String>>>,
}

impl Writer {
    pub(super) fn start(db: Arc<Database>) -> Result<Self, StoreError> {
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

    /// The commit error that stopped the writer, if any.
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
    StoreError::Db(format!(
        "a state commit failed, later changes are not saved ({e}); fix the disk and restart vesseld"
    ))
}

fn run(db: &Database, rx: &mpsc::Receiver<Op>, failed: &Mutex<Option<String>>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let mut waiters = Vec::new();
        let mut changes = Vec::new();
        for op in batch {
            match op {
                Op::Flush(w) => waiters.push(w),
                change => changes.push(change),
            }
        }
        let stopped = failed.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let result = match stopped {
            Some(e) => Err(e),
            None if changes.is_empty() => Ok(()),
            None => commit(db, &changes).map_err(|e| {
                tracing::error!(
                    error = %e,
                    changes = changes.len(),
                    "state commit failed: these and all later changes are not saved"
                );
                *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
                e
            }),
        };
        for w in waiters {
            // A flusher that gave up is no error.
            let _ = w.send(result.clone());
        }
    }
}

/// One write transaction applying `changes` in order.
fn commit(db: &Database, changes: &[Op]) -> Result<(), String> {
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
