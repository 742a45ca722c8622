//! The training loop shared by `pretrain` and `finetune`.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use dagmoe_data::{Batch, BatchProducer, Prefetcher, TextTokenizer};
use dagmoe_model::{DagMoeModel, ParamCounts, Precision, token_nll};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::checkpoint::{Checkpoint, CheckpointWriter, TrainerState, list_checkpoints, save_checkpoint};
use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::eval::{DataIdentity, EvalResult, EvalSet, EvalWindow, Unigram, batch_tensors, evaluate, open_eval_set};
use crate::metrics::{MetricsWriter, StepMetrics, trim_metrics_after};
use crate::optim::{AdamW, clip_scale, global_norm, learning_rate};
use crate::params::{GradientCollector, ParamUpdater};
use crate::batches::{BatchSource, open_training_data};
use crate::resume::resume_checkpoint;
use crate::tasks::{ChoiceItem, TaskResult, load_task, score_task};

/// Summary of a finished run, also written to `<out_dir>/run.json`.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub run_dir: PathBuf,
    pub checkpoint: PathBuf,
    pub steps: u64,
    pub tokens_seen: u64,
    /// Training tokens per second in this process, its first step excluded,
    /// evaluation and checkpoint time excluded.
    pub train_tokens_per_second: f64,
    /// Share of the timed training steps spent waiting for batches.
    pub data_wait_fraction: f64,
    pub final_loss: f64,
    pub skipped_steps: u64,
    pub params_total: usize,
    pub params_active_per_token: usize,
    pub eval: Vec<EvalResult>,
    pub tasks: Vec<TaskResult>,
    /// Checkpoint whose weights a fine-tuning run started from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
    /// Evaluation of those starting weights, before the first step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_before: Option<Vec<EvalResult>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tasks_before: Option<Vec<TaskResult>>,
}

/// Source of a run's initial state.
pub enum Start {
    /// Fresh weights from `train.seed`.
    Scratch,
    /// Weights of a checkpoint, with a new optimizer and data order (fine-tuning).
    Weights(PathBuf),
    /// Everything from the newest complete checkpoint in `train.out_dir`.
    /// A config that differs from the checkpoint's in a key that changes
    /// the result is rejected unless `allow_config_change` is set.
    Resume { allow_config_change: bool },
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs a SIGINT and SIGTERM handler: training then finishes its current
/// step, saves a checkpoint and returns [`Error::Interrupted`].
pub fn install_interrupt_handler() -> Result<()> {
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst))
        .map_err(|e| Error::Usage(format!("failed to install the SIGINT/SIGTERM handler: {e}")))
}

/// Sets the compute threads of both backends; 0 keeps the libraries' defaults (all cores).
pub fn set_threads(threads: usize) {
    if threads == 0 {
        return;
    }
    #[cfg(feature = "tch")]
    tch::set_num_threads(threads as i32);
    // flex uses rayon's global pool, which can be sized only before its first use;
    // a second call in the same process keeps the first size.
    let _ = rayon::ThreadPoolBuilder::new().num_threads(threads).build_global();
}

/// Keeps freed memory in the process instead of returning it to the kernel.
///
/// glibc serves every allocation above its mmap threshold (at most 32 MiB
/// when adjusted dynamically) with a fresh mapping and unmaps it on free.
/// The logits of a step are `batch * seq_len * vocab` floats, 64 MiB for the
/// small presets, so they and their gradients were page-faulted and zeroed
/// anew every step. Raising the threshold and disabling heap trimming lets those
/// blocks be reused. NOTE: this trades a higher resident set (about 250 MiB
/// on the small presets) for step time, measured by scripts/bench.sh.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is called
        // before the model allocates, and concurrent calls are serialised by glibc.
        let mmap = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30) };
        let trim = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) };
        if mmap != 1 || trim != 1 {
            tracing::debug!(mmap, trim, "glibc rejected an allocator setting; freed memory goes back to the kernel");
        }
    }
}

