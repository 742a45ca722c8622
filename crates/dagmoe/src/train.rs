//! The training loop shared by `pretrain` and `finetune`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use burn::module::Module;
use burn::tensor::Device;
use dagmoe_data::manifest::Split;
use dagmoe_data::{Manifest, TextTokenizer, TokenStream, TrainLoader};
use dagmoe_model::{DagMoeModel, token_nll};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::checkpoint::{Checkpoint, TrainerState, list_checkpoints, save_checkpoint};
use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::eval::{DataIdentity, EvalResult, EvalSet, Unigram, batch_tensors, check_manifest, evaluate, open_eval_set};
use crate::metrics::{MetricsWriter, StepMetrics};
use crate::optim::{AdamW, clip_scale, global_norm, learning_rate};
use crate::params::{GradientCollector, ParamUpdater};

/// Summary of a finished run, also written to `<out_dir>/run.json`.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub run_dir: PathBuf,
    pub checkpoint: PathBuf,
    pub steps: u64,
    pub tokens_seen: u64,
    /// Training tokens per second, first step excluded, evaluation and checkpoint time excluded.
    pub train_tokens_per_second: f64,
    pub final_loss: f64,
    pub params_total: usize,
    pub params_active_per_token: usize,
    pub eval: Vec<EvalResult>,
}

