//! A run that is killed, interrupted or refused a checkpoint write loses no
//! work: resuming it reproduces the uninterrupted run's losses bit for bit.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use burn::tensor::Tolerance;
use common::{Fixture, ROOT, logged_steps, repo_path};
use dagmoe::commands;
use dagmoe_data::PrepareOptions;
use dagmoe::checkpoint::{Checkpoint, CheckpointWriter, TrainerState, latest_checkpoint, list_checkpoints, save_checkpoint};
use dagmoe::optim::AdamW;
use dagmoe::train::step_gradients;
use dagmoe::{Error, Start, train};
use dagmoe_data::TrainLoader;
use dagmoe_model::DagMoeModel;

/// Settings that make a tiny run take long enough to be killed mid-way and
/// deterministic across processes (one thread).
const RUN_SETTINGS: &[&str] = &[
    "train.steps=24",
    "train.warmup_steps=3",
    "train.log_every=1",
    "train.checkpoint_every=5",
    "train.keep_last=2",
    "train.threads=1",
    "data.seq_len=64",
    "train.batch_size=8",
];

fn pretrain_command(fixture: &Fixture, config: &str, run: &str, resume: bool) -> Command {
    let config_path = Path::new(ROOT).join(format!("configs/{config}.toml"));
    pretrain_command_with(&config_path, fixture.overrides(run, RUN_SETTINGS), resume)
}

fn pretrain_command_with(config: &Path, overrides: Vec<String>, resume: bool) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dagmoe"));
    command.current_dir(ROOT).args(["pretrain", "--config"]).arg(config);
    for assignment in overrides {
        command.args(["--set", &assignment]);
    }
    if resume {
        command.arg("--resume");
    }
    command.stdout(Stdio::null()).stderr(Stdio::piped());
    command
}

/// Waits until the run has logged `step`, or until the process exits.
fn wait_for_step(child: &mut Child, run_dir: &Path, step: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        let logged = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap_or_default();
        if logged.lines().filter(|line| line.contains("\"lm_loss\"")).count() as u64 >= step {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("the run did not reach step {step} in time");
}

fn signal(child: &Child, signal: i32) {
    // SAFETY: kill(2) on a child process id this test owns.
    let status = unsafe { libc::kill(child.id() as i32, signal) };
    assert_eq!(status, 0, "kill failed");
}

#[test]
fn sigkill_then_resume_matches_uninterrupted_run() {
    let fixture = Fixture::new();
    for config in ["tiny-moe", "tiny-dagmoe"] {
        let reference_run = format!("reference-{config}");
        let status = pretrain_command(&fixture, config, &reference_run, false).status().unwrap();
        assert!(status.success(), "{config}: reference run failed");
        let reference = logged_steps(&fixture.path(&reference_run));
        assert_eq!(reference.len(), 24);

        let run = format!("killed-{config}");
        let run_dir = fixture.path(&run);
        let mut kills = 0;
        for (attempt, kill_at) in [7u64, 13, 19].into_iter().enumerate() {
            let mut child = pretrain_command(&fixture, config, &run, attempt > 0).spawn().unwrap();
            wait_for_step(&mut child, &run_dir, kill_at);
            if child.try_wait().unwrap().is_none() {
                signal(&child, libc::SIGKILL);
                kills += 1;
            }
            child.wait().unwrap();
            if run_dir.join("run.json").exists() {
                break;
            }
        }
        assert!(kills >= 2, "{config}: only {kills} kills landed before the run finished");
        if !run_dir.join("run.json").exists() {
            let output = pretrain_command(&fixture, config, &run, true).output().unwrap();
            assert!(output.status.success(), "{config}: {}", String::from_utf8_lossy(&output.stderr));
        }

        let resumed = logged_steps(&run_dir);
        assert_eq!(resumed.len(), reference.len(), "{config}: one record per step after trimming");
        for ((step, loss), (reference_step, reference_loss)) in resumed.iter().zip(&reference) {
            assert_eq!(step, reference_step);
            assert_eq!(loss.to_bits(), reference_loss.to_bits(), "{config}: loss at step {step}");
        }
        eprintln!("{config}: {kills} SIGKILLs, resumed losses of all {} steps bit-identical", resumed.len());
    }
}

#[test]
fn sigint_saves_checkpoint_and_resume_completes() {
    let fixture = Fixture::new();
    let status = pretrain_command(&fixture, "tiny-dagmoe", "reference", false).status().unwrap();
    assert!(status.success());
    let reference = logged_steps(&fixture.path("reference"));

    let run_dir = fixture.path("interrupted");
    let mut child = pretrain_command(&fixture, "tiny-dagmoe", "interrupted", false).spawn().unwrap();
    wait_for_step(&mut child, &run_dir, 7);
    signal(&child, libc::SIGINT);
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("--resume"), "{stderr}");
    let checkpoint = latest_checkpoint(&run_dir).unwrap().expect("a checkpoint was saved");
    let state = Checkpoint::open(&checkpoint).unwrap().state;
    assert!(state.step >= 7, "interrupted at step {}", state.step);
    assert!(state.step < 24, "interrupted at step {}", state.step);
    assert_eq!(logged_steps(&run_dir).last().unwrap().0, state.step, "the interrupted step is the last logged");

    let output = pretrain_command(&fixture, "tiny-dagmoe", "interrupted", true).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let resumed = logged_steps(&run_dir);
    assert_eq!(resumed.iter().map(|(_, loss)| loss.to_bits()).collect::<Vec<_>>(), reference.iter().map(|(_, loss)| loss.to_bits()).collect::<Vec<_>>());
}

