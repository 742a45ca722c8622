//! `metrics.jsonl`: one JSON object per logged step or evaluation.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::eval::EvalResult;

/// One logged training step.
#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    pub step: u64,
    pub tokens: u64,
    /// LM loss plus the scaled auxiliary losses.
    pub loss: f64,
    pub lm_loss: f64,
    pub load_balance_loss: f64,
    pub z_loss: f64,
    pub load_balance_loss_scaled: f64,
    pub z_loss_scaled: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Training throughput since the first step, the first step excluded.
    pub tokens_per_second: f64,
    /// Per MoE layer: fraction of this step's assignments routed to each expert.
    pub expert_fraction: Vec<Vec<f64>>,
    /// Per MoE layer: the busiest expert's load over the mean load.
    pub max_mean_imbalance: Vec<f64>,
    /// Per MoE layer: experts that received no token in this step.
    pub experts_without_tokens: Vec<usize>,
}

impl StepMetrics {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        step: u64,
        tokens: u64,
        loss: f64,
        lm_loss: f64,
        load_balance_loss: f64,
        z_loss: f64,
        load_balance_coef: f64,
        z_loss_coef: f64,
        lr: f64,
        grad_norm: f64,
        tokens_per_second: f64,
        tokens_per_expert: &[Vec<usize>],
    ) -> Self {
        let mut expert_fraction = Vec::new();
        let mut max_mean_imbalance = Vec::new();
        let mut experts_without_tokens = Vec::new();
        for layer in tokens_per_expert {
            let total: usize = layer.iter().sum();
            let fractions: Vec<f64> = layer.iter().map(|&n| n as f64 / total.max(1) as f64).collect();
            let mean = total as f64 / layer.len() as f64;
            let max = layer.iter().copied().max().unwrap_or(0) as f64;
            max_mean_imbalance.push(if mean > 0.0 { max / mean } else { 0.0 });
            experts_without_tokens.push(layer.iter().filter(|&&n| n == 0).count());
            expert_fraction.push(fractions);
        }
        Self {
            step,
            tokens,
            loss,
            lm_loss,
            load_balance_loss,
            z_loss,
            load_balance_loss_scaled: load_balance_loss * load_balance_coef,
            z_loss_scaled: z_loss * z_loss_coef,
            lr,
            grad_norm,
            tokens_per_second,
            expert_fraction,
            max_mean_imbalance,
            experts_without_tokens,
        }
    }
}

#[derive(Serialize)]
struct EvalRecord<'a> {
    step: u64,
    eval: &'a EvalResult,
}

/// Appends records to a JSONL file, flushing after each so a killed run keeps its history.
pub struct MetricsWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl MetricsWriter {
    pub fn create(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io("open metrics file", path, e))?;
        Ok(Self { file: BufWriter::new(file), path: path.to_path_buf() })
    }

    pub fn write(&mut self, metrics: &StepMetrics) -> Result<()> {
        self.write_line(metrics)
    }

    pub fn write_eval(&mut self, step: u64, result: &EvalResult) -> Result<()> {
        self.write_line(&EvalRecord { step, eval: result })
    }

    fn write_line(&mut self, record: &impl Serialize) -> Result<()> {
        let line = serde_json::to_string(record).expect("metrics serialize");
        writeln!(self.file, "{line}")
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io("write metrics to", &self.path, e))
    }
}
