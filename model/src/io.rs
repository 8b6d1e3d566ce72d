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
    pub fn commit(mut self) -> Result<()> {
        File::open(&self.tmp)
            .and_then(|d| d.sync_all())
            .map_err(|e| ModelError::io(&self.tmp, e))?;
        if self.target.exists() {
            std::fs::remove_dir_all(&self.target).map_err(|e| ModelError::io(&self.target, e))?;
        }
        std::fs::rename(&self.tmp, &self.target).map_err(|e| ModelError::io(&self.target, e))?;
        self.committed = true;
        // The rename is durable only once the parent directory's entry is on disk.
        if let Some(parent) = self.target.parent().filter(|p| !p.as_os_str().is_empty()) {
            let _ = File::open(parent).and_then(|d| d.sync_all());
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

/// Copies the tokenizer and generation files of a model folder that exist.
pub fn copy_aux_files(src: &Path, dst: &Path) -> Result<()> {
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ] {
        let s = src.join(f);
        if s.exists() {
            std::fs::copy(&s, dst.join(f)).map_err(|e| ModelError::io(&s, e))?;
        }
    }
    Ok(())
}
