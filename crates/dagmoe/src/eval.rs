//! Token-weighted perplexity on held-out sets, with a unigram baseline.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use dagmoe_data::manifest::Split;
use dagmoe_data::{Batch, EvalBatches, Manifest, TokenStream};
use dagmoe_model::{DagMoeModel, token_nll};
use serde::Serialize;

use crate::error::{Error, Result};

/// The valid split of a prepared directory, opened for scoring.
pub struct EvalSet {
    pub name: String,
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub stream: TokenStream,
}

/// Identity a prepared directory must share with the model: vocabulary and tokenizer.
#[derive(Debug, Clone)]
pub struct DataIdentity {
    pub vocab_size: usize,
    pub tokenizer_sha256: String,
}

/// Checks that a prepared directory was tokenized for this model.
pub fn check_manifest(dir: &Path, manifest: &Manifest, expected: &DataIdentity) -> Result<()> {
    if manifest.vocab_size != expected.vocab_size {
        return Err(Error::Config(format!(
            "vocab size mismatch: {} was prepared with vocab_size = {} but the model has model.vocab_size = {}; set model.vocab_size = {} or prepare the data with the model's tokenizer",
            dir.display(),
            manifest.vocab_size,
            expected.vocab_size,
            manifest.vocab_size
        )));
    }
    if manifest.tokenizer_sha256 != expected.tokenizer_sha256 {
        return Err(Error::Config(format!(
            "tokenizer mismatch: {} was prepared with tokenizer {} but the run uses {}; prepare it again with data.tokenizer",
            dir.display(),
            short(&manifest.tokenizer_sha256),
            short(&expected.tokenizer_sha256)
        )));
    }
    Ok(())
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

/// Opens the valid split of the prepared directory `dir` as the set `name`.
pub fn open_eval_set(name: &str, dir: &Path, expected: &DataIdentity) -> Result<EvalSet> {
    let manifest = Manifest::load(dir)?;
    check_manifest(dir, &manifest, expected)?;
    let stream = TokenStream::open(dir, &manifest, Split::Valid)?;
    if stream.len() < 2 {
        return Err(Error::Usage(format!(
            "evaluation set {name} ({}) has {} validation tokens; prepare it with a larger --valid-fraction",
            dir.display(),
            stream.len()
        )));
    }
    Ok(EvalSet { name: name.to_string(), dir: dir.to_path_buf(), manifest, stream })
}

/// Counts each token id of `stream`, starting every count at one (add-one smoothing).
fn token_counts(stream: &TokenStream, vocab_size: usize) -> Vec<u64> {
    let mut counts = vec![1u64; vocab_size];
    let mut buffer = vec![0u32; 1 << 16];
    let mut start = 0;
    while start < stream.len() {
        let take = (stream.len() - start).min(buffer.len() as u64) as usize;
        stream.read(start, &mut buffer[..take]);
        for &token in &buffer[..take] {
            counts[token as usize] += 1;
        }
        start += take as u64;
    }
    counts
}

/// Add-one smoothed unigram distribution of a token stream: the baseline a
/// language model must beat.
pub struct Unigram {
    log_probs: Vec<f64>,
}

impl Unigram {
    /// Fits the unigram of a weighted mixture: each stream's smoothed
    /// distribution, averaged with the normalised weights.
    pub fn fit_mixture(streams: &[(&TokenStream, f64)], vocab_size: usize) -> Self {
        let total_weight: f64 = streams.iter().map(|(_, w)| w).sum();
        let mut probs = vec![0.0f64; vocab_size];
        for (stream, weight) in streams {
            let counts = token_counts(stream, vocab_size);
            let total: u64 = counts.iter().sum();
            for (prob, count) in probs.iter_mut().zip(&counts) {
                *prob += weight / total_weight * (*count as f64 / total as f64);
            }
        }
        Self { log_probs: probs.iter().map(|p| p.ln()).collect() }
    }

    fn nll(&self, token: u32) -> f64 {
        -self.log_probs[token as usize]
    }
}

/// Scores of one evaluation set.
#[derive(Debug, Clone, Serialize)]
pub struct EvalResult {
    pub set: String,
    pub tokens: u64,
    /// Summed negative log-likelihood in nats.
    pub nll: f64,
    /// Mean NLL per scored token.
    pub loss: f64,
    /// `exp(total NLL / total scored tokens)`.
    pub perplexity: f64,
    /// Bits per UTF-8 byte, using the set's bytes-per-token ratio from its manifest.
    pub bits_per_byte: f64,
    /// Perplexity of the add-one unigram model of the training split on the same tokens.
    pub unigram_perplexity: Option<f64>,
}

/// How evaluation windows are laid over a set.
#[derive(Debug, Clone)]
pub struct EvalWindow {
    pub seq_len: usize,
    /// Window start spacing: `seq_len` for non-overlapping windows, less to slide.
    pub stride: usize,
    pub batch_size: usize,
    /// Score only the first this many targets.
    pub max_tokens: Option<u64>,
}

/// Scores `set` with `model`: every token after the first, or the first
/// `max_tokens` targets, each exactly once.
pub fn evaluate(model: &DagMoeModel, set: &EvalSet, window: &EvalWindow, unigram: Option<&Unigram>, device: &Device) -> EvalResult {
    let mut nll = 0.0;
    let mut tokens = 0u64;
    let mut unigram_nll = 0.0;
    let batches = EvalBatches::new(&set.stream, window.seq_len, window.stride, window.batch_size, window.max_tokens);
    for batch in batches {
        let (inputs, targets, mask) = batch_tensors(&batch, device);
        let nll_bt = token_nll(model.forward(inputs).logits_btv, targets);
        nll += nll_bt.mul(mask).sum().into_scalar::<f32>() as f64;
        tokens += batch.target_count() as u64;
        if let Some(unigram) = unigram {
            for row in 0..batch.rows {
                unigram_nll += batch.scored_targets(row).iter().map(|&t| unigram.nll(t)).sum::<f64>();
            }
        }
    }
    let loss = nll / tokens as f64;
    let split = &set.manifest.valid;
    let bytes_per_token = split.bytes as f64 / split.tokens.max(1) as f64;
    EvalResult {
        set: set.name.clone(),
        tokens,
        nll,
        loss,
        perplexity: loss.exp(),
        bits_per_byte: loss / std::f64::consts::LN_2 / bytes_per_token,
        unigram_perplexity: unigram.map(|_| (unigram_nll / tokens as f64).exp()),
    }
}

/// Inputs `[b, t]`, targets `[b, t]` and a `[b, t]` mask of scored positions.
pub fn batch_tensors(batch: &Batch, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>, Tensor<2>) {
    let width = batch.seq_len + 1;
    let ids: Vec<i64> = batch.tokens.iter().map(|&t| t as i64).collect();
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [batch.rows, width]), device);
    let inputs = tokens.clone().narrow(1, 0, batch.seq_len);
    let targets = tokens.narrow(1, 1, batch.seq_len);
    let mask: Vec<f32> = batch
        .target_lengths
        .iter()
        .zip(&batch.score_from)
        .flat_map(|(&count, &from)| (0..batch.seq_len).map(move |i| if (from..count).contains(&i) { 1.0 } else { 0.0 }))
        .collect();
    let mask = Tensor::<2>::from_data(TensorData::new(mask, [batch.rows, batch.seq_len]), device);
    (inputs, targets, mask)
}

/// Formats multiple-choice task results as an aligned table.
pub fn format_task_table(results: &[crate::tasks::TaskResult]) -> String {
    let mut out = format!("{:<16} {:>8} {:>10} {:>14}\n", "task", "items", "accuracy", "accuracy_norm");
    for r in results {
        out.push_str(&format!("{:<16} {:>8} {:>10.4} {:>14.4}\n", r.task, r.items, r.accuracy, r.accuracy_norm));
    }
    out
}

/// Formats perplexity results as an aligned table.
pub fn format_table(results: &[EvalResult]) -> String {
    let mut out = format!("{:<16} {:>10} {:>8} {:>10} {:>8} {:>12}\n", "set", "tokens", "loss", "perplexity", "bpb", "unigram ppl");
    for r in results {
        let unigram = r.unigram_perplexity.map(|p| format!("{p:.2}")).unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<16} {:>10} {:>8.4} {:>10.2} {:>8.4} {:>12}\n",
            r.set, r.tokens, r.loss, r.perplexity, r.bits_per_byte, unigram
        ));
    }
    out
}