#[test]
fn mixture_run_resumes_exactly() {
    let fixture = Fixture::new();
    // A second corpus from the same documents with another split, so its token stream differs.
    let sources = repo_path("data/fixtures/kernel-docs-sample/sources");
    let second = PrepareOptions { valid_fraction: 0.3, ..PrepareOptions::new(vec![sources], fixture.path("prepared-b")) };
    commands::prepare(&fixture.path("tokenizer.json"), &second).unwrap();
    let base = std::fs::read_to_string(repo_path("configs/tiny-moe.toml")).unwrap();
    let without_train: String = base.lines().filter(|l| !l.starts_with("train = ")).map(|l| format!("{l}\n")).collect();
    let config = fixture.path("mixture.toml");
    std::fs::write(&config, without_train).unwrap();
    let overrides = |run: &str| {
        let mut overrides = fixture.overrides(run, RUN_SETTINGS);
        overrides.retain(|o| !o.starts_with("data.train="));
        overrides.push(format!(
            "data.mixture={{ a = {{ path = {:?}, weight = 2.0 }}, b = {{ path = {:?}, weight = 1.0 }} }}",
            fixture.path("prepared"),
            fixture.path("prepared-b")
        ));
        overrides
    };

    let status = pretrain_command_with(&config, overrides("reference"), false).status().unwrap();
    assert!(status.success(), "reference mixture run failed");
    let reference = logged_steps(&fixture.path("reference"));
    assert_eq!(reference.len(), 24);

    let run_dir = fixture.path("interrupted");
    let mut child = pretrain_command_with(&config, overrides("interrupted"), false).spawn().unwrap();
    wait_for_step(&mut child, &run_dir, 9);
    signal(&child, libc::SIGINT);
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130), "{}", String::from_utf8_lossy(&output.stderr));
    let output = pretrain_command_with(&config, overrides("interrupted"), true).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let resumed = logged_steps(&run_dir);
    assert_eq!(resumed.len(), reference.len());
    for ((step, loss), (_, reference_loss)) in resumed.iter().zip(&reference) {
        assert_eq!(loss.to_bits(), reference_loss.to_bits(), "mixture loss at step {step}");
    }

    // The checkpoint's cursor is for two corpora; a single-corpus run cannot resume from it.
    let output = pretrain_command(&fixture, "tiny-moe", "interrupted", true).args(["--set", "train.steps=30"]).output().unwrap();
    assert!(!output.status.success(), "a single-corpus resume of a mixture run must fail");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("the training data (data.train, data.mixture or data.sft"), "{stderr}");
}

