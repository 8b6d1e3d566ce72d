//! Writing model folders safely: safetensors files from owned buffers, JSON files, and a staging
//! directory that becomes visible under its final name only once complete (write, fsync, rename).

use crate::error::{ModelError, Result};
use safetensors::tensor::View;
use safetensors::Dtype;
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// One tensor to write: name, safetensors dtype, shape, little-endian bytes.
#[derive(Debug, Clone)]
pub struct OwnedTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl OwnedTensor {
    pub fn f32(name: &str, shape: Vec<usize>, v: &[f32]) -> Self {
        Self {
            name: name.into(),
            dtype: Dtype::F32,
            shape,
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    /// Stores f32 values as `dtype` (F32, F16 or BF16).
    pub fn float(name: &str, shape: Vec<usize>, v: &[f32], dtype: Dtype) -> Self {
        let data = match dtype {
            Dtype::F16 => v
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect(),
            Dtype::BF16 => v
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect(),
            _ => return Self::f32(name, shape, v),
        };
        Self {
            name: name.into(),
            dtype,
            shape,
            data,
        }
    }
}

impl View for &OwnedTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// torch's name for a safetensors float dtype (what config.json's `torch_dtype` holds).
pub fn torch_dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::F16 => "float16",
        Dtype::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// Writes `tensors` to `path` as one safetensors file (with `{"format": "pt"}` metadata, which
/// transformers expects) and fsyncs it.
pub fn write_safetensors(path: &Path, tensors: &[OwnedTensor]) -> Result<()> {
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize_to_file(
        tensors.iter().map(|t| (t.name.as_str(), t)),
        Some(meta),
        path,
    )
    .map_err(|e| ModelError::Safetensors {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| ModelError::io(path, e))
}

/// Writes pretty JSON to `path`.
pub fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| ModelError::Invalid(e.to_string()))?;
    let write = || -> std::io::Result<()> {
        let mut f = File::create(path)?;
        std::io::Write::write_all(&mut f, (text + "\n").as_bytes())?;
        f.sync_all()
    };
    write().map_err(|e| ModelError::io(path, e))
}

/// A directory written under a temporary name beside its target and renamed into place by
/// [`StagingDir::commit`]; dropped without commit, it is removed. Readers never see a half-written
/// folder under the target name.
pub struct StagingDir {
    tmp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl StagingDir {
    /// Refuses an existing target unless `overwrite`.
    pub fn new(target: &Path, overwrite: bool) -> Result<Self> {
        if target.exists() && !overwrite {
            return Err(ModelError::io(
                target,
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "output already exists (pass --overwrite to replace it)",
                ),
            ));
        }
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| ModelError::io(&parent, e))?;
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        sweep_stale_staging(&parent, &name);
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
        Ok(Self {
            tmp,
            target: target.to_path_buf(),
            committed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// fsyncs the staged folder and renames it to the target (replacing an old one if allowed).
    /// An old target is first renamed aside (atomic) and deleted only once the new folder is in
    /// place, so a crash never leaves a half-deleted folder under the target name.
    pub fn commit(mut self) -> Result<()> {
        File::open(&self.tmp)
            .and_then(|d| d.sync_all())
            .map_err(|e| ModelError::io(&self.tmp, e))?;
        let old = self.target.exists().then(|| {
            let mut name = self.tmp.clone().into_os_string();
            name.push(".old");
            PathBuf::from(name)
        });
        if let Some(old) = &old {
            std::fs::rename(&self.target, old).map_err(|e| ModelError::io(&self.target, e))?;
        }
        if let Err(e) = std::fs::rename(&self.tmp, &self.target) {
            if let Some(old) = &old {
                let _ = std::fs::rename(old, &self.target); // put the previous folder back
            }
            return Err(ModelError::io(&self.target, e));
        }
        self.committed = true;
        // The rename is durable once the parent directory is synced.
        if let Some(parent) = self.target.parent().filter(|p| !p.as_os_str().is_empty()) {
            let _ = File::open(parent).and_then(|d| d.sync_all());
        }
        if let Some(old) = &old {
            std::fs::remove_dir_all(old).map_err(|e| ModelError::io(old, e))?;
        }
        Ok(())
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Removes staging folders (`.{name}.tmp-{pid}`, and their `.old` leftovers) that a killed process
/// left beside the target. Only on Linux, where `/proc/{pid}` tells whether their owner still runs;
/// a folder whose owner is alive is left alone.
fn sweep_stale_staging(parent: &Path, name: &str) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let pid = rest.strip_suffix(".old").unwrap_or(rest);
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The tokenizer, chat-template and generation files a model folder may hold beside its weights.
pub const AUX_FILES: [&str; 10] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
];

/// Copies the tokenizer and generation files of a model folder that exist.
pub fn copy_aux_files(src: &Path, dst: &Path) -> Result<()> {
    for f in AUX_FILES {
        let s = src.join(f);
        if s.exists() {
            std::fs::copy(&s, dst.join(f)).map_err(|e| ModelError::io(&s, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_commits_over_an_old_target_and_sweeps_dead_leftovers() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("out");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("old"), b"1").unwrap();
        // Left by a killed process: pids above Linux's pid_max (4194304) are never alive.
        let stale = d.path().join(".out.tmp-999999999");
        std::fs::create_dir(&stale).unwrap();
        assert!(StagingDir::new(&target, false).is_err(), "exists");
        let s = StagingDir::new(&target, true).unwrap();
        if Path::new("/proc/self").exists() {
            assert!(!stale.exists(), "stale staging folder swept");
        }
        std::fs::write(s.path().join("new"), b"2").unwrap();
        s.commit().unwrap();
        assert!(target.join("new").exists() && !target.join("old").exists());
        let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(
            left.len(),
            1 + usize::from(stale.exists()),
            "no .old or tmp folder left"
        );
        // Dropped without commit: removed.
        let s = StagingDir::new(&d.path().join("other"), false).unwrap();
        let tmp = s.path().to_path_buf();
        drop(s);
        assert!(!tmp.exists() && !d.path().join("other").exists());
    }
}
