//! Streaming writer of sharded safetensors in the Hugging Face layout (`model-0000k-of-0000n.safetensors`
//! plus `model.safetensors.index.json`, as `save_pretrained` writes them).
//!
//! A safetensors file starts with a JSON header listing every tensor's byte offsets, so writers
//! usually hold a whole shard in memory. Here every tensor's dtype and shape is planned up front:
//! each shard's header is written when the shard is opened and tensors are then appended one at a
//! time, in plan order, so memory holds one tensor, never a shard. Every byte is hashed (sha256) on
//! its way to disk for the export manifest, and each file is fsynced when closed.

use super::{MergeError, Result};
use safetensors::Dtype;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One tensor of the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }

    pub fn nbytes(&self) -> u64 {
        // Export dtypes are whole bytes (F32/F16/BF16); bitsize is exact for those.
        self.numel() * self.dtype.bitsize() as u64 / 8
    }
}

/// A file written into the export: name (relative to the folder), size and sha256 (hex).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct WrittenFile {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

fn io_err(path: &Path, source: std::io::Error) -> MergeError {
    MergeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A file being written: buffered, hashed, fsynced on close.
struct HashedFile {
    path: PathBuf,
    out: BufWriter<File>,
    hasher: Sha256,
    bytes: u64,
}

impl HashedFile {
    fn create(path: &Path) -> Result<Self> {
        let f = File::create(path).map_err(|e| io_err(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(1 << 20, f),
            hasher: Sha256::new(),
            bytes: 0,
        })
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        self.out
            .write_all(data)
            .map_err(|e| io_err(&self.path, e))?;
        self.hasher.update(data);
        self.bytes += data.len() as u64;
        Ok(())
    }

    fn close(self, name: &str) -> Result<WrittenFile> {
        let f = self
            .out
            .into_inner()
            .map_err(|e| io_err(&self.path, e.into_error()))?;
        f.sync_all().map_err(|e| io_err(&self.path, e))?;
        Ok(WrittenFile {
            name: name.to_string(),
            bytes: self.bytes,
            sha256: hex(&self.hasher.finalize()),
        })
    }
}

/// Writes `data` to `dir/name`, fsyncs it and returns its hash.
pub fn write_file(dir: &Path, name: &str, data: &[u8]) -> Result<WrittenFile> {
    let mut f = HashedFile::create(&dir.join(name))?;
    f.write(data)?;
    f.close(name)
}

/// Splits the plan into consecutive shards of at most `max_bytes` of tensor data (a tensor larger
/// than that gets a shard of its own), as huggingface_hub's `split_torch_state_dict_into_shards`.
pub fn plan_shards(specs: &[TensorSpec], max_bytes: u64) -> Vec<Range<usize>> {
    let mut shards = Vec::new();
    let (mut start, mut size) = (0usize, 0u64);
    for (i, s) in specs.iter().enumerate() {
        let n = s.nbytes();
        if i > start && size + n > max_bytes {
            shards.push(start..i);
            start = i;
            size = 0;
        }
        size += n;
    }
    if start < specs.len() {
        shards.push(start..specs.len());
    }
    shards
}

/// The shard file name transformers uses.
fn shard_name(k: usize, n: usize) -> String {
    format!("model-{:05}-of-{n:05}.safetensors", k + 1)
}

/// The safetensors header of a shard: `{"__metadata__": {"format": "pt"}, name: {dtype, shape,
/// data_offsets}}`, data laid out in plan order, padded with spaces to a multiple of 8 bytes (as the
/// safetensors library does, so the data that follows is aligned).
fn header(specs: &[TensorSpec]) -> Result<Vec<u8>> {
    let mut m = Map::new();
    m.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0u64;
    for s in specs {
        let dtype =
            serde_json::to_value(s.dtype).map_err(|e| MergeError::Invalid(e.to_string()))?;
        let end = offset + s.nbytes();
        m.insert(
            s.name.clone(),
            json!({"dtype": dtype, "shape": s.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut text =
        serde_json::to_vec(&Value::Object(m)).map_err(|e| MergeError::Invalid(e.to_string()))?;
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    Ok(out)
}

struct OpenShard {
    index: usize,
    file: HashedFile,
}

/// Writes the planned tensors, in plan order, into shards under `dir`.
pub struct ShardedWriter {
    dir: PathBuf,
    specs: Vec<TensorSpec>,
    shards: Vec<Range<usize>>,
    /// Index of the tensor being written (or next to be started).
    next: usize,
    /// Bytes still expected for the tensor being written (`None`: between tensors).
    remaining: Option<u64>,
    open: Option<OpenShard>,
    files: Vec<WrittenFile>,
    bytes_written: u64,
}

impl ShardedWriter {
    pub fn new(dir: &Path, specs: Vec<TensorSpec>, max_shard_bytes: u64) -> Self {
        let shards = plan_shards(&specs, max_shard_bytes.max(1));
        Self {
            dir: dir.to_path_buf(),
            specs,
            shards,
            next: 0,
            remaining: None,
            open: None,
            files: Vec::new(),
            bytes_written: 0,
        }
    }

    /// Bytes of tensor data written so far (headers not counted, so this ends at the index's
    /// `total_size`).
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    fn shard_of(&self, tensor: usize) -> usize {
        self.shards
            .iter()
            .position(|r| r.contains(&tensor))
            .unwrap_or(self.shards.len())
    }

    /// Starts tensor `name`, which must be the next one of the plan.
    pub fn start_tensor(&mut self, name: &str) -> Result<()> {
        let spec = self.specs.get(self.next).filter(|s| s.name == name);
        let Some(spec) = spec.filter(|_| self.remaining.is_none()) else {
            return Err(MergeError::Invalid(format!(
                "internal: tensor {name} written out of plan order"
            )));
        };
        let nbytes = spec.nbytes();
        let shard = self.shard_of(self.next);
        if self.open.as_ref().map(|o| o.index) != Some(shard) {
            let range = self.shards[shard].clone();
            let path = self.dir.join(shard_name(shard, self.shards.len()));
            let mut file = HashedFile::create(&path)?;
            file.write(&header(&self.specs[range])?)?;
            self.open = Some(OpenShard { index: shard, file });
        }
        self.remaining = Some(nbytes);
        Ok(())
    }

    /// Appends bytes of the tensor being written.
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        let (Some(rem), Some(open)) = (self.remaining.as_mut(), self.open.as_mut()) else {
            return Err(MergeError::Invalid(
                "internal: write outside a tensor".into(),
            ));
        };
        let n = data.len() as u64;
        if n > *rem {
            return Err(MergeError::Invalid(format!(
                "internal: {} bytes more than planned for {}",
                n - *rem,
                self.specs[self.next].name
            )));
        }
        open.file.write(data)?;
        *rem -= n;
        self.bytes_written += n;
        Ok(())
    }

    /// Ends the tensor being written (all its planned bytes must have been written); closes its shard
    /// after the shard's last tensor.
    pub fn finish_tensor(&mut self) -> Result<()> {
        if self.remaining != Some(0) {
            return Err(MergeError::Invalid(format!(
                "internal: tensor {} is incomplete",
                self.specs.get(self.next).map_or("?", |s| s.name.as_str())
            )));
        }
        self.remaining = None;
        self.next += 1;
        let shard = self.shard_of(self.next - 1);
        if self.shards[shard].end == self.next {
            if let Some(open) = self.open.take() {
                let name = shard_name(open.index, self.shards.len());
                self.files.push(open.file.close(&name)?);
            }
        }
        Ok(())
    }

    /// Writes one whole tensor.
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<()> {
        self.start_tensor(name)?;
        self.write(data)?;
        self.finish_tensor()
    }

    /// Checks every tensor was written, writes `model.safetensors.index.json` and returns every file
    /// written (shards, then the index).
    pub fn finish(mut self) -> Result<Vec<WrittenFile>> {
        if self.next != self.specs.len() {
            return Err(MergeError::Invalid(format!(
                "internal: {} of {} tensors written",
                self.next,
                self.specs.len()
            )));
        }
        let mut weight_map = Map::new();
        for (k, r) in self.shards.iter().enumerate() {
            for s in &self.specs[r.clone()] {
                weight_map.insert(s.name.clone(), shard_name(k, self.shards.len()).into());
            }
        }
        let total_size: u64 = self.specs.iter().map(TensorSpec::nbytes).sum();
        let total_parameters: u64 = self.specs.iter().map(TensorSpec::numel).sum();
        let index = json!({
            "metadata": {"total_size": total_size, "total_parameters": total_parameters},
            "weight_map": weight_map,
        });
        let text =
            serde_json::to_string_pretty(&index).map_err(|e| MergeError::Invalid(e.to_string()))?;
        let f = write_file(
            &self.dir,
            "model.safetensors.index.json",
            (text + "\n").as_bytes(),
        )?;
        self.files.push(f);
        Ok(self.files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::SafeTensors;

    fn spec(name: &str, dtype: Dtype, shape: &[usize]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn shards_split_before_overflow_and_isolate_big_tensors() {
        let s = [
            spec("a", Dtype::F32, &[10]),  // 40 bytes
            spec("b", Dtype::F32, &[10]),  // 40
            spec("c", Dtype::F32, &[100]), // 400: alone
            spec("d", Dtype::BF16, &[5]),  // 10
        ];
        assert_eq!(plan_shards(&s, 100), vec![0..2, 2..3, 3..4]);
        assert_eq!(plan_shards(&s, 1000), vec![0..4]);
        assert_eq!(plan_shards(&s[..0], 10), Vec::<Range<usize>>::new());
    }

    #[test]
    fn written_shards_read_back_with_the_safetensors_crate() {
        let d = tempfile::tempdir().unwrap();
        let specs = vec![
            spec("x.weight", Dtype::F32, &[2, 3]),
            spec("y.weight", Dtype::BF16, &[3]),
            spec("z.weight", Dtype::F16, &[1, 1]),
        ];
        let mut w = ShardedWriter::new(d.path(), specs, 24);
        let x: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        w.start_tensor("x.weight").unwrap();
        w.write(&x[..10]).unwrap();
        w.write(&x[10..]).unwrap();
        w.finish_tensor().unwrap();
        assert!(w.write_tensor("z.weight", &[0, 0]).is_err(), "out of order");
        w.write_tensor("y.weight", &[1, 2, 3, 4, 5, 6]).unwrap();
        w.write_tensor("z.weight", &[7, 8]).unwrap();
        let files = w.finish().unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json"
            ]
        );
        for f in &files {
            let bytes = std::fs::read(d.path().join(&f.name)).unwrap();
            assert_eq!(f.bytes, bytes.len() as u64);
            assert_eq!(f.sha256, hex(&Sha256::digest(&bytes)));
        }
        let b1 = std::fs::read(d.path().join(&files[0].name)).unwrap();
        let st = SafeTensors::deserialize(&b1).unwrap();
        assert_eq!(st.tensor("x.weight").unwrap().data(), &x[..]);
        let (n, meta) = SafeTensors::read_metadata(&b1).unwrap();
        assert_eq!(n % 8, 0);
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
        let b2 = std::fs::read(d.path().join(&files[1].name)).unwrap();
        let st = SafeTensors::deserialize(&b2).unwrap();
        assert_eq!(st.tensor("y.weight").unwrap().data(), &[1, 2, 3, 4, 5, 6]);
        assert_eq!(st.tensor("z.weight").unwrap().shape(), &[1, 1]);
        let idx: Value =
            serde_json::from_slice(&std::fs::read(d.path().join(&files[2].name)).unwrap()).unwrap();
        assert_eq!(idx["metadata"]["total_size"], 24 + 6 + 2);
        assert_eq!(
            idx["weight_map"]["z.weight"],
            "model-00002-of-00002.safetensors"
        );
    }

    #[test]
    fn a_short_tensor_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let mut w = ShardedWriter::new(d.path(), vec![spec("a", Dtype::F32, &[2])], 100);
        w.start_tensor("a").unwrap();
        w.write(&[0; 4]).unwrap();
        assert!(w.write(&[0; 5]).is_err());
        assert!(w.finish_tensor().is_err());
    }
}
