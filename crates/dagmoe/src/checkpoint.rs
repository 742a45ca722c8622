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
use dagmoe_data::LoaderCursor;
use dagmoe_model::DagMoeModel;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};

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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    pub tokens_seen: u64,
    pub loader: LoaderCursor,
    pub tokenizer_sha256: String,
}

/// Returns the checkpoint directory name for `step`.
pub fn checkpoint_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Writes a checkpoint of `model`, `optimizer` and `state` under `<out_dir>/checkpoints/`
/// and deletes the oldest complete checkpoints beyond `keep_last`.
pub fn save_checkpoint(
    out_dir: &Path,
    model: &DagMoeModel,
    optimizer: &AdamW,
    state: &TrainerState,
    config: &RunConfig,
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

    let mut collector = ParamCollector::default();
    model.visit(&mut collector);
    let weights = collector.params.into_iter().map(|p| (p.name, p.shape, p.value));
    write_file(&staging.join(MODEL_FILE), &safetensors_bytes(weights)?)?;

    let moments = optimizer.moments.iter().flat_map(|(name, m)| {
        let len = m.first.dims()[0];
        [
            (format!("{name}.first"), vec![len], m.first.clone()),
            (format!("{name}.second"), vec![len], m.second.clone()),
        ]
    });
    let mut optimizer_metadata = HashMap::new();
    optimizer_metadata.insert("step".to_string(), optimizer.step.to_string());
    write_file(&staging.join(OPTIMIZER_FILE), &safetensors_bytes_with(moments, Some(optimizer_metadata))?)?;

    let trainer_json = serde_json::to_string_pretty(state).expect("trainer state serializes");
    write_file(&staging.join(TRAINER_FILE), trainer_json.as_bytes())?;
    write_file(&staging.join(CONFIG_FILE), config.to_toml().as_bytes())?;
    write_file(&staging.join(COMPLETE_MARKER), b"")?;

    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io("replace checkpoint", &final_dir, e))?;
    }
    std::fs::rename(&staging, &final_dir).map_err(|e| Error::io("rename checkpoint to", &final_dir, e))?;
    sync_dir(&root);
    prune_checkpoints(&root, config.train.keep_last)?;
    Ok(final_dir)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = std::fs::File::create(path).map_err(|e| Error::io("create", path, e))?;
    file.write_all(bytes).map_err(|e| Error::io("write", path, e))?;
    file.sync_all().map_err(|e| Error::io("sync", path, e))
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

/// Names of complete checkpoints under `<out_dir>/checkpoints`, oldest first.
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

fn prune_checkpoints(root: &Path, keep_last: usize) -> Result<()> {
    let all = list_checkpoints(root.parent().unwrap_or(root))?;
    for old in all.iter().take(all.len().saturating_sub(keep_last)) {
        std::fs::remove_dir_all(old).map_err(|e| Error::io("delete old checkpoint", old, e))?;
    }
    Ok(())
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
            return Err(Error::Usage(format!(
                "checkpoint directory {} does not exist; pass a directory such as runs/small-dagmoe/checkpoints/step-00000300",
                dir.display()
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
        load_weights(model, &self.dir.join(MODEL_FILE), device)
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