/// Trains as `config` specifies and returns the run summary.
pub fn train(config: RunConfig, start: Start) -> Result<RunSummary> {
    let mut trainer = Trainer::new(config, start)?;
    trainer.run()
}

/// Step times of a short training run, from [`bench_training`].
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Number format of the matrix products.
    pub precision: Precision,
    /// Training steps timed, after the untimed warm-up steps.
    pub steps: u64,
    /// Target tokens per optimizer step.
    pub tokens_per_step: u64,
    pub step_seconds: Vec<f64>,
    pub median_step_seconds: f64,
    /// `tokens_per_step / median_step_seconds`.
    pub tokens_per_second: f64,
    /// Share of the timed steps spent waiting for batches.
    pub data_wait_fraction: f64,
    pub final_loss: f64,
    /// Peak resident memory of this process so far, in MiB.
    pub peak_rss_mib: f64,
}

/// Returns the peak resident set size of this process in MiB (`getrusage`,
/// which reports KiB on Linux).
fn peak_rss_mib() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let status = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if status == 0 { usage.ru_maxrss as f64 / 1024.0 } else { f64::NAN }
}

/// Times `steps` training steps of `config` after `warmup` untimed ones: the
/// same model, data loader, gradient and AdamW code as `train`, without
/// evaluation, logging or checkpoints. Writes only to a temporary directory,
/// which it removes.
pub fn bench_training(mut config: RunConfig, warmup: u64, steps: u64) -> Result<BenchReport> {
    if steps == 0 {
        return Err(Error::Usage("invalid --steps 0: time at least one step".into()));
    }
    let scratch = std::env::temp_dir().join(format!("dagmoe-bench-{}", std::process::id()));
    config.train.out_dir = scratch.clone();
    config.train.steps = warmup + steps;
    config.train.warmup_steps = config.train.warmup_steps.min(config.train.steps);
    let precision = config.train.precision;
    let result = Trainer::new(config, Start::Scratch).and_then(|mut trainer| {
        let mut step_seconds = Vec::with_capacity(steps as usize);
        let mut data_wait = Duration::ZERO;
        let mut tokens_per_step = 0;
        let mut final_loss = f64::NAN;
        for step in 0..warmup + steps {
            let started = Instant::now();
            let result = trainer.step()?;
            if step >= warmup {
                step_seconds.push(started.elapsed().as_secs_f64());
                data_wait += result.data_wait;
                tokens_per_step = result.tokens;
            }
            final_loss = result.loss;
        }
        let mut sorted = step_seconds.clone();
        sorted.sort_by(f64::total_cmp);
        let middle = sorted.len() / 2;
        let median = if sorted.len() % 2 == 1 { sorted[middle] } else { (sorted[middle - 1] + sorted[middle]) / 2.0 };
        Ok(BenchReport {
            precision,
            steps,
            tokens_per_step,
            data_wait_fraction: data_wait.as_secs_f64() / step_seconds.iter().sum::<f64>(),
            step_seconds,
            median_step_seconds: median,
            tokens_per_second: tokens_per_step as f64 / median,
            final_loss,
            peak_rss_mib: peak_rss_mib(),
        })
    });
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

struct Trainer {
    config: RunConfig,
    device: Device,
    model: DagMoeModel,
    optimizer: AdamW,
    loader: Prefetcher<BatchSource>,
    /// Sequences per epoch of the training data, for the start-up log.
    sequences_per_epoch: usize,
    state: TrainerState,
    eval_sets: Vec<EvalSet>,
    unigram: Option<Unigram>,
    metrics: MetricsWriter,
    out_dir: PathBuf,
    last_checkpoint: Option<PathBuf>,
    tokenizer: TextTokenizer,
    tasks: Vec<(String, Vec<ChoiceItem>)>,
    init_from: Option<PathBuf>,
}

/// Gradients of one optimizer step, summed over its micro-batches, with the
/// step's scalars read back to the host.
pub struct StepGradients {
    /// `(parameter name, flattened gradient)` in visiting order.
    pub gradients: Vec<(String, Tensor<1>)>,
    pub lm_loss: f64,
    pub load_balance: f64,
    pub z_loss: f64,
    pub tokens_per_expert: Vec<Vec<usize>>,
    pub mean_edges: Vec<Vec<Tensor<2>>>,
}

/// Computes the gradient of one optimizer step over `batches`.
///
/// The LM loss of each micro-batch is its summed token NLL divided by the
/// target tokens of the whole step, so the gradient is a per-token average over
/// the step however the tokens are split into micro-batches. The auxiliary
/// losses are averaged over micro-batches.
pub fn step_gradients(model: &DagMoeModel, config: &RunConfig, batches: &[Batch], device: &Device) -> StepGradients {
    let moe = &config.model.moe;
    let step_tokens: usize = batches.iter().map(Batch::target_count).sum();
    let micro_batches = batches.len() as f64;
    let mut sums: Vec<(String, Tensor<1>)> = Vec::new();
    let mut result = StepGradients {
        gradients: Vec::new(),
        lm_loss: 0.0,
        load_balance: 0.0,
        z_loss: 0.0,
        tokens_per_expert: Vec::new(),
        mean_edges: Vec::new(),
    };
    for batch in batches {
        let (inputs, targets, mask) = batch_tensors(batch, device);
        let output = model.forward(inputs);
        let lm = token_nll(output.logits_btv, targets).mul(mask).sum().div_scalar(step_tokens as f64);
        let aux = (output.load_balance.clone().mul_scalar(moe.load_balance_coef)
            + output.z_loss.clone().mul_scalar(moe.z_loss_coef))
        .div_scalar(micro_batches);
        let grads = (lm.clone() + aux).backward();

        result.lm_loss += lm.into_scalar::<f32>() as f64;
        result.load_balance += output.load_balance.into_scalar::<f32>() as f64 / micro_batches;
        result.z_loss += output.z_loss.into_scalar::<f32>() as f64 / micro_batches;
        add_counts(&mut result.tokens_per_expert, output.routing.tokens_per_expert);
        result.mean_edges = output.routing.mean_edges;

        let mut collector = GradientCollector::new(&grads);
        model.visit(&mut collector);
        if sums.is_empty() {
            sums = collector.gradients.into_iter().map(|(name, _, grad)| (name, grad)).collect();
        } else {
            for ((_, total), (_, _, grad)) in sums.iter_mut().zip(collector.gradients) {
                *total = total.clone() + grad;
            }
        }
    }
    result.gradients = sums;
    result
}

fn add_counts(total: &mut Vec<Vec<usize>>, step: Vec<Vec<usize>>) {
    if total.is_empty() {
        *total = step;
        return;
    }
    for (layer_total, layer) in total.iter_mut().zip(step) {
        for (count, added) in layer_total.iter_mut().zip(layer) {
            *count += added;
        }
    }
}

/// Scalars and statistics of one optimizer step.
struct StepResult {
    loss: f64,
    grad_norm: f64,
    lr: f64,
    tokens: u64,
    skipped: bool,
    gradients: StepGradients,
    /// Time the step waited for its batches.
    data_wait: Duration,
}

impl Trainer {
    fn new(config: RunConfig, start: Start) -> Result<Self> {
        set_threads(config.train.threads);
        keep_freed_memory();
        let device = dagmoe_model::parse_device(&config.train.device).map_err(Error::Config)?.autodiff();
        device.seed(config.train.seed);

        let tokenizer = TextTokenizer::load(&config.data.tokenizer).map_err(|e| {
            // The tokenizer's own errors already name the fix.
            Error::Config(format!("data.tokenizer: {}", Error::with_causes(&e)))
        })?;
        if tokenizer.vocab_size() != config.model.vocab_size {
            return Err(Error::Config(format!(
                "model.vocab_size = {} does not match the tokenizer {} with {} entries; set model.vocab_size = {}",
                config.model.vocab_size,
                config.data.tokenizer.display(),
                tokenizer.vocab_size(),
                tokenizer.vocab_size()
            )));
        }
        let identity = DataIdentity { vocab_size: config.model.vocab_size, tokenizer_sha256: tokenizer.sha256().to_string() };
        let (mut loader, unigram, train_data_sha256) = open_training_data(&config, &tokenizer, &identity)?;
        let eval_sets = config
            .data
            .valid
            .iter()
            .map(|(name, dir)| open_eval_set(name, dir, &identity))
            .collect::<Result<Vec<_>>>()?;
        let tasks = config
            .data
            .tasks
            .iter()
            .map(|(name, path)| Ok((name.clone(), load_task(path)?)))
            .collect::<Result<Vec<_>>>()?;

        let out_dir = config.train.out_dir.clone();
        let resume_from = match &start {
            Start::Resume { allow_config_change } => {
                Some(resume_checkpoint(&out_dir, &config, &identity, &train_data_sha256, *allow_config_change)?)
            }
            _ => {
                if !list_checkpoints(&out_dir)?.is_empty() {
                    return Err(Error::Usage(format!(
                        "train.out_dir {} already contains a run; continue it with --resume, or choose another with --set train.out_dir=DIR",
                        out_dir.display()
                    )));
                }
                if out_dir.join("metrics.jsonl").exists() {
                    return Err(Error::Usage(format!(
                        "train.out_dir {} contains a run that stopped before its first checkpoint; delete the directory or choose another with --set train.out_dir=DIR",
                        out_dir.display()
                    )));
                }
                None
            }
        };
        std::fs::create_dir_all(&out_dir).map_err(|e| Error::io("create run directory", &out_dir, e))?;
        let config_path = out_dir.join("config.toml");
        std::fs::write(&config_path, config.to_toml()).map_err(|e| Error::io("write", &config_path, e))?;

        let mut optimizer = AdamW::new(&config.train);
        let mut state = TrainerState {
            step: 0,
            tokens_seen: 0,
            loader: loader.cursor(),
            tokenizer_sha256: identity.tokenizer_sha256,
            train_data_sha256: train_data_sha256.clone(),
            skipped_steps: 0,
            model_sha256: None,
        };
        let model = match (&start, &resume_from) {
            (_, Some(checkpoint)) => {
                let model = checkpoint.load_model(&device)?;
                checkpoint.load_optimizer(&mut optimizer, &device)?;
                state = checkpoint.state.clone();
                loader.restore(&state.loader)?;
                trim_metrics_after(&out_dir.join("metrics.jsonl"), state.step)?;
                tracing::info!(checkpoint = %checkpoint.dir.display(), step = state.step, "resuming");
                model
            }
            (Start::Weights(dir), None) => {
                let checkpoint = Checkpoint::open(dir)?;
                if checkpoint.state.tokenizer_sha256 != state.tokenizer_sha256 {
                    return Err(Error::Config(format!(
                        "checkpoint {} was trained with another tokenizer than data.tokenizer = {}; fine-tune with the checkpoint's tokenizer and data prepared with it",
                        dir.display(),
                        config.data.tokenizer.display()
                    )));
                }
                checkpoint.load_model(&device)?
            }
            _ => DagMoeModel::new(&config.model, config.data.seq_len, &device).map_err(|e| Error::Config(e.to_string()))?,
        };
        let model = model.with_precision(config.train.precision);
        let init_from = match &start {
            Start::Weights(dir) => Some(dir.clone()),
            _ => None,
        };
        let sequences_per_epoch = loader.len();
        let loader = Prefetcher::start(loader, config.data.prefetch);
        Ok(Self {
            metrics: MetricsWriter::create(&out_dir.join("metrics.jsonl"))?,
            sequences_per_epoch,
            tokenizer,
            tasks,
            init_from,
            last_checkpoint: resume_from.map(|c| c.dir),
            config,
            device,
            model,
            optimizer,
            loader,
            state,
            eval_sets,
            unigram,
            out_dir,
        })
    }

    fn run(&mut self) -> Result<RunSummary> {
        let train = self.config.train.clone();
        let progress = progress_bar(train.steps, self.state.step);
        let counts = ParamCounts::of(&self.config.model);
        tracing::info!(
            run_dir = %self.out_dir.display(),
            params = counts.total,
            active_params = counts.active_per_token,
            sequences_per_epoch = self.sequences_per_epoch,
            device = %train.device,
            precision = train.precision.name(),
            "training started"
        );

        let (eval_before, tasks_before) = match &self.init_from {
            Some(_) if self.state.step == 0 => {
                let (results, tasks) = self.evaluate_all()?;
                (Some(results), Some(tasks))
            }
            _ => (None, None),
        };
        let first_step = self.state.step;
        let mut timed = Duration::ZERO;
        let mut timed_tokens = 0u64;
        let mut timed_data_wait = Duration::ZERO;
        let mut last_loss = f64::NAN;
        while self.state.step < train.steps {
            let started = Instant::now();
            let result = self.step()?;
            let elapsed = started.elapsed();
            // The first step of a process pays one-time allocation costs; leave it out of speed figures.
            if self.state.step > first_step + 1 {
                timed += elapsed;
                timed_tokens += result.tokens;
                timed_data_wait += result.data_wait;
            }
            let tokens_per_second = if timed.is_zero() { 0.0 } else { timed_tokens as f64 / timed.as_secs_f64() };
            let data_wait_fraction = if timed.is_zero() { 0.0 } else { timed_data_wait.as_secs_f64() / timed.as_secs_f64() };
            last_loss = result.loss;
            let step = self.state.step;

            progress.set_position(step);
            progress.set_message(format!("loss {:.4} | {:.0} tok/s", result.loss, tokens_per_second));
            if step % train.log_every == 0 || step == train.steps || result.skipped {
                self.log_step(&result, tokens_per_second, data_wait_fraction, progress.is_hidden())?;
            }
            if train.eval_every > 0 && step % train.eval_every == 0 && step < train.steps {
                self.evaluate_all()?;
            }
            let due = train.checkpoint_every > 0 && step % train.checkpoint_every == 0;
            if due {
                self.save()?;
            }
            if INTERRUPTED.load(Ordering::SeqCst) {
                progress.abandon();
                let checkpoint = if due { self.last_checkpoint.clone().expect("just saved") } else { self.save()? };
                return Err(Error::Interrupted { step, checkpoint });
            }
        }
        progress.finish_and_clear();

        let (eval, tasks) = self.evaluate_all()?;
        let checkpoint = match &self.last_checkpoint {
            Some(dir) if crate::checkpoint::checkpoint_step(dir) == Some(self.state.step) => dir.clone(),
            _ => self.save()?,
        };
        let summary = RunSummary {
            run_dir: self.out_dir.clone(),
            checkpoint,
            steps: self.state.step,
            tokens_seen: self.state.tokens_seen,
            train_tokens_per_second: if timed.is_zero() { 0.0 } else { timed_tokens as f64 / timed.as_secs_f64() },
            data_wait_fraction: if timed.is_zero() { 0.0 } else { timed_data_wait.as_secs_f64() / timed.as_secs_f64() },
            final_loss: last_loss,
            skipped_steps: self.state.skipped_steps,
            params_total: counts.total,
            params_active_per_token: counts.active_per_token,
            eval,
            tasks,
            init_from: self.init_from.clone(),
            eval_before,
            tasks_before,
        };
        let path = self.out_dir.join("run.json");
        let json = serde_json::to_string_pretty(&summary).expect("run summary serializes");
        std::fs::write(&path, json).map_err(|e| Error::io("write", &path, e))?;
        Ok(summary)
    }

    /// Runs one optimizer step: learning rate, micro-batches, clipping, finite check, update.
    fn step(&mut self) -> Result<StepResult> {
        let train = &self.config.train;
        let lr = learning_rate(train, self.state.step);

        // Micro-batches: gradients averaged per token over the whole step.
        let batches: Vec<Batch> = (0..train.grad_accum).map(|_| self.loader.next_batch()).collect();
        let data_wait = self.loader.take_wait();
        let tokens = batches.iter().map(|b| b.target_count() as u64).sum();
        let gradients = step_gradients(&self.model, &self.config, &batches, &self.device);
        let moe = &self.config.model.moe;
        let loss = gradients.lm_loss + moe.load_balance_coef * gradients.load_balance + moe.z_loss_coef * gradients.z_loss;

        // Global-norm clipping scale, over all parameters together.
        let values: Vec<Tensor<1>> = gradients.gradients.iter().map(|(_, g)| g.clone()).collect();
        let grad_norm = global_norm(&values);
        let scale = clip_scale(grad_norm, train.grad_clip);

        // Finite check before any weight changes.
        self.state.step += 1;
        self.state.tokens_seen += tokens;
        self.state.loader = self.loader.cursor();
        if !loss.is_finite() || !grad_norm.is_finite() {
            self.skip_step(loss, grad_norm)?;
            return Ok(StepResult { loss, grad_norm, lr, tokens, skipped: true, gradients, data_wait });
        }

        // AdamW update of every parameter that received a gradient.
        let mut by_name: HashMap<&str, Tensor<1>> =
            gradients.gradients.iter().map(|(name, grad)| (name.as_str(), grad.clone())).collect();
        let optimizer = &mut self.optimizer;
        let mut updater = ParamUpdater::new(|name: &str, shape: &[usize], value| {
            let grad = by_name.remove(name)?;
            let grad = if scale < 1.0 { grad.mul_scalar(scale) } else { grad };
            Some(optimizer.update(name, shape.len(), value, grad, lr))
        });
        self.model = self.model.clone().map(&mut updater);
        self.optimizer.step += 1;
        Ok(StepResult { loss, grad_norm, lr, tokens, skipped: false, gradients, data_wait })
    }

    /// Counts a step whose loss or gradient norm is not finite, or stops the run
    /// when `train.max_skipped_steps` are used up.
    fn skip_step(&mut self, loss: f64, grad_norm: f64) -> Result<()> {
        let step = self.state.step;
        if self.state.skipped_steps >= self.config.train.max_skipped_steps {
            let last_good = match &self.last_checkpoint {
                Some(dir) => format!("the last good checkpoint is {}", dir.display()),
                None => "no checkpoint was saved yet".to_string(),
            };
            return Err(Error::Diverged(format!(
                "step {step}: loss {loss} or gradient norm {grad_norm} is not finite and no weight was updated; {last_good}. Lower train.lr or raise train.warmup_steps and resume, or allow skips with train.max_skipped_steps"
            )));
        }
        self.state.skipped_steps += 1;
        tracing::warn!(
            step,
            skipped = self.state.skipped_steps,
            allowed = self.config.train.max_skipped_steps,
            "skipping a step whose loss {loss} or gradient norm {grad_norm} is not finite"
        );
        Ok(())
    }

    fn log_step(&mut self, result: &StepResult, tokens_per_second: f64, data_wait_fraction: f64, plain: bool) -> Result<()> {
        let moe = &self.config.model.moe;
        let mean_edges: Vec<Vec<Vec<f32>>> = result
            .gradients
            .mean_edges
            .iter()
            .map(|levels| levels.iter().map(|edges| edges.to_data().iter::<f32>().collect()).collect())
            .collect();
        let flops_per_token = flops_per_token(&self.config);
        let mfu = (self.config.train.peak_flops > 0.0)
            .then(|| tokens_per_second * flops_per_token / self.config.train.peak_flops);
        let metrics = StepMetrics {
            step: self.state.step,
            tokens: self.state.tokens_seen,
            loss: result.loss,
            lm_loss: result.gradients.lm_loss,
            load_balance_loss: result.gradients.load_balance,
            z_loss: result.gradients.z_loss,
            load_balance_loss_scaled: result.gradients.load_balance * moe.load_balance_coef,
            z_loss_scaled: result.gradients.z_loss * moe.z_loss_coef,
            lr: result.lr,
            grad_norm: result.grad_norm,
            tokens_per_second,
            mfu,
            data_wait_fraction,
            skipped: result.skipped,
            ..StepMetrics::routing(&result.gradients.tokens_per_expert, mean_edges, moe.top_k)
        };
        if plain {
            tracing::info!(
                "step {}/{} loss {:.4} lr {:.2e} grad_norm {:.3} tok/s {:.0}",
                self.state.step,
                self.config.train.steps,
                result.loss,
                result.lr,
                result.grad_norm,
                tokens_per_second
            );
        }
        self.metrics.write(&metrics)
    }

    /// Evaluates the held-out sets and the multiple-choice tasks.
    fn evaluate_all(&mut self) -> Result<(Vec<EvalResult>, Vec<TaskResult>)> {
        let model = self.model.valid();
        let device = self.device.clone().inner();
        let window = EvalWindow {
            seq_len: self.config.data.seq_len,
            stride: self.config.data.seq_len,
            batch_size: self.config.train.eval_batch_size,
            max_tokens: (self.config.data.eval_tokens > 0).then_some(self.config.data.eval_tokens),
        };
        let mut results = Vec::new();
        for set in &self.eval_sets {
            let result = evaluate(&model, set, &window, self.unigram.as_ref(), &device);
            tracing::info!(
                set = %result.set,
                step = self.state.step,
                "eval loss {:.4} perplexity {:.2} (unigram {:.2})",
                result.loss,
                result.perplexity,
                result.unigram_perplexity.unwrap_or(f64::NAN)
            );
            self.metrics.write_eval(self.state.step, &result)?;
            results.push(result);
        }
        let mut task_results = Vec::new();
        for (name, items) in &self.tasks {
            let result = score_task(name, items, &model, &self.tokenizer, &device)?;
            tracing::info!(task = %name, step = self.state.step, "accuracy {:.4} (normalized {:.4})", result.accuracy, result.accuracy_norm);
            self.metrics.write_task(self.state.step, &result)?;
            task_results.push(result);
        }
        Ok((results, task_results))
    }

    fn save(&mut self) -> Result<PathBuf> {
        let writer = CheckpointWriter::default();
        let dir = save_checkpoint(&self.out_dir, &self.model, &self.optimizer, &self.state, &self.config, &writer)?;
        tracing::info!(checkpoint = %dir.display(), "checkpoint saved");
        self.last_checkpoint = Some(dir.clone());
        Ok(dir)
    }
}

/// Training FLOPs per token: 6 per active non-embedding parameter (forward and
/// backward matrix products) plus `12 * n_layers * d_model * seq_len` for
/// attention scores, the estimate of Chowdhery et al. (2022), appendix B.
pub fn flops_per_token(config: &RunConfig) -> f64 {
    let counts = ParamCounts::of(&config.model);
    let model = &config.model;
    let matmul_params = (counts.active_per_token - counts.embedding) as f64;
    6.0 * matmul_params + 12.0 * (model.n_layers * model.d_model * config.data.seq_len) as f64
}

fn progress_bar(steps: u64, position: u64) -> ProgressBar {
    let bar = ProgressBar::new(steps);
    bar.set_position(position);
    if std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template("step {pos}/{len} [{bar:30}] {msg} | eta {eta}")
            .expect("the progress template is valid")
            .progress_chars("=> ");
        bar.set_style(style);
    } else {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar
}
