//! Run configuration: one TOML file with `[model]`, `[data]` and `[train]`,
//! `--set section.key=value` overrides, and validation before any tensor exists.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dagmoe_model::{ModelConfig, Precision};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A whole run: model, data and training settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
}

/// `[data]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Prepared data directory (from `dagmoe data prepare`) whose train split
    /// is trained on; exactly one of `train`, `mixture` and `sft` is set.
    #[serde(default)]
    pub train: Option<PathBuf>,
    /// Named prepared directories trained on together: each sequence comes
    /// from corpus `i` with probability `weight_i / sum(weights)`.
    #[serde(default)]
    pub mixture: BTreeMap<String, MixtureEntry>,
    /// JSONL of prompt/response pairs or chats for supervised fine-tuning,
    /// where only response tokens are scored.
    #[serde(default)]
    pub sft: Option<PathBuf>,
    /// Named evaluation sets: each a prepared directory whose valid split is scored.
    #[serde(default)]
    pub valid: BTreeMap<String, PathBuf>,
    /// The `tokenizer.json` the data was prepared with.
    pub tokenizer: PathBuf,
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// Maximum tokens scored per evaluation set; 0 scores the whole split.
    #[serde(default)]
    pub eval_tokens: u64,
    /// Named multiple-choice task files (JSONL), scored at every evaluation.
    #[serde(default)]
    pub tasks: BTreeMap<String, PathBuf>,
    /// Training batches read ahead on a background thread; 0 reads each
    /// batch on the training thread when the step needs it.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
}

/// One corpus of `[data.mixture]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixtureEntry {
    /// Prepared data directory whose train split is sampled.
    pub path: PathBuf,
    /// Relative sampling weight; the weights need not sum to 1.
    pub weight: f64,
}

/// `[train]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: u64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning-rate schedule after the linear warmup.
    #[serde(default)]
    pub schedule: Schedule,
    /// Final learning rate of the decay, as a fraction of `lr` ("cosine" and "wsd").
    #[serde(default = "default_min_lr_ratio")]
    pub min_lr_ratio: f64,
    pub warmup_steps: u64,
    /// Steps of the final linear decay of the "wsd" schedule.
    #[serde(default)]
    pub decay_steps: u64,
    /// AdamW decoupled weight decay, applied to matrices only (not norms or biases).
    pub weight_decay: f64,
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    #[serde(default = "default_adam_eps")]
    pub adam_eps: f64,
    /// Maximum global gradient norm; 0 disables clipping.
    pub grad_clip: f64,
    pub seed: u64,
    /// Steps between progress lines and `metrics.jsonl` records.
    pub log_every: u64,
    /// Steps between evaluations; 0 evaluates only at the end.
    pub eval_every: u64,
    /// Steps between checkpoints; 0 saves only at the end.
    pub checkpoint_every: u64,
    /// Checkpoints kept in the run directory; older ones are deleted.
    pub keep_last: usize,
    /// Checkpoints at multiples of this step are kept as milestones, never deleted; 0 keeps none.
    #[serde(default)]
    pub keep_every: u64,
    /// Steps whose loss or gradient norm is not finite that may be skipped
    /// (no update, counted and logged) before training stops; 0 stops at the first.
    #[serde(default)]
    pub max_skipped_steps: u64,
    /// Peak FLOP/s of the device, for the MFU estimate in metrics; 0 leaves MFU out.
    #[serde(default)]
    pub peak_flops: f64,
    /// Run directory for checkpoints, metrics and reports.
    pub out_dir: PathBuf,
    /// "cpu" (libtorch), "cuda:N" or "flex".
    #[serde(default = "default_device")]
    pub device: String,
    /// Number format of the matrix products: "f32" (default) or "bf16",
    /// which keeps float32 weights, router, norms and losses.
    #[serde(default)]
    pub precision: Precision,
    /// Compute threads; 0 uses every core.
    #[serde(default)]
    pub threads: usize,
    /// Sequences per evaluation batch.
    #[serde(default = "default_eval_batch_size")]
    pub eval_batch_size: usize,
}

