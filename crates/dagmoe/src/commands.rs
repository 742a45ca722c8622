//! The work behind each subcommand that is more than a call into `train`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use burn::module::Module;
use dagmoe_data::{PrepareOptions, PrepareSummary, TextTokenizer};
use dagmoe_data::sources::SourceOptions;
use dagmoe_model::{ParamCounts, Precision, parse_device};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::batches::{open_training_corpora, training_unigram};
use crate::checkpoint::Checkpoint;
use crate::config::{RunConfig, parse_config};
use crate::error::{Error, Result};
use crate::eval::{DataIdentity, EvalResult, EvalWindow, evaluate, open_eval_set};
use crate::generate::{SamplingOptions, generate};
use crate::tasks::{TaskResult, load_task, score_task};
use crate::train::set_threads;

/// Trains a byte-level BPE tokenizer on the documents of `inputs`.
pub fn train_tokenizer(
    inputs: &[PathBuf],
    source: &SourceOptions,
    vocab_size: usize,
    special_tokens: &[String],
    output: &Path,
) -> Result<TextTokenizer> {
    if output.exists() {
        return Err(Error::Usage(format!(
            "tokenizer {} already exists; delete it or pass another --output",
            output.display()
        )));
    }
    let (documents, stats) = dagmoe_data::sources::read_all(inputs, source.clone())?;
    if documents.is_empty() {
        return Err(dagmoe_data::sources::no_usable_documents(inputs, &stats).into());
    }
    let texts: Vec<String> = documents.into_iter().map(|(_, text)| text).collect();
    let tokenizer = dagmoe_data::train_bpe_tokenizer(&texts, vocab_size, special_tokens, output)?;
    if tokenizer.vocab_size() < vocab_size {
        tracing::warn!(
            requested = vocab_size,
            reached = tokenizer.vocab_size(),
            "the corpus supports fewer merges than requested; set model.vocab_size to the reached size"
        );
    }
    Ok(tokenizer)
}

/// Copies an existing `tokenizer.json` to `output` after checking that it loads.
pub fn import_tokenizer(source: &Path, output: &Path) -> Result<TextTokenizer> {
    TextTokenizer::load(source)?;
    if output.exists() {
        return Err(Error::Usage(format!("tokenizer {} already exists; delete it or pass another --output", output.display())));
    }
    std::fs::copy(source, output).map_err(|e| Error::io("copy tokenizer to", output, e))?;
    Ok(TextTokenizer::load(output)?)
}

/// Tokenizes a corpus into a prepared directory, with a progress line on a terminal.
pub fn prepare(tokenizer_path: &Path, options: &PrepareOptions) -> Result<PrepareSummary> {
    let tokenizer = TextTokenizer::load(tokenizer_path)?;
    let progress = ProgressBar::new_spinner();
    if std::io::stderr().is_terminal() {
        progress.set_draw_target(ProgressDrawTarget::stderr());
        progress.set_style(ProgressStyle::with_template("{spinner} prepare {msg} [{elapsed}]").expect("the progress template is valid"));
    } else {
        progress.set_draw_target(ProgressDrawTarget::hidden());
    }
    let started = std::time::Instant::now();
    let summary = dagmoe_data::prepare_corpus(&tokenizer, options, &mut |done| {
        let megabytes = done.bytes as f64 / 1e6;
        progress.set_message(format!(
            "{} documents, {megabytes:.1} MB, {} tokens, {:.2} MB/s",
            done.documents,
            done.tokens,
            megabytes / started.elapsed().as_secs_f64().max(1e-9)
        ));
        progress.tick();
    });
    progress.finish_and_clear();
    Ok(summary?)
}

/// Builds a fine-tuning config: `[data]` and `[train]` from `file`, `[model]`
/// from the checkpoint. A `[model]` section in `file` must match the checkpoint's.
pub fn finetune_config(from: &Path, file: &Path, overrides: &[String]) -> Result<RunConfig> {
    let checkpoint = Checkpoint::open(from)?;
    let text = std::fs::read_to_string(file).map_err(|e| Error::io("read config", file, e))?;
    let mut table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| Error::Config(format!("{} is not valid TOML: {}", file.display(), e.message())))?;
    if !table.contains_key("model") {
        let model = toml::Table::try_from(&checkpoint.config.model).expect("a model config serializes");
        table.insert("model".into(), toml::Value::Table(model));
    }
    let resolved = toml::to_string(&table).expect("a TOML table serializes");
    let config = parse_config(&resolved, &file.display().to_string(), overrides)?;
    let differing = crate::resume::model_differences(&checkpoint.config, &config);
    if !differing.is_empty() {
        return Err(Error::Config(format!(
            "{} or its --set overrides change {} of the checkpoint {}, whose weights fix the model; remove [model] and those overrides to take the checkpoint's",
            file.display(),
            differing.join(", "),
            from.display()
        )));
    }
    Ok(config)
}

