//! Reading Hugging Face weight folders: one `model.safetensors`, a sharded set described by
//! `model.safetensors.index.json`, or every `*.safetensors` in the folder. Files are memory-mapped;
//! tensors are converted to f32 on request.

use crate::error::{ModelError, Result};
use candle_core::{Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

struct WeightFile {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    metadata: Metadata,
}

/// A raw tensor as stored: dtype, shape and little-endian bytes.
pub struct RawTensor<'a> {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
    pub path: &'a Path,
}

/// The tensors of a model folder, by name.
pub struct WeightStore {
    dir: PathBuf,
    files: Vec<WeightFile>,
    index: HashMap<String, usize>,
}

impl WeightStore {
    /// Opens the safetensors files of `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_files(dir, weight_files(dir)?)
    }

    /// Maps exactly these files (e.g. a PEFT adapter's `adapter_model.safetensors`, ignoring an
    /// `optimizer.safetensors` beside it).
    pub fn open_files(dir: &Path, paths: Vec<PathBuf>) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for path in paths {
            let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
            // SAFETY: the file is opened read-only; like every mmap-based loader (candle, safetensors)
            // we assume it is not truncated while mapped.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
            let (header_len, metadata) =
                SafeTensors::read_metadata(&mmap).map_err(|e| ModelError::Safetensors {
                    path: path.clone(),
                    msg: e.to_string(),
                })?;
            for name in metadata.tensors().keys() {
                index.insert(name.clone(), files.len());
            }
            files.push(WeightFile {
                path,
                mmap,
                header_len,
                metadata,
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            index,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    fn info(&self, name: &str) -> Result<(&WeightFile, &TensorInfo)> {
        let f = self
            .index
            .get(name)
            .map(|&i| &self.files[i])
            .ok_or_else(|| ModelError::MissingTensor {
                dir: self.dir.clone(),
                name: name.to_string(),
            })?;
        let info = f
            .metadata
            .info(name)
            .ok_or_else(|| ModelError::MissingTensor {
                dir: self.dir.clone(),
                name: name.to_string(),
            })?;
        Ok((f, info))
    }

    /// The stored bytes of a tensor.
    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let (f, info) = self.info(name)?;
        let (a, b) = info.data_offsets;
        let start = 8 + f.header_len;
        let data = f
            .mmap
            .get(start + a..start + b)
            .ok_or_else(|| ModelError::BadTensor {
                path: f.path.clone(),
                name: name.to_string(),
                msg: "data extends past the end of the file (truncated?)".into(),
            })?;
        Ok(RawTensor {
            dtype: info.dtype,
            shape: info.shape.clone(),
            data,
            path: &f.path,
        })
    }

    /// Drops the pages of tensor `name` from this process's resident set (they stay in the page cache
    /// and are read back on the next access). A streaming pass over a model calls this after each
    /// tensor, so its resident memory stays about one tensor instead of the whole mapped file.
    /// A no-op for unknown names and on non-Unix systems.
    pub fn release(&self, name: &str) {
        #[cfg(unix)]
        if let Ok((f, info)) = self.info(name) {
            let (a, b) = info.data_offsets;
            let start = 8 + f.header_len + a;
            if b > a && start + (b - a) <= f.mmap.len() {
                // SAFETY: `Mmap::map` maps the file shared and read-only. MADV_DONTNEED on a shared
                // file mapping only drops page-table entries: a later read faults the same file bytes
                // back in, so no slice borrowed from the map ever observes different contents (the
                // undefined behaviour memmap2 warns about concerns private/anonymous mappings, whose
                // contents are discarded). Failure only means the pages stay resident.
                let _ = unsafe {
                    f.mmap
                        .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, b - a)
                };
            }
        }
    }

    /// A float tensor converted to f32, checked against an expected shape if given.
    pub fn f32_tensor(&self, name: &str, expect: Option<&[usize]>) -> Result<Tensor> {
        let raw = self.raw(name)?;
        if let Some(shape) = expect {
            if raw.shape != shape {
                return Err(ModelError::BadTensor {
                    path: raw.path.to_path_buf(),
                    name: name.to_string(),
                    msg: format!("shape {:?}, expected {:?}", raw.shape, shape),
                });
            }
        }
        let values = raw.to_f32_vec().map_err(|msg| ModelError::BadTensor {
            path: raw.path.to_path_buf(),
            name: name.to_string(),
            msg,
        })?;
        Ok(Tensor::from_vec(values, raw.shape.clone(), &Device::Cpu)?)
    }
}

impl RawTensor<'_> {
    /// Converts a float tensor's bytes to f32 values.
    pub fn to_f32_vec(&self) -> std::result::Result<Vec<f32>, String> {
        let d = self.data;
        let n: usize = self.shape.iter().product();
        let width = match self.dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::F64 => 8,
            other => return Err(format!("dtype {other:?} is not a float type")),
        };
        if d.len() != n * width {
            return Err(format!(
                "{} bytes for {n} elements of {:?}",
                d.len(),
                self.dtype
            ));
        }
        Ok(match self.dtype {
            Dtype::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => d
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => d
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => d
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
        })
    }
}

/// The safetensors files of a model folder, in a stable order.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(ModelError::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
        ));
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Safetensors {
                path: index.clone(),
                msg: e.to_string(),
            })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::Safetensors {
                path: index.clone(),
                msg: "no weight_map object".into(),
            })?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|f| f.as_str().map(String::from))
            .collect();
        files.sort();
        files.dedup();
        return files
            .into_iter()
            .map(|f| {
                if f.contains('/') || f.contains("..") {
                    return Err(ModelError::Safetensors {
                        path: index.clone(),
                        msg: format!("shard name {f:?} is not a plain file name"),
                    });
                }
                Ok(dir.join(f))
            })
            .collect();
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::io(
            dir,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no *.safetensors weight files",
            ),
        ));
    }
    Ok(files)
}
