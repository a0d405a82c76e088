//! What the coordinator keeps across restarts, in one redb file: the image
//! catalogue (raw manifest bytes), settings, path measurements and prefetch
//! hints. Inventories are not kept: agents report them again on reconnect.

use std::path::{Path, PathBuf};

use edgeshift_common::{Fingerprint, ManifestId};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const MANIFESTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("manifests");
const SETTINGS: TableDefinition<&str, &str> = TableDefinition::new("settings");
const PATHS: TableDefinition<(&str, &str), f64> = TableDefinition::new("paths");
const HINTS: TableDefinition<(&str, &[u8]), u64> = TableDefinition::new("hints");
/// Lease id → postcard-encoded [`LeaseRecord`].
const LEASES: TableDefinition<u64, &[u8]> = TableDefinition::new("leases");

pub const DB_FILE: &str = "coordinator.redb";

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("create data directory {0}: {1}")]
    CreateDir(PathBuf, std::io::Error),
    #[error("database {path}: {source}")]
    Db { path: PathBuf, source: redb::Error },
    #[error("database {path} holds a bad record in table {table}: {why}")]
    Corrupt {
        path: PathBuf,
        table: &'static str,
        why: String,
    },
}

/// Everything read back at start-up.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub manifests: Vec<Vec<u8>>,
    pub settings: Vec<(String, String)>,
    pub paths: Vec<(String, String, f64)>,
    pub hints: Vec<(String, ManifestId, u64)>,
    pub leases: Vec<(u64, LeaseRecord)>,
}

/// A lease as stored: its deadline and, per source edge, the chunks it protects there.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LeaseRecord {
    pub deadline_ms: u64,
    pub entries: Vec<(String, Vec<Fingerprint>)>,
}

pub struct Store {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (or creates) `DIR/coordinator.redb`.
    pub fn open(dir: &Path) -> Result<Self, PersistError> {
        std::fs::create_dir_all(dir).map_err(|e| PersistError::CreateDir(dir.to_path_buf(), e))?;
        let path = dir.join(DB_FILE);
        let db = Database::create(&path).map_err(|e| PersistError::Db {
            path: path.clone(),
            source: e.into(),
        })?;
        let store = Store { db, path };
        // Create every table so that read transactions find them.
        store.write(|tx| {
            tx.open_table(MANIFESTS)?;
            tx.open_table(SETTINGS)?;
            tx.open_table(PATHS)?;
            tx.open_table(HINTS)?;
            tx.open_table(LEASES)?;
            Ok(())
        })?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db_err(&self, e: impl Into<redb::Error>) -> PersistError {
        PersistError::Db {
            path: self.path.clone(),
            source: e.into(),
        }
    }

    fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), PersistError> {
        let tx = self.db.begin_write().map_err(|e| self.db_err(e))?;
        f(&tx).map_err(|e| self.db_err(e))?;
        tx.commit().map_err(|e| self.db_err(e))
    }

    pub fn put_manifest(&self, id: &ManifestId, bytes: &[u8]) -> Result<(), PersistError> {
        self.write(|tx| {
            tx.open_table(MANIFESTS)?
                .insert(id.as_bytes().as_slice(), bytes)?;
            Ok(())
        })
    }

    pub fn put_setting(&self, key: &str, json: &str) -> Result<(), PersistError> {
        self.write(|tx| {
            tx.open_table(SETTINGS)?.insert(key, json)?;
            Ok(())
        })
    }

    /// Records measured rates `source → dest` in one transaction.
    pub fn put_paths(&self, dest: &str, rates: &[(String, f64)]) -> Result<(), PersistError> {
        self.write(|tx| {
            let mut t = tx.open_table(PATHS)?;
            for (source, rate) in rates {
                t.insert((source.as_str(), dest), *rate)?;
            }
            Ok(())
        })
    }

    pub fn put_hint(&self, edge: &str, manifest: &ManifestId, at_ms: u64) -> Result<(), PersistError> {
        self.write(|tx| {
            tx.open_table(HINTS)?
                .insert((edge, manifest.as_bytes().as_slice()), at_ms)?;
            Ok(())
        })
    }

    pub fn delete_hint(&self, edge: &str, manifest: &ManifestId) -> Result<bool, PersistError> {
        let mut found = false;
        self.write(|tx| {
            found = tx
                .open_table(HINTS)?
                .remove((edge, manifest.as_bytes().as_slice()))?
                .is_some();
            Ok(())
        })?;
        Ok(found)
    }