/// Report written by `dagmoe eval`.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub checkpoint: PathBuf,
    pub step: u64,
    /// Number format of the matrix products the scores were computed in.
    pub precision: Precision,
    pub results: Vec<EvalResult>,
    pub tasks: Vec<TaskResult>,
}

/// Options of `dagmoe eval`.
pub struct EvalOptions {
    pub checkpoint: PathBuf,
    /// Named prepared directories; empty uses the checkpoint's `data.valid`.
    pub sets: Vec<(String, PathBuf)>,
    /// Maximum tokens per set; `None` uses the checkpoint's `data.eval_tokens`.
    pub eval_tokens: Option<u64>,
    /// Device override; `None` uses the checkpoint's `train.device`.
    pub device: Option<String>,
    /// Precision override; `None` uses the checkpoint's `train.precision`.
    pub precision: Option<Precision>,
    /// Window stride for sliding evaluation; `None` uses non-overlapping windows.
    pub stride: Option<usize>,
    /// Sequences per batch; `None` uses the checkpoint's `train.eval_batch_size`.
    pub batch_size: Option<usize>,
    /// Named multiple-choice task files; empty uses the checkpoint's `data.tasks`.
    pub tasks: Vec<(String, PathBuf)>,
}

/// Scores a checkpoint on each set.
pub fn run_eval(options: &EvalOptions) -> Result<EvalReport> {
    let checkpoint = Checkpoint::open(&options.checkpoint)?;
    let config = &checkpoint.config;
    set_threads(config.train.threads);
    let device_name = options.device.clone().unwrap_or_else(|| config.train.device.clone());
    let device = parse_device(&device_name).map_err(Error::Usage)?.autodiff();
    let precision = options.precision.unwrap_or(config.train.precision);
    let model = checkpoint.load_model(&device)?.with_precision(precision).valid();
    let device = device.inner();

    let identity = DataIdentity {
        vocab_size: config.model.vocab_size,
        tokenizer_sha256: checkpoint.state.tokenizer_sha256.clone(),
    };
    let sets: Vec<(String, PathBuf)> = if options.sets.is_empty() {
        config.data.valid.iter().map(|(name, dir)| (name.clone(), dir.clone())).collect()
    } else {
        options.sets.clone()
    };
    let tasks: Vec<(String, PathBuf)> = if options.tasks.is_empty() {
        config.data.tasks.iter().map(|(name, path)| (name.clone(), path.clone())).collect()
    } else {
        options.tasks.clone()
    };
    if sets.is_empty() && tasks.is_empty() {
        return Err(Error::Usage(
            "nothing to evaluate: pass --data NAME=DIR or --task NAME=FILE, or set data.valid in the config".into(),
        ));
    }
    // The unigram baseline needs the training split; it is skipped when that
    // data is gone or the run fine-tuned on examples.
    let unigram = match config.data.sft {
        Some(_) => None,
        None => open_training_corpora(config, &identity).ok().map(|corpora| training_unigram(&corpora, config.model.vocab_size)),
    };
    let limit = options.eval_tokens.unwrap_or(config.data.eval_tokens);
    let seq_len = config.data.seq_len;
    let stride = options.stride.unwrap_or(seq_len);
    if !(1..=seq_len).contains(&stride) {
        return Err(Error::Usage(format!("invalid --stride {stride}: use a value from 1 to the checkpoint's seq_len {seq_len}")));
    }
    let batch_size = options.batch_size.unwrap_or(config.train.eval_batch_size);
    if batch_size == 0 {
        return Err(Error::Usage("invalid --batch-size 0: use a positive number of sequences".into()));
    }
    let window = EvalWindow { seq_len, stride, batch_size, max_tokens: (limit > 0).then_some(limit) };

    let mut results = Vec::new();
    for (name, dir) in &sets {
        if !dir.exists() {
            return Err(Error::Usage(format!(
                "evaluation set {name}: {} does not exist; run scripts/get-corpus.sh and `dagmoe data prepare`, or fix --data",
                dir.display()
            )));
        }
        let set = open_eval_set(name, dir, &identity)?;
        let result = evaluate(&model, &set, &window, unigram.as_ref(), &device);
        results.push(result);
    }
    let mut task_results = Vec::new();
    if !tasks.is_empty() {
        let tokenizer = checkpoint_tokenizer(&checkpoint)?;
        for (name, path) in &tasks {
            task_results.push(score_task(name, &load_task(path)?, &model, &tokenizer, &device)?);
        }
    }
    Ok(EvalReport { checkpoint: checkpoint.dir.clone(), step: checkpoint.state.step, precision, results, tasks: task_results })
}

