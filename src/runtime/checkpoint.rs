//! Hugging Face model folders: `config.json` and `model.safetensors` (memory-mapped, read
//! zero-copy, converted to f32 on the host as each tensor is taken).
//!
//! A model takes its tensors by name with the shape it expects; [`Checkpoint::finish`] then
//! reports every tensor it did not take. So a missing, extra or mis-shaped tensor is an error
//! that names it, never a silently half-loaded model.
//!
//! Writing goes the other way: [`write_safetensors`] (f32 tensors under their Hugging Face
//! names, with the `{"format": "pt"}` metadata transformers checks) and [`write_json`] for
//! `config.json`; the fine-tuning export, the GPT-Neo export and BART's `save_pretrained` use
//! them.

use super::folder::{check_file, read_bounded, CONFIG_LIMIT};
use crate::error::{Error, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Host copy of one parameter, in f32.
#[derive(Clone, Debug, PartialEq)]
pub struct HostParam {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// `head` unless it equals `embedding` value for value: a tied model saved with its head
/// stores the embedding twice, and the table (the largest tensor) is then held once.
pub fn distinct_head(head: Option<HostParam>, embedding: &HostParam) -> Option<HostParam> {
    head.filter(|h| h != embedding)
}

impl HostParam {
    /// A 2-D parameter transposed: `[a, b]` → `[b, a]` (GPT-2's Conv1D stores `[in, out]`
    /// where a linear layer wants `[out, in]`).
    pub fn transposed(&self) -> Result<HostParam> {
        let [a, b] = self.shape[..] else {
            return Err(Error::shape("param", "2 dims to transpose", &self.shape));
        };
        // In 32×32 tiles, so both the reads and the writes stay within a few cache lines.
        const TILE: usize = 32;
        // A model's weight from here on: in huge pages where the kernel allows.
        let mut values = super::host_memory::huge_page_buffer(a * b)
            .map_err(|e| Error::invalid("param", format!("cannot allocate [{b}, {a}]: {e}")))?;
        values.resize(a * b, 0f32);
        for i0 in (0..a).step_by(TILE) {
            for j0 in (0..b).step_by(TILE) {
                for i in i0..(i0 + TILE).min(a) {
                    for j in j0..(j0 + TILE).min(b) {
                        values[j * a + i] = self.values[i * b + j];
                    }
                }
            }
        }
        Ok(HostParam {
            shape: vec![b, a],
            values,
        })
    }
}

/// Reads a JSON file of a model folder (at most [`CONFIG_LIMIT`] bytes, a regular file); a
/// missing, oversized or malformed file is an [`Error::Config`].
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let config_err = |reason: String| Error::Config {
        file: path.display().to_string(),
        reason,
    };
    let bytes = read_bounded(path, CONFIG_LIMIT).map_err(|e| match e {
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            config_err("not found (is this a Hugging Face model folder?)".into())
        }
        Error::Io { source, .. } => config_err(source.to_string()),
        e => e,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| config_err(format!("not valid JSON: {e}")))
}

/// Tensor-name suffixes that are buffers, not parameters (recomputed by the model), skipped
/// without complaint.
const BUFFERS: &[&str] = &["position_ids"];

/// The tensors of one `model.safetensors`, memory-mapped.
pub struct Checkpoint {
    path: PathBuf,
    map: memmap2::Mmap,
    names: BTreeSet<String>,
    taken: BTreeSet<String>,
    /// Prefix every name the model asks for gets (e.g. `bert.` when a BertModel was saved
    /// inside a task model).
    prefix: String,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("tensors", &self.names.len())
            .finish_non_exhaustive()
    }
}