#[test]
fn interrupted_save_leaves_previous_checkpoint() {
    let fixture = Fixture::new();
    let summary = train(fixture.config("tiny-moe", "run", &["train.steps=10", "train.checkpoint_every=5"]), Start::Scratch).unwrap();
    let root = summary.run_dir.join("checkpoints");
    // A kill during the save of step 15 leaves a partial directory; a copy
    // interrupted midway leaves a step directory without the COMPLETE marker.
    std::fs::create_dir_all(root.join(".step-00000015.partial")).unwrap();
    std::fs::write(root.join(".step-00000015.partial/model.safetensors"), b"truncated").unwrap();
    std::fs::create_dir_all(root.join("step-00000020")).unwrap();
    std::fs::write(root.join("step-00000020/model.safetensors"), b"truncated").unwrap();

    assert_eq!(latest_checkpoint(&summary.run_dir).unwrap().unwrap(), root.join("step-00000010"));
    let config = fixture.config("tiny-moe", "run", &["train.steps=12", "train.checkpoint_every=5"]);
    let resumed = train(config, Start::Resume { allow_config_change: true }).unwrap();
    assert_eq!(resumed.steps, 12);
    assert_eq!(Checkpoint::open(&resumed.checkpoint).unwrap().state.step, 12);
}

#[test]
fn full_disk_keeps_previous_checkpoint() {
    let fixture = Fixture::new();
    let summary = train(fixture.config("tiny-dagmoe", "run", &["train.steps=10", "train.checkpoint_every=10"]), Start::Scratch).unwrap();
    let previous = Checkpoint::open(&summary.checkpoint).unwrap();
    let device = dagmoe_model::parse_device("cpu").unwrap().autodiff();
    let model = previous.load_model(&device).unwrap();
    let mut optimizer = AdamW::new(&previous.config.train);
    previous.load_optimizer(&mut optimizer, &device).unwrap();
    let state = TrainerState { step: 11, ..previous.state.clone() };

    let writer = CheckpointWriter::with_byte_limit(10_000);
    let error = save_checkpoint(&summary.run_dir, &model, &optimizer, &state, &previous.config, &writer).unwrap_err();
    let message = error.to_string();
    assert!(message.contains("step-00000011"), "{message}");
    assert!(message.contains("needs"), "{message}");
    assert!(message.contains("MB"), "{message}");
    assert!(message.contains("free"), "{message}");
    assert!(message.contains("No space left on device"), "{message}");

    let checkpoints = list_checkpoints(&summary.run_dir).unwrap();
    assert_eq!(checkpoints, vec![summary.checkpoint.clone()]);
    let leftovers: Vec<_> = std::fs::read_dir(summary.run_dir.join("checkpoints")).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no partial directory remains");
    Checkpoint::open(&summary.checkpoint).unwrap().load_model(&device).unwrap();
}

#[test]
fn resume_rejects_changed_config_unless_allowed() {
    let fixture = Fixture::new();
    train(fixture.config("tiny-moe", "run", &["train.steps=10", "train.checkpoint_every=5"]), Start::Scratch).unwrap();
    let changed = fixture.config("tiny-moe", "run", &["train.steps=12", "train.lr=0.01", "train.log_every=2"]);
    let error = train(changed.clone(), Start::Resume { allow_config_change: false }).unwrap_err();
    let message = error.to_string();
    assert_eq!(error.exit_code(), 2);
    assert!(message.contains("train.lr"), "{message}");
    assert!(message.contains("train.steps"), "{message}");
    assert!(!message.contains("train.log_every"), "{message}");
    assert!(message.contains("--allow-config-change"), "{message}");
    train(changed, Start::Resume { allow_config_change: true }).unwrap();
}