/// Loads the tokenizer a checkpoint was trained with, checking its hash.
fn checkpoint_tokenizer(checkpoint: &Checkpoint) -> Result<TextTokenizer> {
    let path = &checkpoint.config.data.tokenizer;
    let tokenizer = TextTokenizer::load(path)?;
    if tokenizer.sha256() != checkpoint.state.tokenizer_sha256 {
        return Err(Error::Config(format!(
            "the tokenizer {} is not the one checkpoint {} was trained with; restore it",
            path.display(),
            checkpoint.dir.display()
        )));
    }
    Ok(tokenizer)
}

/// Rejects an eval report path that contains a file other than an earlier eval
/// report, so a mistyped `--output` cannot replace a user's file.
pub fn check_report_path(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let is_report = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .is_some_and(|json| json.get("checkpoint").is_some() && json.get("results").is_some());
    if is_report {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "--output {} exists and is not a dagmoe eval report; choose another path",
            path.display()
        )))
    }
}

/// Generates a continuation of `prompt` with a checkpoint and the tokenizer it was trained with.
pub fn run_generate(checkpoint_dir: &Path, prompt: &str, options: &SamplingOptions, device: Option<&str>) -> Result<String> {
    let checkpoint = Checkpoint::open(checkpoint_dir)?;
    let config = &checkpoint.config;
    set_threads(config.train.threads);
    let device = parse_device(device.unwrap_or(&config.train.device)).map_err(Error::Usage)?.autodiff();
    let model = checkpoint.load_model(&device)?.with_precision(config.train.precision).valid();
    let tokenizer = checkpoint_tokenizer(&checkpoint)?;
    generate(&model, &tokenizer, prompt, options, &device.inner())
}

/// Formats several checkpoints' results side by side: perplexity per set and
/// checkpoint, and each later checkpoint's difference from the first.
pub fn comparison_table(reports: &[EvalReport]) -> String {
    let mut out = format!("{:<16}", "set");
    for (i, _) in reports.iter().enumerate() {
        out.push_str(&format!(" {:>12}", format!("ppl #{}", i + 1)));
        if i > 0 {
            out.push_str(&format!(" {:>10}", format!("#{} - #1", i + 1)));
        }
    }
    out.push('\n');
    let Some(first) = reports.first() else { return out };
    for (row, result) in first.results.iter().enumerate() {
        out.push_str(&format!("{:<16}", result.set));
        for (i, report) in reports.iter().enumerate() {
            let perplexity = report.results[row].perplexity;
            out.push_str(&format!(" {perplexity:>12.2}"));
            if i > 0 {
                out.push_str(&format!(" {:>+10.2}", perplexity - result.perplexity));
            }
        }
        out.push('\n');
    }
    for (i, report) in reports.iter().enumerate() {
        out.push_str(&format!("#{}: {} (step {})\n", i + 1, report.checkpoint.display(), report.step));
    }
    out
}

/// Shared-expert width that brings `baseline`'s total parameter count closest
/// to `target`'s, and the remaining difference (baseline minus target).
pub fn match_shared_expert(baseline: &RunConfig, target: &RunConfig) -> Result<(usize, i64)> {
    let model = &baseline.model;
    let layers = model.moe_layer_count();
    let mut without_shared = model.clone();
    without_shared.moe.shared_expert_hidden = 0;
    let base = ParamCounts::of(&without_shared).total as i64;
    let goal = ParamCounts::of(&target.model).total as i64;
    let per_unit = (layers * 3 * model.d_model) as i64;
    if goal < base {
        return Err(Error::Usage(format!(
            "the baseline without a shared expert already has {base} parameters, more than the {goal} of the target; shrink the baseline"
        )));
    }
    let hidden = ((goal - base) as f64 / per_unit as f64).round() as usize;
    Ok((hidden, base + hidden as i64 * per_unit - goal))
}

/// Formats the parameter counts of a model config as a table.
pub fn params_table(config: &RunConfig) -> String {
    let counts = ParamCounts::of(&config.model);
    let rows = [
        ("total", counts.total),
        ("active per token", counts.active_per_token),
        ("embedding", counts.embedding),
        ("lm head", counts.lm_head),
        ("attention", counts.attention),
        ("norms", counts.norms),
        ("dense ffn", counts.dense_ffn),
        ("router", counts.router),
        ("experts", counts.experts),
        ("shared experts", counts.shared_experts),
        ("dag", counts.dag),
    ];
    rows.iter().map(|(name, count)| format!("{name:<18} {count:>12}\n")).collect()
}
