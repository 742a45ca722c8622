//! The `dagmoe` command line: parses arguments and dispatches to the library.
//!
//! Exit codes: 0 success, 2 usage or config error, 130 interrupted by
//! SIGINT or SIGTERM after saving a checkpoint, 1 any other failure.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dagmoe::commands::{self, EvalOptions};
use dagmoe::eval::format_table;
use dagmoe::train::install_interrupt_handler;
use dagmoe::{Error, Result, Start};
use dagmoe_data::PrepareOptions;

#[derive(Parser)]
#[command(name = "dagmoe", version, about = "Pretrain, fine-tune and evaluate Mixture-of-Experts language models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model from scratch as a config file describes.
    Pretrain {
        /// Run configuration (TOML with [model], [data] and [train]).
        #[arg(long)]
        config: PathBuf,
        /// Override a config value, for example --set train.lr=1e-3 (repeatable).
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        overrides: Vec<String>,
        /// Continue from the newest complete checkpoint in train.out_dir.
        #[arg(long)]
        resume: bool,
        /// With --resume, accept a config that differs from the checkpoint's in keys that change the result.
        #[arg(long, requires = "resume")]
        allow_config_change: bool,
    },
    /// Continue training a checkpoint's weights on another corpus.
    Finetune {
        /// Checkpoint directory to start from.
        #[arg(long)]
        from: PathBuf,
        /// Config with [data] and [train]; [model] is taken from the checkpoint.
        #[arg(long)]
        config: PathBuf,
        /// Override a config value, for example --set train.lr=1e-4 (repeatable).
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        overrides: Vec<String>,
        /// Continue from the newest complete checkpoint in train.out_dir.
        #[arg(long)]
        resume: bool,
        /// With --resume, accept a config that differs from the checkpoint's in keys that change the result.
        #[arg(long, requires = "resume")]
        allow_config_change: bool,
    },
    /// Report token-weighted perplexity of a checkpoint on held-out sets.
    Eval {
        /// Checkpoint directory.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Evaluation set as NAME=PREPARED_DIR (repeatable); defaults to the checkpoint's data.valid.
        #[arg(long = "data", value_name = "NAME=DIR")]
        sets: Vec<String>,
        /// Maximum tokens scored per set; 0 scores the whole validation split.
        #[arg(long)]
        eval_tokens: Option<u64>,
        /// Device to evaluate on; defaults to the checkpoint's train.device.
        #[arg(long)]
        device: Option<String>,
        /// JSON report path; defaults to <checkpoint>/eval.json.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Print parameter counts of a config.
    Params {
        /// Run configuration whose [model] is counted.
        #[arg(long)]
        config: PathBuf,
        /// Override a config value, for example --set model.dag.depth=1 (repeatable).
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Tokenizers and prepared data.
    #[command(subcommand)]
    Data(DataCommand),
}

#[derive(Subcommand)]
enum DataCommand {
    /// Train a byte-level BPE tokenizer, or import an existing tokenizer.json.
    Tokenizer {
        /// Corpus file or directory (one document per file) to train on.
        #[arg(long, required_unless_present = "from")]
        input: Option<PathBuf>,
        /// Vocabulary size, special tokens included.
        #[arg(long, default_value_t = 8192)]
        vocab_size: usize,
        /// Existing tokenizer.json to check and copy instead of training.
        #[arg(long, conflicts_with = "input")]
        from: Option<PathBuf>,
        /// Output path of the tokenizer.json file.
        #[arg(long)]
        output: PathBuf,
    },
    /// Tokenize a corpus into binary shards with a manifest and a train/valid split.
    Prepare {
        /// Corpus file or directory (one document per file).
        #[arg(long)]
        input: PathBuf,
        /// The tokenizer.json to encode with.
        #[arg(long)]
        tokenizer: PathBuf,
        /// Prepared directory to create.
        #[arg(long)]
        output: PathBuf,
        /// Fraction of documents held out for validation, chosen by a hash of their path.
        #[arg(long, default_value_t = 0.05)]
        valid_fraction: f64,
        /// Maximum tokens per shard file.
        #[arg(long, default_value_t = 1 << 24)]
        shard_tokens: usize,
    },
}

fn main() -> ExitCode {
    let stderr_is_terminal = std::io::stderr().is_terminal();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(stderr_is_terminal)
        .with_target(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DAGMOE_LOG").unwrap_or_else(|_| "info".into()),
        )
        .init();

    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) if !error.use_stderr() => {
            // --help and --version print to stdout and succeed.
            let _ = error.print();
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            let rendered = error.to_string();
            let first = rendered.lines().next().unwrap_or_default().trim_start_matches("error: ");
            eprintln!("dagmoe: {first}; run `dagmoe --help` for usage");
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let mut message = format!("dagmoe: {error}");
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("{message}");
            ExitCode::from(error.exit_code() as u8)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Pretrain { config, overrides, resume, allow_config_change } => {
            let config = dagmoe::load_config(&config, &overrides)?;
            let start = if resume { Start::Resume { allow_config_change } } else { Start::Scratch };
            install_interrupt_handler()?;
            print_summary(&dagmoe::train(config, start)?);
        }
        Command::Finetune { from, config, overrides, resume, allow_config_change } => {
            let config = commands::finetune_config(&from, &config, &overrides)?;
            let start = if resume { Start::Resume { allow_config_change } } else { Start::Weights(from) };
            install_interrupt_handler()?;
            print_summary(&dagmoe::train(config, start)?);
        }
        Command::Eval { checkpoint, sets, eval_tokens, device, output } => {
            let sets = sets.iter().map(|s| parse_named_path(s)).collect::<Result<Vec<_>>>()?;
            for (i, (name, _)) in sets.iter().enumerate() {
                if sets[..i].iter().any(|(other, _)| other == name) {
                    return Err(Error::Usage(format!("--data name {name:?} is given twice; give each set its own name")));
                }
            }
            let output = output.unwrap_or_else(|| checkpoint.join("eval.json"));
            commands::check_report_path(&output)?;
            let report = commands::run_eval(&EvalOptions { checkpoint, sets, eval_tokens, device })?;
            print!("{}", format_table(&report.results));
            let json = serde_json::to_string_pretty(&report).expect("the eval report serializes");
            std::fs::write(&output, json).map_err(|e| Error::Io { action: "write", path: output.clone(), source: e })?;
            println!("report: {}", output.display());
        }
        Command::Params { config, overrides } => {
            let config = dagmoe::load_config(&config, &overrides)?;
            print!("{}", commands::params_table(&config));
        }
        Command::Data(DataCommand::Tokenizer { input, vocab_size, from, output }) => {
            let tokenizer = match (from, input) {
                (Some(source), _) => commands::import_tokenizer(&source, &output)?,
                (None, Some(input)) => commands::train_tokenizer(&input, vocab_size, &output)?,
                (None, None) => unreachable!("clap requires --input or --from"),
            };
            println!("tokenizer: {} ({} entries, sha256 {})", output.display(), tokenizer.vocab_size(), tokenizer.sha256());
        }
        Command::Data(DataCommand::Prepare { input, tokenizer, output, valid_fraction, shard_tokens }) => {
            let options = PrepareOptions { input, output, valid_fraction, shard_tokens, batch_documents: 256 };
            let summary = commands::prepare(&tokenizer, &options)?;
            let m = &summary.manifest;
            println!(
                "prepared {}: train {} documents, {} tokens; valid {} documents, {} tokens; {:.2} bytes per token",
                summary.output.display(),
                m.train.documents,
                m.train.tokens,
                m.valid.documents,
                m.valid.tokens,
                (m.train.bytes + m.valid.bytes) as f64 / (m.train.tokens + m.valid.tokens).max(1) as f64
            );
        }
    }
    Ok(())
}

fn parse_named_path(value: &str) -> Result<(String, PathBuf)> {
    match value.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => Ok((name.to_string(), PathBuf::from(path))),
        _ => Err(Error::Usage(format!("invalid --data {value:?}: write it as NAME=DIR, for example kernel-docs=data/prepared/kernel-docs"))),
    }
}

fn print_summary(summary: &dagmoe::RunSummary) {
    print!("{}", format_table(&summary.eval));
    println!(
        "run: {} | steps {} | {:.0} train tokens/s | checkpoint {}",
        summary.run_dir.display(),
        summary.steps,
        summary.train_tokens_per_second,
        summary.checkpoint.display()
    );
}
