//! Multiple-choice tasks scored by log-likelihood, as lm-evaluation-harness
//! does. Each choice is scored by the summed log-probability of its tokens
//! given the context, and `accuracy_norm` divides that sum by the choice's
//! length in bytes before comparing.

use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use dagmoe_data::TextTokenizer;
use dagmoe_model::{DagMoeModel, token_nll};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One multiple-choice item: a JSONL line `{"context": ..., "choices": [...], "answer": i}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChoiceItem {
    pub context: String,
    pub choices: Vec<String>,
    /// Index of the correct choice.
    pub answer: usize,
}

/// Accuracy of a model on one task.
#[derive(Debug, Clone, Serialize)]
pub struct TaskResult {
    pub task: String,
    pub items: usize,
    pub accuracy: f64,
    /// Accuracy when each choice's log-likelihood is divided by its length in bytes.
    pub accuracy_norm: f64,
}

/// Reads a JSONL task file; an invalid line is an error naming the file and line.
pub fn load_task(path: &Path) -> Result<Vec<ChoiceItem>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("read task", path, e))?;
    let mut items = Vec::new();
    for (index, line) in text.lines().enumerate().filter(|(_, line)| !line.trim().is_empty()) {
        let invalid = |message: String| Error::Usage(format!("{}:{}: {message}", path.display(), index + 1));
        let item: ChoiceItem = serde_json::from_str(line).map_err(|e| {
            invalid(format!("{e}; each line must be {{\"context\": str, \"choices\": [str, ...], \"answer\": index}}"))
        })?;
        if item.choices.len() < 2 || item.answer >= item.choices.len() {
            return Err(invalid(format!(
                "answer {} with {} choices; give at least two choices and a 0-based answer index below their count",
                item.answer,
                item.choices.len()
            )));
        }
        items.push(item);
    }
    if items.is_empty() {
        return Err(Error::Usage(format!("task {} contains no item", path.display())));
    }
    Ok(items)
}

/// Scores every item of a task.
pub fn score_task(
    name: &str,
    items: &[ChoiceItem],
    model: &DagMoeModel,
    tokenizer: &TextTokenizer,
    device: &Device,
) -> Result<TaskResult> {
    let mut correct = 0;
    let mut correct_norm = 0;
    for item in items {
        let scores = choice_log_likelihoods(item, model, tokenizer, device)?;
        let best = |values: &[f64]| values.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i);
        let normalized: Vec<f64> = scores.iter().zip(&item.choices).map(|(s, c)| s / c.len().max(1) as f64).collect();
        correct += usize::from(best(&scores) == Some(item.answer));
        correct_norm += usize::from(best(&normalized) == Some(item.answer));
    }
    Ok(TaskResult {
        task: name.to_string(),
        items: items.len(),
        accuracy: correct as f64 / items.len() as f64,
        accuracy_norm: correct_norm as f64 / items.len() as f64,
    })
}

/// Summed log-probability of each choice's tokens after the context, one
/// padded batch per item. Sequences longer than the model's context lose
/// tokens from the left of the context.
fn choice_log_likelihoods(item: &ChoiceItem, model: &DagMoeModel, tokenizer: &TextTokenizer, device: &Device) -> Result<Vec<f64>> {
    let context = tokenizer.encode(&item.context)?;
    let mut rows = Vec::new();
    for choice in &item.choices {
        let continuation = tokenizer.encode(choice)?;
        let mut sequence = context.clone();
        sequence.extend_from_slice(&continuation);
        let keep = sequence.len().min(model.max_len() + 1);
        let sequence = sequence[sequence.len() - keep..].to_vec();
        let scored = continuation.len().min(keep - 1);
        rows.push((sequence, scored));
    }
    let width = rows.iter().map(|(sequence, _)| sequence.len()).max().unwrap_or(2).max(2);
    let t = width - 1;
    let mut inputs = Vec::new();
    let mut targets = Vec::new();
    let mut mask = Vec::new();
    for (sequence, scored) in &rows {
        let len = sequence.len();
        for i in 0..t {
            inputs.push(sequence.get(i).copied().unwrap_or(0) as i64);
            targets.push(sequence.get(i + 1).copied().unwrap_or(0) as i64);
            // Target i predicts token i + 1; the choice's tokens are the last `scored` of the sequence.
            mask.push(if i + 1 < len && i + 1 >= len - scored { 1.0f32 } else { 0.0 });
        }
    }
    let b = rows.len();
    let inputs = Tensor::<2, Int>::from_data(TensorData::new(inputs, [b, t]), device);
    let targets = Tensor::<2, Int>::from_data(TensorData::new(targets, [b, t]), device);
    let mask = Tensor::<2>::from_data(TensorData::new(mask, [b, t]), device);
    let nll_bt = token_nll(model.forward(inputs).logits_btv, targets).mul(mask);
    let sums: Vec<f32> = nll_bt.sum_dim(1).into_data().iter::<f32>().collect();
    Ok(sums.into_iter().map(|nll| -(nll as f64)).collect())
}
