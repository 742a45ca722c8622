//! End-to-end tests on the committed real-text fixture: tokenizer training,
//! shard preparation, pretraining, checkpoints read back, evaluation,
//! fine-tuning, and rejection of bad input.

mod common;

use std::process::Command;

use common::{Fixture, ROOT, logged_losses, repo_path};
use dagmoe::checkpoint::{Checkpoint, list_checkpoints};
use dagmoe::commands::{self, EvalOptions};
use dagmoe::{Error, Start, load_config, train};
use dagmoe_data::PrepareOptions;
use dagmoe_model::Precision;

#[test]
fn prepare_splits_documents_and_counts_tokens() {
    let fixture = Fixture::new();
    let manifest = dagmoe_data::Manifest::load(&fixture.path("prepared")).unwrap();
    assert_eq!(manifest.train.documents + manifest.valid.documents, 28);
    assert!(manifest.valid.documents > 0);
    assert!(manifest.train.shards.len() >= 2, "40k-token shards split the training split");
    assert_eq!(manifest.train.shards.iter().map(|s| s.tokens).sum::<u64>(), manifest.train.tokens);
    assert_eq!(manifest.vocab_size, 512);
}

#[test]
fn pretrain_both_aggregations_reduce_loss() {
    let fixture = Fixture::new();
    for name in ["tiny-moe", "tiny-dagmoe"] {
        let config = fixture.config(name, name, &["train.steps=30", "train.log_every=1"]);
        let summary = train(config, Start::Scratch).unwrap();
        let losses = logged_losses(&summary.run_dir);
        assert_eq!(losses.len(), 30, "{name}: one metrics line per step");
        let first: f64 = losses[..3].iter().sum::<f64>() / 3.0;
        let last: f64 = losses[27..].iter().sum::<f64>() / 3.0;
        assert!(last < first - 0.2, "{name}: loss went from {first} to {last}");
        assert!(summary.eval[0].perplexity.is_finite());
    }
}

#[test]
fn bf16_training_tracks_float32() {
    let fixture = Fixture::new();
    let mut runs = Vec::new();
    for precision in ["f32", "bf16"] {
        let overrides = [&format!("train.precision={precision:?}") as &str, "train.steps=30", "train.log_every=1"];
        let summary = train(fixture.config("tiny-dagmoe", precision, &overrides), Start::Scratch).unwrap();
        runs.push((logged_losses(&summary.run_dir), summary));
    }
    let (f32_losses, _) = &runs[0];
    let (bf16_losses, bf16_run) = &runs[1];
    let mean = |losses: &[f64]| losses.iter().sum::<f64>() / losses.len() as f64;
    let (f32_last, bf16_last) = (mean(&f32_losses[27..]), mean(&bf16_losses[27..]));
    assert!(bf16_last < mean(&bf16_losses[..3]) - 0.2, "bf16 loss went from {} to {bf16_last}", mean(&bf16_losses[..3]));
    assert!((bf16_last - f32_last).abs() < 0.03 * f32_last, "after 30 steps bf16 loss {bf16_last}, f32 loss {f32_last}");
    assert_ne!(bf16_losses, f32_losses, "train.precision changed nothing");

    // The checkpoint evaluates at its training precision unless --precision overrides it.
    let options = |precision| EvalOptions {
        checkpoint: bf16_run.checkpoint.clone(),
        sets: Vec::new(),
        eval_tokens: None,
        device: None,
        precision,
        stride: None,
        batch_size: None,
        tasks: Vec::new(),
    };
    let during = &bf16_run.eval[0];
    let same = &commands::run_eval(&options(None)).unwrap().results[0];
    assert!((same.nll - during.nll).abs() < 1e-4 * during.nll, "{} vs {}", same.nll, during.nll);
    let in_f32 = &commands::run_eval(&options(Some(Precision::F32))).unwrap().results[0];
    assert_ne!(in_f32.nll, during.nll);
    assert!((in_f32.nll - during.nll).abs() < 0.01 * during.nll, "f32 {} vs bf16 {}", in_f32.nll, during.nll);
}

