//! The adapter registry: LoRA adapters servable by name, loaded from folders under a configured
//! adapter root (paths outside it are refused), replaced or unloaded at run time. Requests pick an
//! adapter by putting its name in `model`.
//!
//! The map sits behind a std `RwLock` that is only ever held for a lookup or an insert — never across
//! an `.await` or while reading files.

use qlorad_model::{Config, LoraAdapter};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// Why an adapter operation failed (mapped to HTTP by the API layer).
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// Name does not match `[A-Za-z0-9._:-]{1,128}` or clashes with the base model id.
    #[error("invalid adapter name {0:?}: use 1-128 characters from A-Z a-z 0-9 . _ : -")]
    BadName(String),
    #[error("adapter name {0:?} is the base model's id")]
    NameIsBase(String),
    /// The path escapes the adapter root (or no root is configured).
    #[error("{0}")]
    Forbidden(String),
    #[error("adapter {0:?} not found")]
    NotFound(String),
    /// The folder is not a usable PEFT adapter for this base.
    #[error("{0}")]
    Invalid(String),
}

/// Checks an adapter name: `[A-Za-z0-9._:-]{1,128}`.
pub fn valid_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Summary of a loaded adapter.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterInfo {
    pub name: String,
    pub path: String,
    pub bytes: usize,
}

struct Entry {
    adapter: Arc<LoraAdapter>,
    path: PathBuf,
}

pub struct AdapterRegistry {
    root: Option<PathBuf>,
    base_id: String,
    base: Config,
    map: RwLock<BTreeMap<String, Entry>>,
}

impl AdapterRegistry {
    /// `root`: the folder adapters must live under (canonicalized); `None` refuses runtime loads.
    pub fn new(root: Option<PathBuf>, base_id: &str, base: Config) -> Self {
        Self {
            root: root.and_then(|r| r.canonicalize().ok()),
            base_id: base_id.to_string(),
            base,
            map: RwLock::new(BTreeMap::new()),
        }
    }

    /// Resolves a requested path (absolute, or relative to the root) and checks it stays inside
    /// the root after symlinks and `..` are resolved.
    pub fn resolve(&self, path: &str) -> Result<PathBuf, AdapterError> {
        let Some(root) = &self.root else {
            return Err(AdapterError::Forbidden(
                "no adapter root is configured (--adapter-root): runtime adapter loading is disabled".into(),
            ));
        };
        let p = Path::new(path);
        let joined = if p.is_absolute() {
            p.to_path_buf()
        } else {
            root.join(p)
        };
        let real = joined.canonicalize().map_err(|_| {
            AdapterError::Invalid(format!(
                "adapter folder {path:?} does not exist under the adapter root"
            ))
        })?;
        if !real.starts_with(root) {
            return Err(AdapterError::Forbidden(format!(
                "adapter path {path:?} is outside the adapter root"
            )));
        }
        Ok(real)
    }

    /// Loads (or replaces) adapter `name` from `dir` (blocking file reads: call off the async threads).
    pub fn load(&self, name: &str, dir: &Path) -> Result<AdapterInfo, AdapterError> {
        if !valid_name(name) {
            return Err(AdapterError::BadName(name.to_string()));
        }
        if name == self.base_id {
            return Err(AdapterError::NameIsBase(name.to_string()));
        }
        let adapter = LoraAdapter::load(dir, name, &self.base)
            .map_err(|e| AdapterError::Invalid(e.to_string()))?;
        let info = AdapterInfo {
            name: name.to_string(),
            path: dir.display().to_string(),
            bytes: adapter.bytes(),
        };
        let entry = Entry {
            adapter: Arc::new(adapter),
            path: dir.to_path_buf(),
        };
        self.write().insert(name.to_string(), entry);
        Ok(info)
    }

    pub fn unload(&self, name: &str) -> Result<(), AdapterError> {
        self.write()
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| AdapterError::NotFound(name.to_string()))
    }

    pub fn get(&self, name: &str) -> Option<Arc<LoraAdapter>> {
        self.read().get(name).map(|e| e.adapter.clone())
    }

    pub fn list(&self) -> Vec<AdapterInfo> {
        self.read()
            .iter()
            .map(|(n, e)| AdapterInfo {
                name: n.clone(),
                path: e.path.display().to_string(),
                bytes: e.adapter.bytes(),
            })
            .collect()
    }

    pub fn total_bytes(&self) -> usize {
        self.read().values().map(|e| e.adapter.bytes()).sum()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Entry>> {
        // A panic while holding the lock cannot leave the map inconsistent (inserts/removes are
        // single calls), so a poisoned lock is still usable.
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Entry>> {
        self.map.write().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        for ok in ["a", "ft:smollm2:demo:job-1", "my_adapter-v1.2"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "a b", "../x", "a/b", &"x".repeat(129), "é"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
