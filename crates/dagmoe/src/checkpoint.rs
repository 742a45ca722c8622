//! Checkpoints: one directory per save, complete or absent.
//!
//! ```text
//! <out_dir>/checkpoints/step-00000300/
//!     model.safetensors      weights by dotted parameter name, f32, `[d_in, d_out]` matrices
//!     optimizer.safetensors  AdamW moments, `<name>.first` and `<name>.second`, flattened
//!     trainer.json           step, tokens seen, loader cursor, data identity
//!     config.toml            the resolved run configuration
//!     COMPLETE               written last; only directories that have it are loaded
//! ```
//!
//! A save is written to `.step-00000300.partial` and renamed into place after
//! every file is synced, so an interrupted save never looks complete.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use dagmoe_model::DagMoeModel;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};

use crate::batches::DataCursor;
use crate::config::{RunConfig, parse_config};
use crate::error::{Error, Result};
use crate::optim::{AdamW, Moments};
use crate::params::{ParamCollector, ParamUpdater};

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const TRAINER_FILE: &str = "trainer.json";
pub const CONFIG_FILE: &str = "config.toml";
pub const COMPLETE_MARKER: &str = "COMPLETE";

/// Training progress stored with every checkpoint.
///
/// NOTE: training draws no random numbers after initialization (there is no
/// dropout) and the data order is a function of `train.seed` and the epoch,
/// so the loader cursor is the only random state a resume needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    pub tokens_seen: u64,
    pub loader: DataCursor,
    pub tokenizer_sha256: String,
    /// SHA-256 over the training split's shard checksums: the loader cursor
    /// is meaningful only for the same token stream.
    #[serde(default)]
    pub train_data_sha256: String,
    /// Steps skipped so far because their loss or gradient norm was not finite.
    #[serde(default)]
    pub skipped_steps: u64,
    /// SHA-256 of the checkpoint's `model.safetensors`, checked when it is loaded.
    #[serde(default)]
    pub model_sha256: Option<String>,
}

/// Returns the checkpoint directory name for `step`.
pub fn checkpoint_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Destination of checkpoint files. Tests give it a byte limit to exercise a full disk.
#[derive(Debug, Default)]
pub struct CheckpointWriter {
    byte_limit: Option<u64>,
    written: std::cell::Cell<u64>,
}

impl CheckpointWriter {
    /// A writer that fails with "no space left on device" once `limit` bytes are written.
    pub fn with_byte_limit(limit: u64) -> Self {
        Self { byte_limit: Some(limit), written: std::cell::Cell::new(0) }
    }

    fn write_file(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let total = self.written.get() + bytes.len() as u64;
        if self.byte_limit.is_some_and(|limit| total > limit) {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let mut file = std::fs::File::create(path)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        self.written.set(total);
        Ok(())
    }
}

/// Writes a checkpoint of `model`, `optimizer` and `state` under `<out_dir>/checkpoints/`
/// and deletes old checkpoints beyond `keep_last`, except milestones.
///
/// A failed write removes the partial directory and leaves earlier checkpoints untouched.
pub fn save_checkpoint(
    out_dir: &Path,
    model: &DagMoeModel,
    optimizer: &AdamW,
    state: &TrainerState,
    config: &RunConfig,
    writer: &CheckpointWriter,
) -> Result<PathBuf> {
    let root = out_dir.join("checkpoints");
    std::fs::create_dir_all(&root).map_err(|e| Error::io("create directory", &root, e))?;
    let name = checkpoint_name(state.step);
    let final_dir = root.join(&name);
    let staging = root.join(format!(".{name}.partial"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| Error::io("remove stale directory", &staging, e))?;
    }
    std::fs::create_dir(&staging).map_err(|e| Error::io("create directory", &staging, e))?;

    let files = checkpoint_files(model, optimizer, state, config)?;
    let needed: u64 = files.iter().map(|(_, bytes)| bytes.len() as u64).sum();
    for (file, bytes) in &files {
        if let Err(error) = writer.write_file(&staging.join(file), bytes) {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(write_failure(&final_dir, &root, needed, error));
        }
    }

    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io("replace checkpoint", &final_dir, e))?;
    }
    std::fs::rename(&staging, &final_dir).map_err(|e| Error::io("rename checkpoint to", &final_dir, e))?;
    sync_dir(&root);
    prune_checkpoints(out_dir, config.train.keep_last, config.train.keep_every)?;
    Ok(final_dir)
}

