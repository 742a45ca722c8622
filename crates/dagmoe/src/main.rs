//! The `dagmoe` command line: parses arguments and dispatches to the library.
//!
//! Exit codes: 0 success, 2 usage or config error, 130 interrupted by
//! SIGINT or SIGTERM after saving a checkpoint, 1 any other failure.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::TypedValueParser;
use clap::{Parser, Subcommand};
use dagmoe::commands::{self, EvalOptions};
use dagmoe::eval::{format_table, format_task_table};
use dagmoe::train::install_interrupt_handler;
use dagmoe::{Error, Result, Start};
use dagmoe_data::PrepareOptions;
use dagmoe_model::Precision;
use dagmoe_data::sources::{BadRecordPolicy, Format, SourceOptions};

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
    /// Report token-weighted perplexity of checkpoints on held-out sets.
    Eval {
        /// Checkpoint directory (repeatable: several give a side-by-side table).
        #[arg(long = "checkpoint", required = true)]
        checkpoints: Vec<PathBuf>,
        /// Evaluation set as NAME=PREPARED_DIR (repeatable); defaults to the checkpoint's data.valid.
        #[arg(long = "data", value_name = "NAME=DIR")]
        sets: Vec<String>,
        /// Multiple-choice task as NAME=FILE.jsonl (repeatable); defaults to the checkpoint's data.tasks.
        #[arg(long = "task", value_name = "NAME=FILE")]
        tasks: Vec<String>,
        /// Maximum tokens scored per set; 0 scores the whole validation split.
        #[arg(long)]
        eval_tokens: Option<u64>,
        /// Device to evaluate on; defaults to the checkpoint's train.device.
        #[arg(long)]
        device: Option<String>,
        /// Number format of the matrix products; defaults to the checkpoint's train.precision.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(Precision::ALL.map(Precision::name)).map(|name| name.parse::<Precision>().expect("a listed precision parses")))]
        precision: Option<Precision>,
        /// Slide windows by this many tokens so each scored token has more context; defaults to seq_len (no overlap).
        #[arg(long)]
        stride: Option<usize>,
        /// Sequences per batch; defaults to the checkpoint's train.eval_batch_size.
        #[arg(long)]
        batch_size: Option<usize>,
        /// Extra JSON report path. Each checkpoint always gets <checkpoint>/eval.json;
        /// this path gets a copy of the report, or all reports for several checkpoints.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Generate text from a checkpoint, for sanity checks, at the checkpoint's train.precision.
    Generate {
        /// Checkpoint directory.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Text to continue.
        #[arg(long)]
        prompt: String,
        /// Maximum new tokens; generation also stops at the EOS token.
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// Softmax temperature; 0 is greedy decoding.
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        /// Sample among the K most likely tokens only; 0 disables the filter.
        #[arg(long, default_value_t = 50)]
        top_k: usize,
        /// Sample among the most likely tokens whose probabilities add up to P; 1 disables the filter.
        #[arg(long, default_value_t = 0.95)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Device to run on; defaults to the checkpoint's train.device.
        #[arg(long)]
        device: Option<String>,
    },
    /// Print parameter counts of a config.
    Params {
        /// Run configuration whose [model] is counted.
        #[arg(long)]
        config: PathBuf,
        /// Another config (a DAG-MoE model): solve the shared-expert width that makes --config match its parameter count.
        #[arg(long = "match", value_name = "CONFIG")]
        match_config: Option<PathBuf>,
        /// Override a config value, for example --set model.dag.depth=1 (repeatable).
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Time training steps of a config, printing one JSON line (see scripts/bench.sh).
    Bench {
        /// Run configuration (TOML with [model], [data] and [train]).
        #[arg(long)]
        config: PathBuf,
        /// Override a config value, for example --set model.dag.depth=1 (repeatable).
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        overrides: Vec<String>,
        /// Untimed steps first, to leave one-time allocation out.
        #[arg(long, default_value_t = 3)]
        warmup: u64,
        /// Timed steps.
        #[arg(long, default_value_t = 10)]
        steps: u64,
    },
    /// Tokenizers and prepared data.
    #[command(subcommand)]
    Data(DataCommand),
}

#[derive(Subcommand)]
enum DataCommand {
    /// Train a byte-level BPE tokenizer, or import an existing tokenizer.json.
    Tokenizer {
        /// Text file, directory, glob pattern, JSONL or Parquet file to train on; repeat for several.
        #[arg(long, required_unless_present = "from")]
        input: Vec<PathBuf>,
        #[command(flatten)]
        source: SourceArgs,
        /// Vocabulary size, special tokens included.
        #[arg(long, default_value_t = 8192)]
        vocab_size: usize,
        /// Special token to reserve besides `<|endoftext|>` (repeatable).
        #[arg(long = "special-token", value_name = "TOKEN", conflicts_with = "from")]
        special_tokens: Vec<String>,
        /// Existing tokenizer.json to check and copy instead of training.
        #[arg(long, conflicts_with = "input")]
        from: Option<PathBuf>,
        /// Output path of the tokenizer.json file.
        #[arg(long)]
        output: PathBuf,
    },
    /// Build a multiple-choice cloze task (JSONL) from held-out documents of a corpus.
    MakeCloze {
        /// Corpus file or directory, as given to `data prepare`.
        #[arg(long)]
        input: PathBuf,
        /// Task file to write; must not exist.
        #[arg(long)]
        output: PathBuf,
        /// Items to build at most.
        #[arg(long, default_value_t = 200)]
        items: usize,
        /// Choices per item, the correct one included.
        #[arg(long, default_value_t = 4)]
        choices: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The --valid-fraction the corpus was prepared with; only its held-out documents are used.
        #[arg(long, default_value_t = 0.05)]
        valid_fraction: f64,
    },
    /// Tokenize a corpus into binary shards with a manifest and train/valid/test splits.
    Prepare {
        /// Text file, directory (read recursively), glob pattern, JSONL (`.jsonl`,
        /// `.jsonl.gz`, `.jsonl.zst`) or Parquet file; repeat for several.
        #[arg(long, required = true)]
        input: Vec<PathBuf>,
        /// The tokenizer.json to encode with.
        #[arg(long)]
        tokenizer: PathBuf,
        /// Prepared directory to create; several corpora can sit side by side under one parent.
        #[arg(long)]
        output: PathBuf,
        /// Corpus name recorded in the manifest; defaults to the output directory's name.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        source: SourceArgs,
        /// Fraction of documents held out for validation, chosen by a hash of their key.
        #[arg(long, default_value_t = 0.05)]
        valid_fraction: f64,
        /// Fraction of documents held out as a test split, chosen the same way.
        #[arg(long, default_value_t = 0.0)]
        test_fraction: f64,
        /// Special token to insert before every document (none by default;
        /// an EOS token always follows every document).
        #[arg(long)]
        bos_token: Option<String>,
        /// Maximum tokens per shard file.
        #[arg(long, default_value_t = 1 << 24)]
        shard_tokens: usize,
    },
}

/// Document-reading options of `data tokenizer` and `data prepare`.
#[derive(Debug, clap::Args)]
struct SourceArgs {
    /// Input format; `auto` chooses by file extension.
    #[arg(long, value_enum, default_value_t = FormatArg::Auto)]
    format: FormatArg,
    /// JSONL field or Parquet column holding the document text.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// Split each text file into documents at this string (for example a
    /// line of its own); by default each file is one document.
    #[arg(long)]
    separator: Option<String>,
    /// Policy for an unreadable record (invalid JSON or UTF-8, a missing or
    /// non-text field): skip and count it, or stop.
    #[arg(long, value_enum, default_value_t = BadRecordArg::Skip)]
    on_bad_record: BadRecordArg,
}

impl SourceArgs {
    fn options(self) -> SourceOptions {
        SourceOptions {
            format: match self.format {
                FormatArg::Auto => Format::Auto,
                FormatArg::Text => Format::Text,
                FormatArg::Jsonl => Format::Jsonl,
                FormatArg::Parquet => Format::Parquet,
            },
            text_field: self.text_field,
            separator: self.separator,
            bad_records: match self.on_bad_record {
                BadRecordArg::Skip => BadRecordPolicy::Skip,
                BadRecordArg::Fail => BadRecordPolicy::Fail,
            },
            ..SourceOptions::default()
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum FormatArg {
    Auto,
    Text,
    Jsonl,
    Parquet,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum BadRecordArg {
    Skip,
    Fail,
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
            let mut lines = rendered.lines().map(str::trim).filter(|line| !line.is_empty());
            let mut first = lines.next().unwrap_or_default().trim_start_matches("error: ").to_string();
            // "the following required arguments were not provided:" lists them on the next lines.
            if first.ends_with(':') {
                let listed: Vec<&str> = lines.take_while(|line| line.starts_with('-') || line.starts_with('<')).collect();
                first = format!("{} {}", first, listed.join(", "));
            }
            // An unquoted glob reaches clap as several paths after one --input.
            let hint = if error.kind() == clap::error::ErrorKind::UnknownArgument && !first.contains("'-") {
                "; quote a glob pattern (--input 'dir/*.txt') or repeat --input for each path"
            } else {
                ""
            };
            let possible = rendered.lines().map(str::trim).find(|line| line.starts_with("[possible values:"));
            let possible = possible.map(|line| format!(" {line}")).unwrap_or_default();
            eprintln!("dagmoe: {first}{possible}{hint}; run `{} --help` for usage", subcommand_path());
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

/// Returns the subcommand named on the command line, such as "dagmoe data
/// prepare", so an error can point to that subcommand's help.
fn subcommand_path() -> String {
    let mut command = <Cli as clap::CommandFactory>::command();
    let mut path = vec!["dagmoe".to_string()];
    for arg in std::env::args().skip(1) {
        let Some(subcommand) = command.find_subcommand(&arg).cloned() else { break };
        path.push(arg);
        command = subcommand;
    }
    path.join(" ")
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
        Command::Bench { config: config_path, overrides, warmup, steps } => {
            let config = dagmoe::load_config(&config_path, &overrides)?;
            let params = dagmoe_model::ParamCounts::of(&config.model).total;
            let flops_per_token = dagmoe::train::flops_per_token(&config);
            let (threads, device) = (config.train.threads, config.train.device.clone());
            let report = dagmoe::train::bench_training(config, warmup, steps)?;
            let mut line = serde_json::json!({
                "impl": "dagmoe",
                "config": config_path,
                "overrides": overrides,
                "params": params,
                "flops_per_token": flops_per_token,
                "threads": threads,
                "device": device,
            });
            let fields = serde_json::to_value(&report).expect("bench reports serialize");
            line.as_object_mut().expect("an object").extend(fields.as_object().expect("an object").clone());
            println!("{line}");
        }
        Command::Eval { checkpoints, sets, tasks, eval_tokens, device, precision, stride, batch_size, output } => {
            let sets = parse_named_paths("--data", &sets)?;
            let tasks = parse_named_paths("--task", &tasks)?;
            let mut reports = Vec::new();
            for checkpoint in checkpoints {
                let own_output = checkpoint.join("eval.json");
                commands::check_report_path(&own_output)?;
                if let Some(path) = &output {
                    commands::check_report_path(path)?;
                }
                let options = EvalOptions {
                    checkpoint,
                    sets: sets.clone(),
                    eval_tokens,
                    device: device.clone(),
                    precision,
                    stride,
                    batch_size,
                    tasks: tasks.clone(),
                };
                let report = commands::run_eval(&options)?;
                println!("{} ({})", report.checkpoint.display(), report.precision.name());
                if !report.results.is_empty() {
                    print!("{}", format_table(&report.results));
                }
                if !report.tasks.is_empty() {
                    print!("{}", format_task_table(&report.tasks));
                }
                write_json(&own_output, &report)?;
                reports.push(report);
            }
            if reports.len() > 1 {
                print!("{}", commands::comparison_table(&reports));
                if reports.iter().any(|report| report.precision != reports[0].precision) {
                    eprintln!(
                        "note: the checkpoints were scored at their own training precisions, which differ; pass --precision to compare them at one"
                    );
                }
            }
            match (&output, reports.as_slice()) {
                (Some(path), [report]) => write_json(path, report)?,
                (Some(path), _) => write_json(path, &reports)?,
                (None, _) => {}
            }
        }
        Command::Generate { checkpoint, prompt, max_tokens, temperature, top_k, top_p, seed, device } => {
            let options = dagmoe::generate::SamplingOptions { max_tokens, temperature, top_k, top_p, seed };
            let text = commands::run_generate(&checkpoint, &prompt, &options, device.as_deref())?;
            println!("{prompt}{text}");
        }
        Command::Params { config, match_config, overrides } => {
            let config = dagmoe::load_config(&config, &overrides)?;
            print!("{}", commands::params_table(&config));
            if let Some(target_path) = match_config {
                let target = dagmoe::load_config(&target_path, &[])?;
                let (hidden, difference) = commands::match_shared_expert(&config, &target)?;
                println!(
                    "match {}: model.moe.shared_expert_hidden = {hidden} leaves a difference of {difference:+} parameters",
                    target_path.display()
                );
            }
        }
        Command::Data(DataCommand::Tokenizer { input, source, vocab_size, special_tokens, from, output }) => {
            let tokenizer = match from {
                Some(from) => commands::import_tokenizer(&from, &output)?,
                None => commands::train_tokenizer(&input, &source.options(), vocab_size, &special_tokens, &output)?,
            };
            println!("tokenizer: {} ({} entries, sha256 {})", output.display(), tokenizer.vocab_size(), tokenizer.sha256());
        }
        Command::Data(DataCommand::MakeCloze { input, output, items, choices, seed, valid_fraction }) => {
            if output.exists() {
                return Err(Error::Usage(format!("{} already exists; delete it or pass another --output", output.display())));
            }
            let options = dagmoe::cloze::ClozeOptions { items, choices, seed, valid_fraction };
            let built = dagmoe::cloze::make_cloze(&input, &options)?;
            let lines: String = built.iter().map(|item| serde_json::to_string(item).expect("items serialize") + "\n").collect();
            std::fs::write(&output, lines).map_err(|e| Error::Io { action: "write", path: output.clone(), source: e })?;
            println!("cloze task: {} ({} items, {} choices each)", output.display(), built.len(), choices);
        }
        Command::Data(DataCommand::Prepare {
            input,
            tokenizer,
            output,
            name,
            source,
            valid_fraction,
            test_fraction,
            bos_token,
            shard_tokens,
        }) => {
            let defaults = PrepareOptions::new(input, output);
            let options = PrepareOptions {
                name: name.unwrap_or(defaults.name.clone()),
                source: source.options(),
                valid_fraction,
                test_fraction,
                bos_token,
                shard_tokens,
                ..defaults
            };
            let summary = commands::prepare(&tokenizer, &options)?;
            let m = &summary.manifest;
            let splits = [&m.train, &m.valid, &m.test];
            let bytes: u64 = splits.iter().map(|s| s.bytes).sum();
            let tokens: u64 = splits.iter().map(|s| s.tokens).sum();
            println!(
                "prepared {} ({}): train {} documents, {} tokens; valid {} documents, {} tokens; test {} documents, {} tokens; {:.2} bytes per token; skipped: {} empty, {} unreadable",
                summary.output.display(),
                m.name,
                m.train.documents,
                m.train.tokens,
                m.valid.documents,
                m.valid.tokens,
                m.test.documents,
                m.test.tokens,
                bytes as f64 / tokens.max(1) as f64,
                m.empty_documents,
                m.bad_records
            );
        }
    }
    Ok(())
}

fn write_json(path: &std::path::Path, value: &impl serde::Serialize) -> Result<()> {
    let json = serde_json::to_string_pretty(value).expect("reports serialize");
    std::fs::write(path, json).map_err(|e| Error::Io { action: "write", path: path.to_path_buf(), source: e })?;
    println!("report: {}", path.display());
    Ok(())
}

/// Parses repeated `NAME=PATH` values of `flag`, rejecting malformed and duplicate names.
fn parse_named_paths(flag: &str, values: &[String]) -> Result<Vec<(String, PathBuf)>> {
    let mut parsed: Vec<(String, PathBuf)> = Vec::new();
    for value in values {
        let (name, path) = match value.split_once('=') {
            Some((name, path)) if !name.is_empty() && !path.is_empty() => (name.to_string(), PathBuf::from(path)),
            _ => {
                return Err(Error::Usage(format!(
                    "invalid {flag} {value:?}: write it as NAME=PATH, for example kernel-docs=data/prepared/kernel-docs"
                )));
            }
        };
        if parsed.iter().any(|(other, _)| *other == name) {
            return Err(Error::Usage(format!("{flag} name {name:?} is given twice; give each its own name")));
        }
        parsed.push((name, path));
    }
    Ok(parsed)
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