/// Learning rate after the warmup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// Cosine decay from `lr` to `lr * min_lr_ratio` at the last step.
    #[default]
    Cosine,
    /// `lr` until the last step.
    Constant,
    /// Warmup-stable-decay: `lr`, then a linear decay to `lr * min_lr_ratio`
    /// over the last `decay_steps` steps.
    Wsd,
}

fn one() -> usize {
    1
}
fn default_prefetch() -> usize {
    4
}
fn default_min_lr_ratio() -> f64 {
    0.1
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.95
}
fn default_adam_eps() -> f64 {
    1e-8
}
fn default_device() -> String {
    "cpu".into()
}
fn default_eval_batch_size() -> usize {
    8
}

/// Reads `path`, applies `overrides` (`section.key=value`, the value in TOML
/// syntax or a bare string) and validates the result.
pub fn load_config(path: &Path, overrides: &[String]) -> Result<RunConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("failed to read config {}: {e}; pass an existing TOML file with --config", path.display())))?;
    parse_config(&text, &path.display().to_string(), overrides)
}

/// Parses a config from text; `origin` names it in error messages.
pub fn parse_config(text: &str, origin: &str, overrides: &[String]) -> Result<RunConfig> {
    let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        Error::Config(format!("{origin} is not valid TOML: {}", first_line(e.message())))
    })?;
    for assignment in overrides {
        apply_override(&mut table, assignment)?;
    }
    let origin = if overrides.is_empty() { origin.to_string() } else { format!("{origin} with --set overrides") };
    let resolved = toml::to_string(&table).expect("a parsed TOML table serializes");
    let deserializer = toml::de::Deserializer::parse(&resolved).expect("a serialized TOML table parses");
    let config: RunConfig = serde_path_to_error::deserialize(deserializer).map_err(|e| describe_error(&e, &origin))?;
    validate(&config).map_err(|message| Error::Config(format!("{origin}: {message}")))?;
    Ok(config)
}

fn first_line(message: &str) -> &str {
    message.lines().next().unwrap_or(message).trim()
}

/// Turns a deserialization error into one line naming the key path and the fix.
fn describe_error(error: &serde_path_to_error::Error<toml::de::Error>, origin: &str) -> Error {
    let message = plain_enum_message(first_line(error.inner().message()));
    let path = error.path().to_string();
    let location = if path == "." { String::new() } else { format!(" at {path}") };
    let fix = if message.starts_with("unknown field") {
        "remove it or correct its spelling"
    } else if message.starts_with("missing field") {
        "add it to the config or pass --set"
    } else {
        "correct the value"
    };
    Error::Config(format!("{origin}{location}: {message}; {fix}"))
}

/// Rewords serde's messages about enum values (`precision`, `schedule`,
/// `aggregation` and the like), which speak of variants and tables.
fn plain_enum_message(message: &str) -> String {
    if let Some((value, expected)) = message.strip_prefix("unknown variant `").and_then(|rest| rest.split_once("`, expected ")) {
        return format!("invalid value {value:?}, expected {expected}");
    }
    if message == "wanted string or table" {
        return "invalid value, expected a quoted string".into();
    }
    message.to_string()
}

fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<()> {
    let (key, raw) = assignment.split_once('=').ok_or_else(|| {
        Error::Config(format!("invalid --set {assignment:?}: write it as section.key=value, for example train.lr=1e-3"))
    })?;
    let path: Vec<&str> = key.trim().split('.').collect();
    if path.len() < 2 || path.iter().any(|part| part.is_empty()) {
        return Err(Error::Config(format!(
            "invalid --set key {key:?}: name a section and a key, for example train.lr"
        )));
    }
    let value = parse_value(raw.trim());
    let (last, sections) = path.split_last().expect("path has at least two parts");
    let mut current = table;
    for section in sections {
        let entry = current.entry(section.to_string()).or_insert_with(|| toml::Value::Table(Default::default()));
        current = entry.as_table_mut().ok_or_else(|| {
            Error::Config(format!("invalid --set key {key:?}: {section} is a value, not a section"))
        })?;
    }
    current.insert(last.to_string(), value);
    Ok(())
}