/// Serializes every file of a checkpoint, the completion marker last.
fn checkpoint_files(
    model: &DagMoeModel,
    optimizer: &AdamW,
    state: &TrainerState,
    config: &RunConfig,
) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let mut collector = ParamCollector::default();
    model.visit(&mut collector);
    let weights = collector.params.into_iter().map(|p| (p.name, p.shape, p.value));

    let moments = optimizer.moments.iter().flat_map(|(name, m)| {
        let len = m.first.dims()[0];
        [
            (format!("{name}.first"), vec![len], m.first.clone()),
            (format!("{name}.second"), vec![len], m.second.clone()),
        ]
    });
    let mut optimizer_metadata = HashMap::new();
    optimizer_metadata.insert("step".to_string(), optimizer.step.to_string());

    let model_bytes = safetensors_bytes(weights)?;
    let state = TrainerState { model_sha256: Some(dagmoe_data::sha256_hex(&model_bytes)), ..state.clone() };
    let trainer_json = serde_json::to_string_pretty(&state).expect("trainer state serializes");
    Ok(vec![
        (MODEL_FILE, model_bytes),
        (OPTIMIZER_FILE, safetensors_bytes_with(moments, Some(optimizer_metadata))?),
        (TRAINER_FILE, trainer_json.into_bytes()),
        (CONFIG_FILE, config.to_toml().into_bytes()),
        (COMPLETE_MARKER, Vec::new()),
    ])
}

/// Describes a failed checkpoint write with the space it needed and the space free.
fn write_failure(target: &Path, root: &Path, needed: u64, error: std::io::Error) -> Error {
    let megabytes = |bytes: u64| bytes as f64 / 1e6;
    let free = free_space(root).map(|b| format!("{:.1} MB", megabytes(b))).unwrap_or_else(|| "an unknown amount".into());
    Error::checkpoint(
        target,
        format!(
            "write failed ({error}); the checkpoint needs {:.1} MB and {} is free on that filesystem. Free disk space or lower train.keep_last; earlier checkpoints are intact",
            megabytes(needed),
            free
        ),
    )
}

/// Bytes available to this user on the filesystem of `path`.
fn free_space(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is a valid NUL-terminated string and `stats` is a valid out-pointer.
    let status = unsafe { libc::statvfs(c_path.as_ptr(), &mut stats) };
    (status == 0).then(|| stats.f_bavail as u64 * stats.f_frsize as u64)
}

fn sync_dir(dir: &Path) {
    // Directory fsync makes the rename durable; a filesystem that cannot
    // sync a directory still has the rename, so a failure is not fatal.
    if let Ok(handle) = std::fs::File::open(dir) {
        let _ = handle.sync_all();
    }
}

fn safetensors_bytes(tensors: impl Iterator<Item = (String, Vec<usize>, Tensor<1>)>) -> Result<Vec<u8>> {
    safetensors_bytes_with(tensors, None)
}

fn safetensors_bytes_with(
    tensors: impl Iterator<Item = (String, Vec<usize>, Tensor<1>)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let buffers: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .map(|(name, shape, value)| {
            let values: Vec<f32> = value.into_data().iter::<f32>().collect();
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name, shape, bytes)
        })
        .collect();
    let views = buffers.iter().map(|(name, shape, bytes)| {
        let view = TensorView::new(Dtype::F32, shape.clone(), bytes).expect("shape matches the byte count");
        (name.clone(), view)
    });
    safetensors::serialize(views, metadata).map_err(|e| Error::Usage(format!("failed to serialize tensors: {e}")))
}

/// Complete checkpoints under `<out_dir>/checkpoints` (those with a
/// `COMPLETE` marker), oldest first.
pub fn list_checkpoints(out_dir: &Path) -> Result<Vec<PathBuf>> {
    let root = out_dir.join("checkpoints");
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&root).map_err(|e| Error::io("list checkpoints in", &root, e))? {
        let path = entry.map_err(|e| Error::io("list checkpoints in", &root, e))?.path();
        let is_step = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step-"));
        if is_step && path.join(COMPLETE_MARKER).exists() {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

/// Deletes complete checkpoints older than the newest `keep_last`, except
/// milestones (steps that are multiples of `keep_every`), and stale partial saves.
fn prune_checkpoints(out_dir: &Path, keep_last: usize, keep_every: u64) -> Result<()> {
    let all = list_checkpoints(out_dir)?;
    for old in all.iter().take(all.len().saturating_sub(keep_last)) {
        let is_milestone = keep_every > 0 && checkpoint_step(old).is_some_and(|step| step % keep_every == 0);
        if !is_milestone {
            std::fs::remove_dir_all(old).map_err(|e| Error::io("delete old checkpoint", old, e))?;
        }
    }
    Ok(())
}

/// Step of a checkpoint directory named by [`checkpoint_name`].
pub fn checkpoint_step(dir: &Path) -> Option<u64> {
    dir.file_name()?.to_str()?.strip_prefix("step-")?.parse().ok()
}

/// The newest complete checkpoint of a run, the only kind a resume trusts.
pub fn latest_checkpoint(out_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list_checkpoints(out_dir)?.pop())
}

/// A checkpoint read back from disk.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: RunConfig,
    pub state: TrainerState,
}