#[test]
fn resume_without_checkpoint_is_rejected() {
    let fixture = Fixture::new();
    let error = train(fixture.config("tiny-moe", "fresh", &[]), Start::Resume { allow_config_change: false }).unwrap_err();
    assert!(matches!(error, Error::Usage(_)), "{error}");
    assert!(error.to_string().contains("without --resume"), "{error}");
}

#[test]
fn accumulation_averages_per_token() {
    let fixture = Fixture::new();
    // Without the load-balancing loss, whose f_j P_j product is per micro-batch,
    // the whole step's loss is a per-token mean however it is split.
    let config = fixture.config("tiny-dagmoe", "unused", &["model.moe.load_balance_coef=0"]);
    let device = dagmoe_model::parse_device("cpu").unwrap().autodiff();
    device.seed(3);
    let model = DagMoeModel::new(&config.model, config.data.seq_len, &device).unwrap();
    let train_dir = config.data.train.clone().unwrap();
    let manifest = dagmoe_data::Manifest::load(&train_dir).unwrap();
    let stream = || dagmoe_data::TokenStream::open(&train_dir, &manifest, dagmoe_data::manifest::Split::Train).unwrap();

    let mut whole = TrainLoader::new(stream(), config.data.seq_len, 4, 9).unwrap();
    let mut halves = TrainLoader::new(stream(), config.data.seq_len, 2, 9).unwrap();
    let one_batch = step_gradients(&model, &config, &[whole.next_batch()], &device);
    let two_batches = step_gradients(&model, &config, &[halves.next_batch(), halves.next_batch()], &device);

    assert!((one_batch.lm_loss - two_batches.lm_loss).abs() < 1e-5, "{} vs {}", one_batch.lm_loss, two_batches.lm_loss);
    assert_eq!(one_batch.gradients.len(), two_batches.gradients.len());
    let tolerance = Tolerance::<f32>::absolute(1e-6).set_relative(1e-3);
    for ((name, a), (other_name, b)) in one_batch.gradients.iter().zip(&two_batches.gradients) {
        assert_eq!(name, other_name);
        a.clone().into_data().assert_approx_eq::<f32>(&b.clone().into_data(), tolerance);
    }
}

#[test]
fn non_finite_loss_stops_or_is_skipped() {
    let fixture = Fixture::new();
    let exploding = ["train.lr=1e30", "train.grad_clip=0", "train.steps=8", "train.warmup_steps=1"];
    let error = train(fixture.config("tiny-moe", "stopped", &exploding), Start::Scratch).unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, Error::Diverged(_)), "{message}");
    assert!(message.contains("not finite"), "{message}");
    assert!(message.contains("step "), "{message}");

    let mut skipping = exploding.to_vec();
    skipping.push("train.max_skipped_steps=100");
    let summary = train(fixture.config("tiny-moe", "skipped", &skipping), Start::Scratch).unwrap();
    assert!(summary.skipped_steps > 0, "no step was skipped");
    let metrics = std::fs::read_to_string(summary.run_dir.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"skipped\":true"));
}

#[test]
fn pruning_keeps_last_and_milestones() {
    let fixture = Fixture::new();
    let settings = ["train.steps=10", "train.checkpoint_every=2", "train.keep_last=1", "train.keep_every=4"];
    let summary = train(fixture.config("tiny-moe", "run", &settings), Start::Scratch).unwrap();
    let steps: Vec<u64> = list_checkpoints(&summary.run_dir)
        .unwrap()
        .iter()
        .map(|dir| dagmoe::checkpoint::checkpoint_step(dir).unwrap())
        .collect();
    assert_eq!(steps, vec![4, 8, 10]);
}