#[test]
fn checkpoint_reloads_to_the_same_perplexity() {
    let fixture = Fixture::new();
    let config = fixture.config("tiny-dagmoe", "run", &[]);
    let summary = train(config, Start::Scratch).unwrap();

    assert_eq!(list_checkpoints(&summary.run_dir).unwrap().len(), 2, "keep_last = 2 of the saves at 10 and 20");
    for file in ["model.safetensors", "optimizer.safetensors", "trainer.json", "config.toml", "COMPLETE"] {
        assert!(summary.checkpoint.join(file).exists(), "{file} missing");
    }
    let checkpoint = Checkpoint::open(&summary.checkpoint).unwrap();
    assert_eq!(checkpoint.state.step, 20);
    assert_eq!(checkpoint.state.tokens_seen, 20 * 4 * 32);

    let report = commands::run_eval(&EvalOptions {
        checkpoint: summary.checkpoint.clone(),
        sets: Vec::new(),
        eval_tokens: None,
        device: None,
        precision: None,
        stride: None,
        batch_size: None,
        tasks: Vec::new(),
    })
    .unwrap();
    let during = &summary.eval[0];
    let after = &report.results[0];
    assert_eq!(during.tokens, after.tokens);
    assert!((during.nll - after.nll).abs() < 1e-3 * during.nll.abs(), "{} vs {}", during.nll, after.nll);
    assert!(after.unigram_perplexity.is_some());
}

#[test]
fn eval_on_flex_matches_libtorch() {
    let fixture = Fixture::new();
    let summary = train(fixture.config("tiny-moe", "run", &["train.steps=5"]), Start::Scratch).unwrap();
    let eval = |device: &str| {
        let options = EvalOptions {
            checkpoint: summary.checkpoint.clone(),
            sets: Vec::new(),
            eval_tokens: Some(512),
            device: Some(device.into()),
            precision: None,
            stride: None,
            batch_size: None,
            tasks: Vec::new(),
        };
        commands::run_eval(&options).unwrap().results[0].nll
    };
    let (libtorch, flex) = (eval("cpu"), eval("flex"));
    assert!((libtorch - flex).abs() < 1e-3 * libtorch, "libtorch {libtorch} vs flex {flex}");
}

#[test]
fn finetune_continues_from_checkpoint() {
    let fixture = Fixture::new();
    let summary = train(fixture.config("tiny-dagmoe", "base", &[]), Start::Scratch).unwrap();
    let finetune_file = fixture.path("finetune.toml");
    let base = std::fs::read_to_string(repo_path("configs/tiny-dagmoe.toml")).unwrap();
    let without_model = base.split("[data]").nth(1).unwrap();
    std::fs::write(&finetune_file, format!("[data]{without_model}")).unwrap();

    let overrides = fixture.overrides("finetuned", &["train.steps=6"]);
    let config = commands::finetune_config(&summary.checkpoint, &finetune_file, &overrides).unwrap();
    let start_loss = {
        let tuned = train(config, Start::Weights(summary.checkpoint.clone())).unwrap();
        logged_losses(&tuned.run_dir)[0]
    };
    let scratch_loss = logged_losses(&summary.run_dir)[0];
    assert!(start_loss < scratch_loss - 0.1, "fine-tuning starts from trained weights: {start_loss} vs {scratch_loss}");

    // A [model] section that disagrees with the checkpoint is rejected with the key.
    std::fs::write(&finetune_file, base.replace("d_g = 8", "d_g = 16")).unwrap();
    let error = commands::finetune_config(&summary.checkpoint, &finetune_file, &overrides).unwrap_err();
    assert!(error.to_string().contains("model.dag.d_g"), "{error}");
}

#[test]
fn vocab_mismatch_with_manifest_is_rejected() {
    let fixture = Fixture::new();
    let other = fixture.path("tokenizer-600.json");
    commands::train_tokenizer(&[repo_path("data/fixtures/kernel-docs-sample/sources")], &Default::default(), 600, &[], &other).unwrap();
    let mut overrides = fixture.overrides("run", &["model.vocab_size=600"]);
    overrides.push(format!("data.tokenizer={other:?}"));
    let config = load_config(&repo_path("configs/tiny-dagmoe.toml"), &overrides).unwrap();
    let error = train(config, Start::Scratch).unwrap_err();
    assert_eq!(error.exit_code(), 2);
    assert!(error.to_string().contains("vocab size mismatch"), "{error}");
    assert!(!fixture.path("run").join("metrics.jsonl").exists(), "nothing written for a rejected run");
}