    pub fn put_lease(&self, id: u64, lease: &LeaseRecord) -> Result<(), PersistError> {
        let bytes = postcard::to_allocvec(lease).map_err(|e| PersistError::Corrupt {
            path: self.path.clone(),
            table: "leases",
            why: format!("encoding: {e}"),
        })?;
        self.write(|tx| {
            tx.open_table(LEASES)?.insert(id, bytes.as_slice())?;
            Ok(())
        })
    }

    pub fn delete_leases(&self, ids: &[u64]) -> Result<(), PersistError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.write(|tx| {
            let mut t = tx.open_table(LEASES)?;
            for id in ids {
                t.remove(id)?;
            }
            Ok(())
        })
    }

    pub fn load(&self) -> Result<Snapshot, PersistError> {
        let tx = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let mut snap = Snapshot::default();
        let t = tx.open_table(MANIFESTS).map_err(|e| self.db_err(e))?;
        for row in t.iter().map_err(|e| self.db_err(e))? {
            let (_, v) = row.map_err(|e| self.db_err(e))?;
            snap.manifests.push(v.value().to_vec());
        }
        let t = tx.open_table(SETTINGS).map_err(|e| self.db_err(e))?;
        for row in t.iter().map_err(|e| self.db_err(e))? {
            let (k, v) = row.map_err(|e| self.db_err(e))?;
            snap.settings.push((k.value().to_string(), v.value().to_string()));
        }
        let t = tx.open_table(PATHS).map_err(|e| self.db_err(e))?;
        for row in t.iter().map_err(|e| self.db_err(e))? {
            let (k, v) = row.map_err(|e| self.db_err(e))?;
            let (s, d) = k.value();
            snap.paths.push((s.to_string(), d.to_string(), v.value()));
        }
        let t = tx.open_table(HINTS).map_err(|e| self.db_err(e))?;
        for row in t.iter().map_err(|e| self.db_err(e))? {
            let (k, v) = row.map_err(|e| self.db_err(e))?;
            let (edge, m) = k.value();
            let m: [u8; 32] = m.try_into().map_err(|_| PersistError::Corrupt {
                path: self.path.clone(),
                table: "hints",
                why: format!("manifest id of {} bytes", m.len()),
            })?;
            snap.hints.push((edge.to_string(), Fingerprint(m), v.value()));
        }
        let t = tx.open_table(LEASES).map_err(|e| self.db_err(e))?;
        for row in t.iter().map_err(|e| self.db_err(e))? {
            let (k, v) = row.map_err(|e| self.db_err(e))?;
            let rec: LeaseRecord = postcard::from_bytes(v.value()).map_err(|e| PersistError::Corrupt {
                path: self.path.clone(),
                table: "leases",
                why: e.to_string(),
            })?;
            snap.leases.push((k.value(), rec));
        }
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = Fingerprint::of(b"m");
        {
            let s = Store::open(dir.path()).expect("open");
            s.put_manifest(&m, b"bytes").expect("put");
            s.put_setting("policy", "{\"policy\":\"lfu\"}").expect("put");
            s.put_paths("b", &[("a".into(), 5e6), ("c".into(), 1e6)])
                .expect("put");
            s.put_hint("b", &m, 42).expect("put");
            s.put_hint("c", &m, 43).expect("put");
            assert!(s.delete_hint("c", &m).expect("delete"));
            assert!(!s.delete_hint("c", &m).expect("delete"));
            let rec = LeaseRecord {
                deadline_ms: 9,
                entries: vec![("a".into(), vec![m])],
            };
            s.put_lease(7, &rec).expect("lease");
            s.put_lease(8, &rec).expect("lease");
            s.delete_leases(&[8]).expect("delete lease");
        }
        let s = Store::open(dir.path()).expect("reopen");
        let snap = s.load().expect("load");
        assert_eq!(snap.manifests, vec![b"bytes".to_vec()]);
        assert_eq!(
            snap.settings,
            vec![("policy".into(), "{\"policy\":\"lfu\"}".into())]
        );
        assert_eq!(
            snap.paths,
            vec![("a".into(), "b".into(), 5e6), ("c".into(), "b".into(), 1e6)]
        );
        assert_eq!(snap.hints, vec![("b".into(), m, 42)]);
        assert_eq!(snap.leases.len(), 1);
        assert_eq!(snap.leases[0].0, 7);
        assert_eq!(snap.leases[0].1.entries, vec![("a".to_string(), vec![m])]);
    }

    #[test]
    fn unwritable_dir_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").expect("write");
        assert!(matches!(
            Store::open(&file.join("sub")),
            Err(PersistError::CreateDir(..))
        ));
    }
}