impl Checkpoint {
    /// Maps `path` and reads its header. A truncated or corrupt file is an error here.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        // A regular file (not a device or a folder); its size bounds everything read from it:
        // the header and every tensor's bytes must lie inside the file (the safetensors
        // reader checks both), so no shape in it can make us allocate more than it holds.
        check_file(path, u64::MAX).map_err(|e| Error::Checkpoint {
            file: path.display().to_string(),
            reason: format!("cannot open: {e}"),
        })?;
        let file = std::fs::File::open(path).map_err(|e| Error::Checkpoint {
            file: path.display().to_string(),
            reason: format!("cannot open: {e}"),
        })?;
        // SAFETY: the map is read-only; the file is a model checkpoint nobody is expected to
        // modify while the model loads (a concurrent writer could change the bytes we read,
        // not break memory safety of this process beyond that, as with any mmap reader).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        let names = {
            let st = SafeTensors::deserialize(&map).map_err(|e| Error::Checkpoint {
                file: path.display().to_string(),
                reason: format!("not a valid safetensors file (corrupt or truncated?): {e}"),
            })?;
            st.names().into_iter().map(str::to_string).collect()
        };
        Ok(Checkpoint {
            path: path.to_path_buf(),
            map,
            names,
            taken: BTreeSet::new(),
            prefix: String::new(),
        })
    }

    fn err(&self, reason: impl Into<String>) -> Error {
        Error::Checkpoint {
            file: self.path.display().to_string(),
            reason: reason.into(),
        }
    }

    /// Every tensor name in the file.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    /// Uses `prefix` for every later lookup when the file holds `prefix + probe`
    /// (and not `probe` itself). Returns whether it did.
    pub fn detect_prefix(&mut self, prefix: &str, probe: &str) -> bool {
        let found = !self.names.contains(probe) && self.names.contains(&format!("{prefix}{probe}"));
        if found {
            self.prefix = prefix.to_string();
        }
        found
    }

    /// Whether the file holds `name` (after the prefix).
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(&format!("{}{name}", self.prefix))
    }

    /// The shape of tensor `name` (after the prefix), if the file has it.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let full = format!("{}{name}", self.prefix);
        let st = SafeTensors::deserialize(&self.map).ok()?;
        st.tensor(&full).ok().map(|v| v.shape().to_vec())
    }

    /// Checks, before a model allocates per-layer state, that the file has layers
    /// `0 .. layers` (tensors named `{stem}{i}.…`, after the prefix; `key` names the config
    /// field in the error).
    pub fn expect_layers(&self, stem: &str, layers: usize, key: &str) -> Result<()> {
        let full = format!("{}{stem}", self.prefix);
        let found: BTreeSet<usize> = self
            .names
            .iter()
            .filter_map(|n| n.strip_prefix(&full)?.split('.').next()?.parse().ok())
            .collect();
        // Layers past `layers` are left for [`Checkpoint::finish`] to name.
        if layers <= found.len() && (0..layers).all(|i| found.contains(&i)) {
            return Ok(());
        }
        Err(self.err(format!(
            "config.json says {key} = {layers}, the checkpoint has {} layer(s) `{full}N.*`{}",
            found.len(),
            found
                .iter()
                .next_back()
                .map_or(String::new(), |m| format!(" (highest N: {m})"))
        )))
    }

    /// Checks tensor `name` has `shape` before anything is allocated for it; `what` names the
    /// config fields the shape comes from.
    pub fn expect_shape(&self, name: &str, shape: &[usize], what: &str) -> Result<()> {
        match self.shape(name) {
            Some(s) if s == shape => Ok(()),
            Some(s) => Err(self.err(format!(
                "tensor `{}{name}` has shape {s:?}, config.json's {what} say {shape:?}",
                self.prefix
            ))),
            None => Err(self.err(format!(
                "missing tensor `{}{name}` (expected shape {shape:?})",
                self.prefix
            ))),
        }
    }

    /// Marks tensor `name` (after the prefix) as used without reading it: buffers a model
    /// recomputes (GPT-2's causal-mask `attn.bias`). Returns whether the file had it.
    pub fn discard(&mut self, name: &str) -> bool {
        let full = format!("{}{name}", self.prefix);
        let found = self.names.contains(&full);
        if found {
            self.taken.insert(full);
        }
        found
    }

    /// The language-model head `lm_head.weight` (`shape` = `[vocab, width]`) as Hugging Face's
    /// transformers 5 loads it: a stored head is the head whether or not the config ties it
    /// (checked against transformers 5.24 for GPT-2, GPT-Neo, GPT-1 and BART); without one a
    /// tied config reads the token embedding (`None`) and an untied one is an error. Call it
    /// before choosing a name prefix: the head never carries one. Pass the result through
    /// [`distinct_head`] once the embedding is read.
    pub fn take_lm_head(&mut self, tied: bool, shape: &[usize]) -> Result<Option<HostParam>> {
        if self.contains("lm_head.weight") {
            return self.take("lm_head.weight", shape).map(Some);
        }
        if tied {
            Ok(None)
        } else {
            Err(self.err(
                "tie_word_embeddings is false but the checkpoint has no `lm_head.weight`"
                    .to_string(),
            ))
        }
    }

    /// Takes tensor `name` (after the prefix), which must have `shape`, as f32.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<HostParam> {
        let full = format!("{}{name}", self.prefix);
        let st = SafeTensors::deserialize(&self.map).map_err(|e| self.err(e.to_string()))?;
        let view = st.tensor(&full).map_err(|_| {
            self.err(format!(
                "missing tensor `{full}` (expected shape {shape:?})"
            ))
        })?;
        if view.shape() != shape {
            return Err(self.err(format!(
                "tensor `{full}` has shape {:?}, expected {shape:?}",
                view.shape()
            )));
        }
        let bytes = view.data();
        let width = match view.dtype() {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            other => {
                return Err(self.err(format!(
                    "tensor `{full}` has dtype {other:?}; only F32, F16 and BF16 are supported"
                )))
            }
        };
        // The one allocation proportional to the file: a failure is an error, not an abort.
        // In huge pages where the kernel allows: decoding streams every weight per token.
        let mut values: Vec<f32> = super::host_memory::huge_page_buffer(bytes.len() / width)
            .map_err(|e| self.err(format!("cannot allocate tensor `{full}`: {e}")))?;
        match view.dtype() {
            Dtype::F32 => values.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ),
            Dtype::F16 => values.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
            ),
            _ => values.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            ),
        }
        // The values are copied out: drop the tensor's file pages from this process's
        // resident set, so loading holds the checkpoint in memory once (as converted values),
        // not twice. Only a hint: on failure the pages simply stay until the map is dropped.
        #[cfg(unix)]
        {
            let offset = bytes.as_ptr() as usize - self.map.as_ptr() as usize;
            // SAFETY: the map is a read-only shared file mapping and no borrow of this range
            // outlives this statement (`values` is an owned copy), so MADV_DONTNEED only
            // makes later reads of these pages fault them back in from the file; it cannot
            // change what any live reference sees.
            let _ = unsafe {
                self.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    offset,
                    bytes.len(),
                )
            };
        }
        self.taken.insert(full);
        Ok(HostParam {
            shape: shape.to_vec(),
            values,
        })
    }

    /// Checks that every tensor of the file was taken (buffers such as `position_ids`
    /// excepted); names the ones that were not.
    pub fn finish(self) -> Result<()> {
        let extra: Vec<&String> = self
            .names
            .iter()
            .filter(|n| !self.taken.contains(*n))
            .filter(|n| !BUFFERS.iter().any(|b| n.ends_with(b)))
            .collect();
        if extra.is_empty() {
            return Ok(());
        }
        let shown: Vec<&str> = extra.iter().take(8).map(|s| s.as_str()).collect();
        Err(self.err(format!(
            "{} unexpected tensor(s) the model does not use: {}{}",
            extra.len(),
            shown.join(", "),
            if extra.len() > 8 { ", ..." } else { "" }
        )))
    }
}