#[test]
fn existing_run_directory_is_not_overwritten() {
    let fixture = Fixture::new();
    train(fixture.config("tiny-moe", "run", &["train.steps=5"]), Start::Scratch).unwrap();
    let metrics = std::fs::read(fixture.path("run/metrics.jsonl")).unwrap();
    let error = train(fixture.config("tiny-moe", "run", &["train.steps=5"]), Start::Scratch).unwrap_err();
    assert!(matches!(error, Error::Usage(_)), "{error}");
    assert_eq!(std::fs::read(fixture.path("run/metrics.jsonl")).unwrap(), metrics);
}

#[test]
fn prepare_rejects_missing_corpus_and_existing_output() {
    let fixture = Fixture::new();
    let mut options = PrepareOptions {
        valid_fraction: 0.1,
        shard_tokens: 4096,
        batch_documents: 8,
        ..PrepareOptions::new(vec![fixture.path("no-such-corpus")], fixture.path("out"))
    };
    let error = commands::prepare(&fixture.path("tokenizer.json"), &options).unwrap_err();
    assert!(format!("{error}").contains("no-such-corpus"), "{error}");
    assert!(!fixture.path("out").exists(), "a failed prepare leaves no output");
    options.inputs = vec![repo_path("data/fixtures/kernel-docs-sample/sources")];
    options.output = fixture.path("prepared");
    let before = std::fs::read(fixture.path("prepared/manifest.json")).unwrap();
    let error = commands::prepare(&fixture.path("tokenizer.json"), &options).unwrap_err();
    assert!(format!("{error}").contains("already exists"), "{error}");
    assert_eq!(std::fs::read(fixture.path("prepared/manifest.json")).unwrap(), before);
}

#[test]
fn corrupted_shard_is_rejected() {
    let fixture = Fixture::new();
    let shard = fixture.path("prepared/train-00000.bin");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&shard, bytes).unwrap();
    let error = train(fixture.config("tiny-moe", "run", &[]), Start::Scratch).unwrap_err();
    assert!(format!("{error}").contains("SHA-256"), "{error}");
}

/// Runs the `dagmoe` binary and returns (exit code, stderr).
fn run_cli(args: &[&str]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_dagmoe")).args(args).current_dir(ROOT).output().unwrap();
    (output.status.code().unwrap(), String::from_utf8(output.stderr).unwrap())
}

#[test]
fn cli_reports_bad_input_in_one_line() {
    let cases: &[&[&str]] = &[
        &["pretrain", "--config", "configs/tiny-dagmoe.toml", "--set", "model.moe.top_k=5"],
        &["pretrain", "--config", "configs/tiny-dagmoe.toml", "--set", "train.nonsense=1"],
        &["pretrain", "--config", "configs/no-such-file.toml"],
        &["eval", "--checkpoint", "runs/no-such-checkpoint"],
        &["params", "--config", "configs/tiny-dagmoe.toml", "--set", "model.moe.aggregation=\"mean\""],
        &["pretrain"],
        &["data", "tokenizer", "--vocab-size", "-5", "--input", "x", "--output", "y"],
        &["data", "prepare", "--input", "no-such-dir", "--tokenizer", "t.json", "--output", "o"],
        &["data", "prepare", "--input", "a.txt", "b.txt", "--tokenizer", "t.json", "--output", "o"],
    ];
    for args in cases {
        let (code, stderr) = run_cli(args);
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
        assert!(lines[0].starts_with("dagmoe: "), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(code, 2, "{args:?}: {stderr}");
    }
    let (_, stderr) = run_cli(&["data", "prepare", "--input", "a.txt", "b.txt", "--tokenizer", "t.json", "--output", "o"]);
    assert!(stderr.contains("quote a glob pattern"), "{stderr}");
}

#[test]
fn cli_params_prints_counts() {
    let output = Command::new(env!("CARGO_BIN_EXE_dagmoe"))
        .args(["params", "--config", "configs/small-dagmoe.toml"])
        .current_dir(ROOT)
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success());
    assert!(stdout.contains("total"), "{stdout}");
    assert!(stdout.contains("dag"), "{stdout}");
}