/// Source of a run's initial weights.
pub enum Start {
    /// Fresh weights from `train.seed`.
    Scratch,
    /// Weights of a checkpoint, with a new optimizer and data order (fine-tuning).
    Weights(PathBuf),
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

/// Trains as `config` specifies and returns the run summary.
pub fn train(config: RunConfig, start: Start) -> Result<RunSummary> {
    let mut trainer = Trainer::new(config, start)?;
    trainer.run()
}

struct Trainer {
    config: RunConfig,
    device: Device,
    model: DagMoeModel,
    optimizer: AdamW,
    loader: TrainLoader,
    state: TrainerState,
    eval_sets: Vec<EvalSet>,
    unigram: Unigram,
    metrics: MetricsWriter,
    out_dir: PathBuf,
}

/// Scalars of one optimizer step, read back to the host.
struct StepResult {
    loss: f64,
    lm_loss: f64,
    load_balance: f64,
    z_loss: f64,
    grad_norm: f64,
    lr: f64,
    tokens: u64,
    tokens_per_expert: Vec<Vec<usize>>,
}

impl Trainer {
    fn new(config: RunConfig, start: Start) -> Result<Self> {
        set_threads(config.train.threads);
        let device = dagmoe_model::parse_device(&config.train.device).map_err(Error::Config)?.autodiff();
        device.seed(config.train.seed);

        let tokenizer = TextTokenizer::load(&config.data.tokenizer).map_err(|e| {
            Error::Config(format!("data.tokenizer: {}; run `dagmoe data tokenizer` or fix the path", Error::with_causes(&e)))
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
        let manifest = Manifest::load(&config.data.train)
            .map_err(|e| Error::Config(format!("data.train: {}; run `dagmoe data prepare` or fix the path", Error::with_causes(&e))))?;
        check_manifest(&config.data.train, &manifest, &identity)?;
        let stream = TokenStream::open(&config.data.train, &manifest, Split::Train)?;
        let unigram = Unigram::fit(&stream, config.model.vocab_size);
        let loader = TrainLoader::new(stream, config.data.seq_len, config.train.batch_size, config.train.seed)?;
        let eval_sets = config
            .data
            .valid
            .iter()
            .map(|(name, dir)| open_eval_set(name, dir, &identity))
            .collect::<Result<Vec<_>>>()?;

        let out_dir = config.train.out_dir.clone();
        if !list_checkpoints(&out_dir)?.is_empty() || out_dir.join("metrics.jsonl").exists() {
            return Err(Error::Usage(format!(
                "train.out_dir {} already contains a run; choose another with --set train.out_dir=DIR or delete it",
                out_dir.display()
            )));
        }
        std::fs::create_dir_all(&out_dir).map_err(|e| Error::io("create run directory", &out_dir, e))?;
        let config_path = out_dir.join("config.toml");
        std::fs::write(&config_path, config.to_toml()).map_err(|e| Error::io("write", &config_path, e))?;

        let model = match &start {
            Start::Scratch => DagMoeModel::new(&config.model, config.data.seq_len, &device)
                .map_err(|e| Error::Config(e.to_string()))?,
            Start::Weights(dir) => Checkpoint::open(dir)?.load_model(&device)?,
        };
        let state = TrainerState {
            step: 0,
            tokens_seen: 0,
            loader: loader.cursor(),
            tokenizer_sha256: identity.tokenizer_sha256,
        };
        Ok(Self {
            optimizer: AdamW::new(&config.train),
            metrics: MetricsWriter::create(&out_dir.join("metrics.jsonl"))?,
            config,
            device,
            model,
            loader,
            state,
            eval_sets,
            unigram,
            out_dir,
        })
    }

    fn run(&mut self) -> Result<RunSummary> {
        let train = self.config.train.clone();
        let progress = progress_bar(train.steps);
        let counts = dagmoe_model::ParamCounts::of(&self.config.model);
        tracing::info!(
            run_dir = %self.out_dir.display(),
            params = counts.total,
            active_params = counts.active_per_token,
            windows = self.loader.windows(),
            "training started"
        );

        let mut timed = Duration::ZERO;
        let mut timed_tokens = 0u64;
        let mut last_loss = f64::NAN;
        let mut last_checkpoint = None;
        while self.state.step < train.steps {
            let started = Instant::now();
            let result = self.step()?;
            let elapsed = started.elapsed();
            // The first step pays one-time allocation costs; leave it out of speed figures.
            if self.state.step > 1 {
                timed += elapsed;
                timed_tokens += result.tokens;
            }
            let tokens_per_second = if timed.is_zero() { 0.0 } else { timed_tokens as f64 / timed.as_secs_f64() };
            last_loss = result.loss;
            let step = self.state.step;

            progress.set_position(step);
            progress.set_message(format!("loss {:.4} | {:.0} tok/s", result.loss, tokens_per_second));
            if step % train.log_every == 0 || step == train.steps {
                self.log_step(&result, tokens_per_second, progress.is_hidden())?;
            }
            if train.eval_every > 0 && step % train.eval_every == 0 && step < train.steps {
                self.evaluate_all()?;
            }
            if train.checkpoint_every > 0 && step % train.checkpoint_every == 0 {
                last_checkpoint = Some((step, self.save()?));
            }
        }
        progress.finish_and_clear();

        let eval = self.evaluate_all()?;
        let checkpoint = match last_checkpoint {
            Some((step, dir)) if step == self.state.step => dir,
            _ => self.save()?,
        };
        let summary = RunSummary {
            run_dir: self.out_dir.clone(),
            checkpoint,
            steps: self.state.step,
            tokens_seen: self.state.tokens_seen,
            train_tokens_per_second: if timed.is_zero() { 0.0 } else { timed_tokens as f64 / timed.as_secs_f64() },
            final_loss: last_loss,
            params_total: counts.total,
            params_active_per_token: counts.active_per_token,
            eval,
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
        let step_tokens = (train.grad_accum * train.batch_size * self.config.data.seq_len) as f64;

        // Micro-batches: the LM loss is summed over tokens and divided by the
        // step's token count, so accumulation averages per token.
        let mut gradients: Vec<(String, burn::module::ParamId, burn::tensor::Tensor<1>)> = Vec::new();
        let (mut lm_loss, mut load_balance, mut z_loss) = (0.0, 0.0, 0.0);
        let mut tokens_per_expert: Vec<Vec<usize>> = Vec::new();
        for _ in 0..train.grad_accum {
            let batch = self.loader.next_batch();
            let (inputs, targets, _) = batch_tensors(&batch, &self.device);
            let output = self.model.forward(inputs);
            let lm = token_nll(output.logits_btv, targets).sum().div_scalar(step_tokens);
            let moe = &self.config.model.moe;
            let aux = (output.load_balance.clone().mul_scalar(moe.load_balance_coef)
                + output.z_loss.clone().mul_scalar(moe.z_loss_coef))
            .div_scalar(train.grad_accum as f64);
            let grads = (lm.clone() + aux).backward();

            lm_loss += lm.into_scalar::<f32>() as f64;
            load_balance += output.load_balance.into_scalar::<f32>() as f64 / train.grad_accum as f64;
            z_loss += output.z_loss.into_scalar::<f32>() as f64 / train.grad_accum as f64;
            accumulate_routing(&mut tokens_per_expert, output.routing.tokens_per_expert);
            let mut collector = GradientCollector::new(&grads);
            self.model.visit(&mut collector);
            if gradients.is_empty() {
                gradients = collector.gradients;
            } else {
                for (total, (_, _, grad)) in gradients.iter_mut().zip(collector.gradients) {
                    total.2 = total.2.clone() + grad;
                }
            }
        }
        let moe = &self.config.model.moe;
        let loss = lm_loss + moe.load_balance_coef * load_balance + moe.z_loss_coef * z_loss;

        // Global-norm clipping and the finite check, both before any weight changes.
        let values: Vec<_> = gradients.iter().map(|(_, _, g)| g.clone()).collect();
        let grad_norm = global_norm(&values);
        if !loss.is_finite() || !grad_norm.is_finite() {
            return Err(Error::Diverged(format!(
                "step {}: loss {loss} or gradient norm {grad_norm} is not finite; nothing was updated. Lower train.lr or raise train.warmup_steps, then restart from the last checkpoint in {}",
                self.state.step + 1,
                self.out_dir.join("checkpoints").display()
            )));
        }
        let scale = clip_scale(grad_norm, train.grad_clip);

        // AdamW update of every parameter that received a gradient.
        let mut by_name: std::collections::HashMap<String, burn::tensor::Tensor<1>> =
            gradients.into_iter().map(|(name, _, grad)| (name, grad)).collect();
        let optimizer = &mut self.optimizer;
        let mut updater = ParamUpdater::new(|name: &str, shape: &[usize], value| {
            let grad = by_name.remove(name)?;
            let grad = if scale < 1.0 { grad.mul_scalar(scale) } else { grad };
            Some(optimizer.update(name, shape.len(), value, grad, lr))
        });
        self.model = self.model.clone().map(&mut updater);
        self.optimizer.step += 1;

        let tokens = step_tokens as u64;
        self.state.step += 1;
        self.state.tokens_seen += tokens;
        self.state.loader = self.loader.cursor();
        Ok(StepResult { loss, lm_loss, load_balance, z_loss, grad_norm, lr, tokens, tokens_per_expert })
    }

    fn log_step(&mut self, result: &StepResult, tokens_per_second: f64, plain: bool) -> Result<()> {
        let moe = &self.config.model.moe;
        let metrics = StepMetrics::new(
            self.state.step,
            self.state.tokens_seen,
            result.loss,
            result.lm_loss,
            result.load_balance,
            result.z_loss,
            moe.load_balance_coef,
            moe.z_loss_coef,
            result.lr,
            result.grad_norm,
            tokens_per_second,
            &result.tokens_per_expert,
        );
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

    fn evaluate_all(&mut self) -> Result<Vec<EvalResult>> {
        let model = self.model.valid();
        let device = self.device.clone().inner();
        let max_tokens = (self.config.data.eval_tokens > 0).then_some(self.config.data.eval_tokens);
        let mut results = Vec::new();
        for set in &self.eval_sets {
            let result = evaluate(
                &model,
                set,
                self.config.data.seq_len,
                self.config.train.eval_batch_size,
                max_tokens,
                Some(&self.unigram),
                &device,
            );
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
        Ok(results)
    }

    fn save(&self) -> Result<PathBuf> {
        let dir = save_checkpoint(&self.out_dir, &self.model, &self.optimizer, &self.state, &self.config)?;
        tracing::info!(checkpoint = %dir.display(), "checkpoint saved");
        Ok(dir)
    }
}

fn accumulate_routing(total: &mut Vec<Vec<usize>>, step: Vec<Vec<usize>>) {
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

fn progress_bar(steps: u64) -> ProgressBar {
    let bar = ProgressBar::new(steps);
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