impl Checkpoint {
    /// Reads the config and trainer state of a complete checkpoint directory.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            let problem = if dir.exists() { "is not a directory" } else { "does not exist" };
            return Err(Error::Usage(format!(
                "checkpoint directory {} {problem}; pass a directory such as runs/small-dagmoe/checkpoints/step-00000300",
                dir.display()
            )));
        }
        if let Some(newest) = latest_checkpoint(dir)? {
            return Err(Error::Usage(format!(
                "{} is a run directory, not a checkpoint; pass one of its checkpoints, such as {}",
                dir.display(),
                newest.display()
            )));
        }
        if !dir.join(COMPLETE_MARKER).exists() {
            return Err(Error::checkpoint(dir, "is incomplete (no COMPLETE marker); the save was interrupted, use an earlier checkpoint"));
        }
        let config_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io("read", &config_path, e))?;
        let config = parse_config(&text, &config_path.display().to_string(), &[])?;
        let state_path = dir.join(TRAINER_FILE);
        let state_text = std::fs::read_to_string(&state_path).map_err(|e| Error::io("read", &state_path, e))?;
        let state = serde_json::from_str(&state_text).map_err(|e| Error::checkpoint(&state_path, e.to_string()))?;
        Ok(Self { dir: dir.to_path_buf(), config, state })
    }

    /// Loads the weights into a model built from this checkpoint's config.
    pub fn load_model(&self, device: &Device) -> Result<DagMoeModel> {
        let model = DagMoeModel::new(&self.config.model, self.config.data.seq_len, device)
            .map_err(|e| Error::Config(e.to_string()))?;
        let path = self.dir.join(MODEL_FILE);
        if let Some(expected) = &self.state.model_sha256 {
            let bytes = std::fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
            let actual = dagmoe_data::sha256_hex(&bytes);
            if &actual != expected {
                return Err(Error::checkpoint(
                    &path,
                    format!("SHA-256 {actual} does not match {expected} recorded in trainer.json; the file is corrupt, use an earlier checkpoint"),
                ));
            }
        }
        load_weights(model, &path, device)
    }

    /// Loads the optimizer moments saved with this checkpoint.
    pub fn load_optimizer(&self, optimizer: &mut AdamW, device: &Device) -> Result<()> {
        let path = self.dir.join(OPTIMIZER_FILE);
        let bytes = std::fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
        let (_, metadata) = SafeTensors::read_metadata(&bytes).map_err(|e| Error::checkpoint(&path, e.to_string()))?;
        optimizer.step = metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get("step"))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::checkpoint(&path, "has no optimizer step in its metadata"))?;
        let tensors = SafeTensors::deserialize(&bytes).map_err(|e| Error::checkpoint(&path, e.to_string()))?;
        let mut moments = HashMap::new();
        for name in tensors.names() {
            let Some(param) = name.strip_suffix(".first") else { continue };
            let read = |key: &str| -> Result<Tensor<1>> {
                let view = tensors.tensor(key).map_err(|e| Error::checkpoint(&path, e.to_string()))?;
                Ok(tensor_from_view(&view, device).reshape([view.shape().iter().product::<usize>()]))
            };
            let moment = Moments { first: read(name)?, second: read(&format!("{param}.second"))? };
            moments.insert(param.to_string(), moment);
        }
        optimizer.moments = moments;
        Ok(())
    }
}

fn tensor_from_view(view: &TensorView<'_>, device: &Device) -> Tensor<1> {
    let values: Vec<f32> = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Tensor::<1>::from_data(TensorData::new(values, [view.shape().iter().product::<usize>()]), device).inner()
}

/// Replaces every parameter of `model` with the tensor of the same name in a safetensors file.
pub fn load_weights(model: DagMoeModel, path: &Path, device: &Device) -> Result<DagMoeModel> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
    let tensors = SafeTensors::deserialize(&bytes).map_err(|e| Error::checkpoint(path, e.to_string()))?;
    let mut problems = Vec::new();
    let mut loaded = 0;
    let mut updater = ParamUpdater::new(|name: &str, shape: &[usize], _current: Tensor<1>| match tensors.tensor(name) {
        Ok(view) if view.dtype() == Dtype::F32 && view.shape() == shape => {
            loaded += 1;
            Some(tensor_from_view(&view, device))
        }
        Ok(view) => {
            problems.push(format!("{name} has shape {:?} and dtype {:?}, expected {shape:?} and F32", view.shape(), view.dtype()));
            None
        }
        Err(_) => {
            problems.push(format!("{name} is missing"));
            None
        }
    });
    let model = model.map(&mut updater);
    if !problems.is_empty() {
        return Err(Error::checkpoint(
            path,
            format!("does not match the model config: {}", problems.join(", ")),
        ));
    }
    if loaded != tensors.names().len() {
        return Err(Error::checkpoint(path, "contains tensors the model config does not define; check the [model] settings"));
    }
    Ok(model)
}