/// One parameter to save: Hugging Face name, shape, values (row-major f32).
pub struct NamedTensor<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: &'a [f32],
}

/// Writes `tensors` to `path` as f32 safetensors with `{"format": "pt"}` metadata.
pub fn write_safetensors(path: &Path, tensors: &[NamedTensor<'_>]) -> Result<()> {
    let mut bytes: Vec<Vec<u8>> = Vec::with_capacity(tensors.len());
    for t in tensors {
        let n: usize = t.shape.iter().product();
        if n != t.values.len() {
            return Err(Error::shape(
                "tensor",
                format!("{} values for `{}`", t.values.len(), t.name),
                &t.shape,
            ));
        }
        bytes.push(t.values.iter().flat_map(|v| v.to_le_bytes()).collect());
    }
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.shape.clone(), b)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| Error::Checkpoint {
                    file: path.display().to_string(),
                    reason: format!("tensor `{}`: {e}", t.name),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    let write_err = |e: String| Error::Checkpoint {
        file: path.display().to_string(),
        reason: format!("cannot write: {e}"),
    };
    // safetensors writes a private temporary file (mode 0600) and renames it over `path`.
    // Give the result the existing file's mode, or the one an ordinary file creation gives
    // here (the process's umask), so a saved model folder is as readable as its config.json.
    // An existing file is only looked at, never truncated: it may be mapped.
    let mode = match std::fs::metadata(path) {
        Ok(m) => Ok(m),
        Err(_) => std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .and_then(|f| f.metadata()),
    }
    .map_err(|e| write_err(e.to_string()))?
    .permissions();
    safetensors::serialize_to_file(views, metadata, path).map_err(|e| write_err(e.to_string()))?;
    std::fs::set_permissions(path, mode).map_err(|e| write_err(e.to_string()))
}

/// Writes `value` to `path` as pretty-printed JSON with a final newline (how Hugging Face
/// writes `config.json`).
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Config {
        file: path.display().to_string(),
        reason: e.to_string(),
    })?;
    std::fs::write(path, text + "\n").map_err(|e| Error::Io {
        path: path.display().to_string(),
        source: e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A written model file has the mode an ordinary file creation gives in the same folder
    /// (not the 0600 of safetensors' temporary file), and reads back the same values.
    #[cfg(unix)]
    #[test]
    fn written_safetensors_are_as_readable_as_any_new_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cuattn-st-mode-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let plain = dir.join("config.json");
        std::fs::write(&plain, b"{}").expect("plain file");
        let values = [1.5f32, -2.0, 0.25, 8.0, 3.0, -0.5];
        let path = dir.join("model.safetensors");
        write_safetensors(
            &path,
            &[NamedTensor {
                name: "w".into(),
                shape: vec![2, 3],
                values: &values,
            }],
        )
        .expect("write");
        let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode(&path), mode(&plain), "model file mode");
        let back = Checkpoint::open(&path)
            .and_then(|mut c| c.take("w", &[2, 3]))
            .expect("read back");
        assert_eq!(back.values, values);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