/// Reads a TOML value (`3`, `1e-3`, `true`, `"text"`), or takes the text as a string.
fn parse_value(raw: &str) -> toml::Value {
    let wrapped = format!("value = {raw}");
    match wrapped.parse::<toml::Table>() {
        Ok(mut table) => table.remove("value").expect("the key was just written"),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

/// Checks the values that serde cannot: ranges and relations between fields.
pub fn validate(config: &RunConfig) -> std::result::Result<(), String> {
    config.model.validate().map_err(|e| e.to_string())?;
    let data = &config.data;
    let sources = [
        data.train.as_ref().map(|_| "data.train"),
        (!data.mixture.is_empty()).then_some("data.mixture"),
        data.sft.as_ref().map(|_| "data.sft"),
    ];
    let set: Vec<&str> = sources.into_iter().flatten().collect();
    match set.as_slice() {
        [] => {
            return Err(
                "missing training data: set data.train (a prepared directory), data.mixture (weighted prepared directories) or data.sft (a JSONL file)"
                    .into(),
            );
        }
        [_] => {}
        several => return Err(format!("{} are set together: train on one of them", several.join(" and "))),
    }
    for (name, entry) in &data.mixture {
        if !(entry.weight.is_finite() && entry.weight > 0.0) {
            return Err(format!("invalid data.mixture.{name}.weight = {}: use a positive number", entry.weight));
        }
    }
    let total_weight: f64 = data.mixture.values().map(|entry| entry.weight).sum();
    if !total_weight.is_finite() {
        return Err(format!("invalid data.mixture weights: their sum {total_weight} overflows; use weights such as 0.7 and 0.3"));
    }
    if data.prefetch > 1024 {
        return Err(format!("invalid data.prefetch = {}: use at most 1024 batches, or 0 to read on the training thread", data.prefetch));
    }
    let train = &config.train;
    let positive = [
        ("data.seq_len", config.data.seq_len as f64),
        ("train.steps", train.steps as f64),
        ("train.batch_size", train.batch_size as f64),
        ("train.grad_accum", train.grad_accum as f64),
        ("train.log_every", train.log_every as f64),
        ("train.keep_last", train.keep_last as f64),
        ("train.eval_batch_size", train.eval_batch_size as f64),
    ];
    for (field, value) in positive {
        if value <= 0.0 {
            return Err(format!("invalid {field} = {value}: use a positive integer"));
        }
    }
    let nonnegative = [
        ("train.lr", train.lr),
        ("train.weight_decay", train.weight_decay),
        ("train.grad_clip", train.grad_clip),
        ("train.peak_flops", train.peak_flops),
    ];
    for (field, value) in nonnegative {
        if !(value.is_finite() && value >= 0.0) {
            return Err(format!("invalid {field} = {value}: use a finite value >= 0"));
        }
    }
    for (field, value) in [("train.beta1", train.beta1), ("train.beta2", train.beta2), ("train.min_lr_ratio", train.min_lr_ratio)] {
        if !(0.0..=1.0).contains(&value) || (field != "train.min_lr_ratio" && value == 1.0) {
            return Err(format!("invalid {field} = {value}: use a value in [0, 1)"));
        }
    }
    if !(train.adam_eps.is_finite() && train.adam_eps > 0.0) {
        return Err(format!("invalid train.adam_eps = {}: use a small positive value such as 1e-8", train.adam_eps));
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if train.threads > 4 * cores {
        return Err(format!(
            "invalid train.threads = {}: this machine has {cores} cores; use at most {} or 0 for all cores",
            train.threads,
            4 * cores
        ));
    }
    if train.warmup_steps > train.steps {
        return Err(format!(
            "invalid train.warmup_steps = {}: must be at most train.steps = {}",
            train.warmup_steps, train.steps
        ));
    }
    if train.schedule == Schedule::Wsd && (train.decay_steps == 0 || train.warmup_steps + train.decay_steps > train.steps) {
        return Err(format!(
            "invalid train.decay_steps = {}: the \"wsd\" schedule needs 0 < decay_steps <= steps - warmup_steps = {}",
            train.decay_steps,
            train.steps - train.warmup_steps
        ));
    }
    dagmoe_model::check_device_name(&train.device).map_err(|e| format!("invalid train.device: {e}"))?;
    Ok(())
}

impl RunConfig {
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a run config serializes to TOML")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const TINY: &str = include_str!("../../../configs/tiny-dagmoe.toml");

    fn error_of(text: &str, overrides: &[&str]) -> String {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        parse_config(text, "test.toml", &overrides).unwrap_err().to_string()
    }

    #[test]
    fn tiny_config_parses() {
        let config = parse_config(TINY, "tiny", &[]).unwrap();
        assert_eq!(config.model.moe.aggregation, dagmoe_model::Aggregation::Dag);
    }

    #[test]
    fn override_changes_value() {
        let config = parse_config(TINY, "tiny", &["train.lr=0.5".into(), "model.dag.depth=0".into()]).unwrap();
        assert_eq!(config.train.lr, 0.5);
        assert_eq!(config.model.dag.depth, 0);
    }

    #[test]
    fn unknown_key_is_rejected_with_section() {
        let message = error_of(TINY, &["train.learning_rate=1"]);
        assert!(message.contains("unknown field `learning_rate`"), "{message}");
        assert!(message.contains("at train.learning_rate"), "{message}");
    }

    #[test]
    fn unknown_section_is_rejected() {
        let message = error_of(&format!("{TINY}\n[optimizer]\nlr = 1\n"), &[]);
        assert!(message.contains("unknown field `optimizer`"), "{message}");
    }

    #[test]
    fn missing_key_is_rejected() {
        let text: String = TINY.lines().filter(|line| !line.starts_with("seq_len")).map(|l| format!("{l}\n")).collect();
        let message = error_of(&text, &[]);
        assert!(message.contains("missing field `seq_len`"), "{message}");
    }

    #[test]
    fn precision_parses_and_bad_values_name_the_choices() {
        assert_eq!(parse_config(TINY, "tiny", &[]).unwrap().train.precision, Precision::F32);
        for precision in Precision::ALL {
            let config = parse_config(TINY, "tiny", &[format!("train.precision={}", precision.name())]).unwrap();
            assert_eq!(config.train.precision, precision, "config value {:?}", precision.name());
            assert_eq!(precision.name().parse::<Precision>(), Ok(precision), "--precision {}", precision.name());
        }

        let message = error_of(TINY, &["train.precision=fp16"]);
        assert!(message.contains("at train.precision: invalid value \"fp16\", expected `f32` or `bf16`"), "{message}");
        let message = error_of(TINY, &["train.precision=16"]);
        assert!(message.contains("at train.precision: invalid value, expected a quoted string"), "{message}");
    }

    #[test]
    fn malformed_value_is_rejected() {
        let message = error_of(TINY, &["train.steps=many"]);
        assert!(message.contains("invalid type"), "{message}");
    }

    #[test]
    fn model_checks_run_before_allocation() {
        for (set, field) in [
            ("model.moe.top_k=99", "model.moe.top_k"),
            ("model.n_heads=5", "model.d_model"),
            ("model.dag.d_g=0", "model.dag.d_g"),
            ("model.moe.aggregation=\"sum\"", "aggregation"),
            ("model.moe.z_loss_coef=-1", "model.moe.z_loss_coef"),
            ("train.device=\"tpu\"", "train.device"),
        ] {
            let message = error_of(TINY, &[set]);
            assert!(message.contains(field), "{set}: {message}");
        }
    }
}
