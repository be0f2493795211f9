//! Image records in redb. Tables are prefixed `image_`; one record per image id.

use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use vessel_storage::db::Db;

use crate::{Image, ImageError};

/// id → JSON [`Record`].
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("image_records");
/// id → raw image config.
const CONFIGS: TableDefinition<&str, &[u8]> = TableDefinition::new("image_configs");

/// What is kept per image besides its config.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub(crate) struct Record {
    pub id: String,
    pub repo_tags: Vec<String>,
    pub repo_digests: Vec<String>,
    pub size: u64,
    pub user: String,
    pub chain_ids: Vec<String>,
    /// Every blob the image needs kept: index, manifest, config, layers.
    pub blobs: Vec<String>,
    #[serde(default)]
    pub pinned: bool,
}

impl Record {
    pub(crate) fn into_image(self, config_json: Vec<u8>) -> Image {
        Image {
            id: self.id,
            repo_tags: self.repo_tags,
            repo_digests: self.repo_digests,
            size: self.size,
            user: self.user,
            chain_ids: self.chain_ids,
            config_json,
            pinned: self.pinned,
        }
    }
}

/// The image tables of the shared database.
#[derive(Clone)]
pub(crate) struct Meta {
    db: Arc<Db>,
}

fn decode(id: &str, raw: &[u8]) -> Result<Record, ImageError> {
    serde_json::from_slice(raw).map_err(|e| ImageError::Store(format!("record {id}: {e}")))
}

fn encode(r: &Record) -> Vec<u8> {
    serde_json::to_vec(r).unwrap_or_default()
}

/// Changes applied in one write transaction.
pub(crate) struct Txn<'a> {
    records: redb::Table<'a, &'static str, &'static [u8]>,
    configs: redb::Table<'a, &'static str, &'static [u8]>,
}

impl Txn<'_> {
    pub(crate) fn all(&self) -> Result<Vec<Record>, ImageError> {
        let mut out = Vec::new();
        for item in self.records.iter().map_err(ImageError::store)? {
            let (k, v) = item.map_err(ImageError::store)?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    pub(crate) fn put(&mut self, r: &Record, config: Option<&[u8]>) -> Result<(), ImageError> {
        self.records
            .insert(r.id.as_str(), encode(r).as_slice())
            .map_err(ImageError::store)?;
        if let Some(c) = config {
            self.configs
                .insert(r.id.as_str(), c)
                .map_err(ImageError::store)?;
        }
        Ok(())
    }

    pub(crate) fn delete(&mut self, id: &str) -> Result<(), ImageError> {
        self.records.remove(id).map_err(ImageError::store)?;
        self.configs.remove(id).map_err(ImageError::store)?;
        Ok(())
    }
}

impl Meta {
    /// Creates the tables if needed.
    pub(crate) fn open(db: Arc<Db>) -> Result<Self, ImageError> {
        let m = Meta { db };
        m.write(|_| Ok(()))?;
        Ok(m)
    }

    /// Runs `f` in one write transaction, committed only if it returns Ok.
    pub(crate) fn write<T>(
        &self,
        f: impl FnOnce(&mut Txn<'_>) -> Result<T, ImageError>,
    ) -> Result<T, ImageError> {
        let db = self.database()?;
        let wtx = match db.begin_write() {
            Ok(w) => w,
            // Latched by an earlier I/O error (a full disk): reopen, try once more.
            Err(_) => {
                drop(db);
                self.db.reopen().map_err(ImageError::store)?;
                self.database()?.begin_write().map_err(ImageError::store)?
            }
        };
        let out = {
            let mut txn = Txn {
                records: wtx.open_table(RECORDS).map_err(ImageError::store)?,
                configs: wtx.open_table(CONFIGS).map_err(ImageError::store)?,
            };
            f(&mut txn)?
        };
        wtx.commit().map_err(ImageError::store)?;
        Ok(out)
    }

    /// The database for one transaction.
    fn database(&self) -> Result<Arc<Database>, ImageError> {
        self.db.get().map_err(ImageError::store)
    }

    /// A read transaction, reopening the database once if an I/O error latched it.
    fn read(&self) -> Result<redb::ReadTransaction, ImageError> {
        // The handle is dropped before a reopen, which waits for every holder.
        let first = self.database()?.begin_read();
        match first {
            Ok(r) => Ok(r),
            Err(_) => {
                self.db.reopen().map_err(ImageError::store)?;
                self.database()?.begin_read().map_err(ImageError::store)
            }
        }
    }

    /// All records (without configs).
    pub(crate) fn records(&self) -> Result<Vec<Record>, ImageError> {
        let rtx = self.read()?;
        let table = rtx.open_table(RECORDS).map_err(ImageError::store)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(ImageError::store)? {
            let (k, v) = item.map_err(ImageError::store)?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// All images, with configs, sorted by id.
    pub(crate) fn images(&self) -> Result<Vec<Image>, ImageError> {
        let rtx = self.read()?;
        let records = rtx.open_table(RECORDS).map_err(ImageError::store)?;
        let configs = rtx.open_table(CONFIGS).map_err(ImageError::store)?;
        let mut out = Vec::new();
        for item in records.iter().map_err(ImageError::store)? {
            let (k, v) = item.map_err(ImageError::store)?;
            let r = decode(k.value(), v.value())?;
            let config = configs
                .get(k.value())
                .map_err(ImageError::store)?
                .map(|c| c.value().to_vec())
                .unwrap_or_default();
            out.push(r.into_image(config));
        }
        Ok(out)
    }
}
