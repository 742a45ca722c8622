//! Resuming a run: the newest complete checkpoint, and which config
//! changes a resume may accept.

use std::path::Path;

use crate::checkpoint::{Checkpoint, latest_checkpoint};
use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::eval::DataIdentity;

/// Keys that change how a run is observed or saved, not what it computes.
/// `train.threads` is among them although libtorch may round differently
/// with another thread count, so bit-identical resumes need the same count.
const RESULT_NEUTRAL_KEYS: &[&str] = &[
    "data.valid",
    "data.tasks",
    "train.out_dir",
    "data.eval_tokens",
    "data.prefetch",
    "train.log_every",
    "train.eval_every",
    "train.eval_batch_size",
    "train.checkpoint_every",
    "train.keep_last",
    "train.keep_every",
    "train.threads",
    "train.peak_flops",
];

/// Dotted keys whose values differ between two configs, result-neutral keys excluded.
pub fn config_differences(saved: &RunConfig, current: &RunConfig) -> Vec<String> {
    let saved = toml::Value::try_from(saved).expect("a run config serializes");
    let current = toml::Value::try_from(current).expect("a run config serializes");
    let mut differences = Vec::new();
    collect_differences("", &saved, &current, &mut differences);
    differences.retain(|key| !RESULT_NEUTRAL_KEYS.iter().any(|neutral| key == neutral || key.starts_with(&format!("{neutral}."))));
    differences
}

/// Dotted `model.*` keys whose values differ between two configs.
pub fn model_differences(saved: &RunConfig, current: &RunConfig) -> Vec<String> {
    let saved = toml::Value::try_from(&saved.model).expect("a model config serializes");
    let current = toml::Value::try_from(&current.model).expect("a model config serializes");
    let mut differences = Vec::new();
    collect_differences("model", &saved, &current, &mut differences);
    differences
}

fn collect_differences(prefix: &str, a: &toml::Value, b: &toml::Value, out: &mut Vec<String>) {
    let join = |key: &str| if prefix.is_empty() { key.to_string() } else { format!("{prefix}.{key}") };
    match (a, b) {
        (toml::Value::Table(a), toml::Value::Table(b)) => {
            for (key, value) in a {
                match b.get(key) {
                    Some(other) => collect_differences(&join(key), value, other, out),
                    None => out.push(join(key)),
                }
            }
            out.extend(b.keys().filter(|key| !a.contains_key(*key)).map(|key| join(key)));
        }
        (a, b) if a != b => out.push(prefix.to_string()),
        _ => {}
    }
}

/// Opens the newest complete checkpoint of `out_dir` and checks that `config`
/// and the data identity match the ones it was saved with.
pub(crate) fn resume_checkpoint(
    out_dir: &Path,
    config: &RunConfig,
    identity: &DataIdentity,
    train_data_sha256: &str,
    allow_change: bool,
) -> Result<Checkpoint> {
    let dir = latest_checkpoint(out_dir)?.ok_or_else(|| {
        Error::Usage(format!(
            "--resume: {} contains no complete checkpoint; delete {} and start the run without --resume",
            out_dir.join("checkpoints").display(),
            out_dir.display()
        ))
    })?;
    let checkpoint = Checkpoint::open(&dir)?;
    let mut differences = config_differences(&checkpoint.config, config);
    if checkpoint.state.tokenizer_sha256 != identity.tokenizer_sha256 {
        differences.push("data.tokenizer (its content changed)".to_string());
    }
    if checkpoint.state.train_data_sha256 != train_data_sha256 {
        differences.push("the training data (data.train, data.mixture or data.sft, or the files they name, changed)".to_string());
    }
    if !differences.is_empty() {
        if !allow_change {
            return Err(Error::Config(format!(
                "--resume: the config differs from checkpoint {} in {}, which changes the result; restore those values or pass --allow-config-change",
                dir.display(),
                differences.join(", ")
            )));
        }
        tracing::warn!(keys = %differences.join(", "), "resuming with a changed config (--allow-config-change)");
    }
    Ok(checkpoint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_config;

    #[test]
    fn differences_skip_neutral_keys() {
        let text = include_str!("../../../configs/tiny-dagmoe.toml");
        let saved = parse_config(text, "tiny", &[]).unwrap();
        let overrides = ["train.log_every=1", "train.keep_last=9", "train.lr=0.5", "model.dag.depth=2"].map(String::from);
        let current = parse_config(text, "tiny", &overrides).unwrap();
        assert_eq!(config_differences(&saved, &current), vec!["model.dag.depth", "train.lr"]);
    }
}