#[test]
fn uniform_model_perplexity_equals_vocab_size() {
    use burn::module::Module;
    use dagmoe::eval::{DataIdentity, EvalWindow, evaluate, open_eval_set};
    use dagmoe::params::ParamUpdater;

    let fixture = Fixture::new();
    let summary = train(fixture.config("tiny-dagmoe", "run", &["train.steps=5"]), Start::Scratch).unwrap();
    let checkpoint = Checkpoint::open(&summary.checkpoint).unwrap();
    let device = dagmoe_model::parse_device("cpu").unwrap().autodiff();
    // Zero weights give zero logits: a uniform distribution, whose perplexity is the vocabulary size.
    let mut zero = ParamUpdater::new(|_: &str, _: &[usize], value: burn::tensor::Tensor<1>| Some(value.zeros_like()));
    let model = checkpoint.load_model(&device).unwrap().map(&mut zero).valid();
    let identity = DataIdentity { vocab_size: 512, tokenizer_sha256: checkpoint.state.tokenizer_sha256.clone() };
    let set = open_eval_set("fixture", &fixture.path("prepared"), &identity).unwrap();
    let window = EvalWindow { seq_len: 32, stride: 32, batch_size: 5, max_tokens: None };
    let result = evaluate(&model, &set, &window, None, &device.inner());
    assert!((result.perplexity - 512.0).abs() < 1e-2, "perplexity {}", result.perplexity);
    assert_eq!(result.tokens, set.stream.len() - 1);
}

#[test]
fn eval_is_invariant_to_batching() {
    let fixture = Fixture::new();
    let summary = train(fixture.config("tiny-moe", "run", &["train.steps=5"]), Start::Scratch).unwrap();
    let eval = |batch_size: usize, stride: Option<usize>| {
        let options = EvalOptions {
            checkpoint: summary.checkpoint.clone(),
            sets: Vec::new(),
            eval_tokens: Some(1000),
            device: None,
            precision: None,
            stride,
            batch_size: Some(batch_size),
            tasks: Vec::new(),
        };
        commands::run_eval(&options).unwrap().results.remove(0)
    };
    let reference = eval(8, None);
    assert_eq!(reference.tokens, 1000);
    for batch_size in [1, 3, 7, 40] {
        let result = eval(batch_size, None);
        assert_eq!(result.tokens, reference.tokens, "batch size {batch_size}");
        assert!((result.nll - reference.nll).abs() < 1e-4 * reference.nll, "batch size {batch_size}: {} vs {}", result.nll, reference.nll);
    }
    let sliding = eval(4, Some(8));
    assert_eq!(sliding.tokens, reference.tokens, "a sliding evaluation scores each token once");
}

#[test]
fn generate_is_seeded_and_stops() {
    let fixture = Fixture::new();
    let summary = train(fixture.config("tiny-dagmoe", "run", &["train.steps=5"]), Start::Scratch).unwrap();
    let options = dagmoe::generate::SamplingOptions { max_tokens: 12, temperature: 0.8, top_k: 20, top_p: 0.9, seed: 4 };
    let first = commands::run_generate(&summary.checkpoint, "The kernel", &options, None).unwrap();
    let again = commands::run_generate(&summary.checkpoint, "The kernel", &options, None).unwrap();
    assert_eq!(first, again, "the same seed gives the same text");
    assert!(!first.is_empty());
    let bad = dagmoe::generate::SamplingOptions { top_p: 0.0, ..options };
    assert!(commands::run_generate(&summary.checkpoint, "x", &bad, None).is_err());
}

