//! `metrics.jsonl`: one JSON object per logged step or evaluation.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::eval::EvalResult;

/// One logged training step.
#[derive(Debug, Clone, Default, Serialize)]
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
    /// Training throughput of this process, its first step excluded.
    pub tokens_per_second: f64,
    /// Model FLOPs utilization against `train.peak_flops`, when that is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    /// Share of this process's timed steps spent waiting for training batches.
    pub data_wait_fraction: f64,
    /// The loss or gradient norm was not finite, so no weight was updated.
    pub skipped: bool,
    /// Per MoE layer: fraction of this step's assignments routed to each expert.
    pub expert_fraction: Vec<Vec<f64>>,
    /// Per MoE layer: the busiest expert's load over the mean load.
    pub max_mean_imbalance: Vec<f64>,
    /// Per MoE layer: experts that received no token in this step.
    pub experts_without_tokens: Vec<usize>,
    /// Per MoE layer and DAG level: the edge weights averaged over the last
    /// micro-batch's tokens, as K x K rows (row i, column j: the edge j -> i).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dag_edge_mean: Vec<Vec<Vec<Vec<f32>>>>,
}

impl StepMetrics {
    /// Builds the routing fields of a step from expert loads per layer and DAG
    /// edge means (flattened `k * k` per level), leaving the other fields at zero.
    pub fn routing(tokens_per_expert: &[Vec<usize>], mean_edges: Vec<Vec<Vec<f32>>>, k: usize) -> Self {
        let mut metrics = Self::default();
        for layer in tokens_per_expert {
            let total: usize = layer.iter().sum();
            let mean = total as f64 / layer.len() as f64;
            let max = layer.iter().copied().max().unwrap_or(0) as f64;
            metrics.expert_fraction.push(layer.iter().map(|&n| n as f64 / total.max(1) as f64).collect());
            metrics.max_mean_imbalance.push(if mean > 0.0 { max / mean } else { 0.0 });
            metrics.experts_without_tokens.push(layer.iter().filter(|&&n| n == 0).count());
        }
        metrics.dag_edge_mean = mean_edges
            .into_iter()
            .filter(|levels| !levels.is_empty())
            .map(|levels| levels.into_iter().map(|flat| flat.chunks(k).map(<[f32]>::to_vec).collect()).collect())
            .collect();
        metrics
    }
}

#[derive(Serialize)]
struct EvalRecord<'a> {
    step: u64,
    eval: &'a EvalResult,
}

#[derive(Serialize)]
struct TaskRecord<'a> {
    step: u64,
    task: &'a crate::tasks::TaskResult,
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

    pub fn write_task(&mut self, step: u64, result: &crate::tasks::TaskResult) -> Result<()> {
        self.write_line(&TaskRecord { step, task: result })
    }

    fn write_line(&mut self, record: &impl Serialize) -> Result<()> {
        let line = serde_json::to_string(record).expect("metrics serialize");
        writeln!(self.file, "{line}")
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io("write metrics to", &self.path, e))
    }
}

/// Prepares `metrics.jsonl` for a resume from `step`: records of later steps,
/// which the resumed run recomputes, and a last line cut short by a kill move
/// to `metrics.after-step-<step>.jsonl`, so the main file has one record per
/// step and nothing is lost.
pub fn trim_metrics_after(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    // A line cut short by a kill does not parse; it moves out with the later records.
    let (keep, moved): (Vec<&str>, Vec<&str>) = text.lines().partition(|line| {
        serde_json::from_str::<serde_json::Value>(line)
            .is_ok_and(|record| record.get("step").and_then(|s| s.as_u64()).is_none_or(|record_step| record_step <= step))
    });
    if moved.is_empty() {
        return Ok(());
    }
    let side = path.with_file_name(format!("metrics.after-step-{step}.jsonl"));
    let mut side_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&side)
        .map_err(|e| Error::io("open", &side, e))?;
    for line in &moved {
        writeln!(side_file, "{line}").map_err(|e| Error::io("write", &side, e))?;
    }
    side_file.sync_all().map_err(|e| Error::io("sync", &side, e))?;
    let temporary = path.with_extension("jsonl.partial");
    let kept: String = keep.iter().map(|line| format!("{line}\n")).collect();
    std::fs::write(&temporary, kept).map_err(|e| Error::io("write", &temporary, e))?;
    std::fs::rename(&temporary, path).map_err(|e| Error::io("replace", path, e))
}
