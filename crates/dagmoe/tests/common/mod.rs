//! Fixture shared by the integration tests: a tokenizer and prepared shards
//! built from the committed kernel-docs sample in a temporary directory.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use dagmoe::commands;
use dagmoe::{RunConfig, load_config};
use dagmoe_data::PrepareOptions;

pub const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(ROOT).join(relative)
}

/// A tokenizer and a prepared directory built from the fixture in a temporary directory.
pub struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sources = repo_path("data/fixtures/kernel-docs-sample/sources");
        commands::train_tokenizer(&[sources.clone()], &Default::default(), 512, &[], &dir.path().join("tokenizer.json")).unwrap();
        let options = PrepareOptions {
            valid_fraction: 0.1,
            shard_tokens: 40_000,
            batch_documents: 8,
            ..PrepareOptions::new(vec![sources], dir.path().join("prepared"))
        };
        commands::prepare(&dir.path().join("tokenizer.json"), &options).unwrap();
        Self { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Overrides that point a tiny config at this fixture and a fresh run directory.
    pub fn overrides(&self, run: &str, extra: &[&str]) -> Vec<String> {
        let mut overrides = vec![
            format!("data.train={:?}", self.path("prepared")),
            format!("data.tokenizer={:?}", self.path("tokenizer.json")),
            format!("data.valid={{ fixture = {:?} }}", self.path("prepared")),
            format!("train.out_dir={:?}", self.path(run)),
        ];
        overrides.extend(extra.iter().map(|s| s.to_string()));
        overrides
    }

    pub fn config(&self, name: &str, run: &str, extra: &[&str]) -> RunConfig {
        load_config(&repo_path(&format!("configs/{name}.toml")), &self.overrides(run, extra)).unwrap()
    }
}

pub fn logged_losses(run_dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter_map(|record| record.get("lm_loss").and_then(|v| v.as_f64()))
        .collect()
}

/// `(step, loss)` of every step record in a run's `metrics.jsonl`, in file order.
pub fn logged_steps(run_dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter_map(|record| Some((record.get("step")?.as_u64()?, record.get("loss")?.as_f64()?)))
        .collect()
}