#[test]
fn cloze_task_is_seeded_and_scored() {
    use dagmoe::cloze::{ClozeOptions, make_cloze};

    let fixture = Fixture::new();
    let sources = repo_path("data/fixtures/kernel-docs-sample/sources");
    let options = ClozeOptions { items: 30, choices: 4, seed: 5, valid_fraction: 0.3 };
    let items = make_cloze(&sources, &options).unwrap();
    assert_eq!(items, make_cloze(&sources, &options).unwrap(), "the same seed builds the same task");
    assert!(items.len() >= 20, "{} items", items.len());
    for item in &items {
        assert_eq!(item.choices.len(), 4);
        assert!(item.answer < 4);
    }
    let task_file = fixture.path("cloze.jsonl");
    let lines: String = items.iter().map(|item| serde_json::to_string(item).unwrap() + "\n").collect();
    std::fs::write(&task_file, lines).unwrap();

    let summary = train(fixture.config("tiny-dagmoe", "base", &[]), Start::Scratch).unwrap();
    let options = EvalOptions {
        checkpoint: summary.checkpoint.clone(),
        sets: Vec::new(),
        eval_tokens: None,
        device: None,
        precision: None,
        stride: None,
        batch_size: None,
        tasks: vec![("cloze".into(), task_file.clone())],
    };
    let report = commands::run_eval(&options).unwrap();
    assert_eq!(report.tasks.len(), 1);
    let task = &report.tasks[0];
    assert_eq!(task.items, items.len());
    assert!((0.0..=1.0).contains(&task.accuracy));

    // Fine-tuning with the task reports it before and after.
    let finetune_file = fixture.path("finetune.toml");
    let base = std::fs::read_to_string(repo_path("configs/tiny-dagmoe.toml")).unwrap();
    std::fs::write(&finetune_file, format!("[data]{}", base.split("[data]").nth(1).unwrap())).unwrap();
    let mut overrides = fixture.overrides("tuned", &["train.steps=5"]);
    overrides.push(format!("data.tasks={{ cloze = {task_file:?} }}"));
    let config = commands::finetune_config(&summary.checkpoint, &finetune_file, &overrides).unwrap();
    let tuned = train(config, Start::Weights(summary.checkpoint.clone())).unwrap();
    assert_eq!(tuned.tasks_before.as_ref().unwrap()[0].items, items.len());
    assert_eq!(tuned.tasks[0].items, items.len());
    assert_eq!(tuned.init_from.as_ref().unwrap(), &summary.checkpoint);
}

#[test]
fn task_file_errors_name_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("task.jsonl");
    std::fs::write(&path, "{\"context\": \"a\", \"choices\": [\"b\", \"c\"], \"answer\": 1}\n{\"context\": \"a\", \"choices\": [\"b\"], \"answer\": 0}\n").unwrap();
    let error = dagmoe::tasks::load_task(&path).unwrap_err().to_string();
    assert!(error.contains("task.jsonl:2"), "{error}");
}

#[test]
fn supervised_finetune_scores_responses() {
    let fixture = Fixture::new();
    let summary = train(fixture.config("tiny-dagmoe", "base", &[]), Start::Scratch).unwrap();
    // Real text pairs: each sentence of the fixture's first document asks for the next.
    let text = std::fs::read_to_string(repo_path("data/fixtures/kernel-docs-sample/sources/1.Intro.rst.txt")).unwrap();
    let sentences: Vec<&str> = text.split(". ").filter(|s| s.len() > 20).take(41).collect();
    let mut lines = String::new();
    for pair in sentences.windows(2) {
        lines.push_str(&serde_json::json!({"prompt": pair[0], "response": pair[1]}).to_string());
        lines.push('\n');
    }
    lines.push_str(&serde_json::json!({"messages": [
        {"role": "user", "content": sentences[0]},
        {"role": "assistant", "content": sentences[1]},
    ]}).to_string());
    lines.push('\n');
    let sft_file = fixture.path("sft.jsonl");
    std::fs::write(&sft_file, lines).unwrap();

    let finetune_file = fixture.path("finetune.toml");
    let base = std::fs::read_to_string(repo_path("configs/tiny-dagmoe.toml")).unwrap();
    std::fs::write(&finetune_file, format!("[data]{}", base.split("[data]").nth(1).unwrap())).unwrap();
    let mut overrides = fixture.overrides("sft", &["train.steps=12", "train.batch_size=4"]);
    overrides.retain(|o| !o.starts_with("data.train="));
    overrides.push(format!("data.sft={sft_file:?}"));
    overrides.push("data.train=\"\"".into());
    let error = commands::finetune_config(&summary.checkpoint, &finetune_file, &overrides).unwrap_err();
    assert!(error.to_string().contains("data.train and data.sft are set together"), "{error}");

    // The tiny config names data.train; an SFT run replaces it with data.sft.
    let without_train: String = base.lines().filter(|l| !l.starts_with("train = ")).map(|l| format!("{l}\n")).collect();
    std::fs::write(&finetune_file, format!("[data]{}", without_train.split("[data]").nth(1).unwrap())).unwrap();
    overrides.pop();
    let config = commands::finetune_config(&summary.checkpoint, &finetune_file, &overrides).unwrap();
    let tuned = train(config, Start::Weights(summary.checkpoint.clone())).unwrap();
    let losses = logged_losses(&tuned.run_dir);
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(losses[losses.len() - 1] < losses[0], "SFT loss {losses:?}");
}
