//! `dagmoe data prepare`: documents to token shards plus a manifest.

use std::path::{Path, PathBuf};

use crate::manifest::{MANIFEST_FILE, MANIFEST_VERSION, Manifest, ShardInfo, Split, SplitInfo};
use crate::shard::{token_bytes_for_vocab, write_shard};
use crate::sources::{DocumentSource, Segment, SourceOptions, describe_inputs, no_usable_documents};
use crate::tokenizer::{TextTokenizer, sha256_hex};
use crate::{DataError, Result};

/// Smallest shard size `prepare_corpus` accepts, to keep the file count sane.
pub const MIN_SHARD_TOKENS: usize = 1024;

/// Settings of one `prepare` run.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Files, directories or glob patterns to read documents from.
    pub inputs: Vec<PathBuf>,
    /// The prepared directory to create; it must not exist yet.
    pub output: PathBuf,
    /// Corpus name recorded in the manifest.
    pub name: String,
    /// Reading options: format, text field, separator and bad-record policy.
    pub source: SourceOptions,
    /// Fraction of documents, chosen by a hash of their key, held out for validation.
    pub valid_fraction: f64,
    /// Fraction of documents, chosen the same way, held out as a test split.
    pub test_fraction: f64,
    /// Maximum tokens per shard file.
    pub shard_tokens: usize,
    /// Number of segments tokenized together in one parallel batch.
    pub batch_documents: usize,
    /// Special token inserted before every document, if any.
    pub bos_token: Option<String>,
}

impl PrepareOptions {
    /// Options with the defaults of `dagmoe data prepare`, named after the output directory.
    pub fn new(inputs: Vec<PathBuf>, output: PathBuf) -> Self {
        let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "corpus".into());
        Self {
            inputs,
            output,
            name,
            source: SourceOptions::default(),
            valid_fraction: 0.05,
            test_fraction: 0.0,
            shard_tokens: 1 << 24,
            batch_documents: 256,
            bos_token: None,
        }
    }
}

/// Counts reported after a `prepare` run.
#[derive(Debug, Clone)]
pub struct PrepareSummary {
    pub manifest: Manifest,
    pub output: PathBuf,
}

fn open_source(options: &PrepareOptions) -> Result<DocumentSource> {
    DocumentSource::open(&options.inputs, options.source.clone())
}

/// Returns whether a document belongs to the validation split.
pub fn is_validation_document(key: &str, valid_fraction: f64) -> bool {
    split_of(key, valid_fraction, 0.0) == Split::Valid
}

/// Assigns a document to a split by a hash of its key: validation below
/// `valid_fraction`, test in the next `test_fraction`, train above. The
/// decision depends only on the key, so adding or removing other documents
/// never moves a document between splits.
pub fn split_of(key: &str, valid_fraction: f64, test_fraction: f64) -> Split {
    let digest = sha256_hex(key.as_bytes());
    let value = u64::from_str_radix(&digest[..16], 16).unwrap_or(0) as f64 / u64::MAX as f64;
    if value < valid_fraction {
        Split::Valid
    } else if value < valid_fraction + test_fraction {
        Split::Test
    } else {
        Split::Train
    }
}

/// Counts reported while `prepare_corpus` runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct PrepareProgress {
    /// Documents finished so far.
    pub documents: u64,
    /// UTF-8 bytes of text tokenized so far.
    pub bytes: u64,
    pub tokens: u64,
}

/// Largest amount of text gathered for one parallel encoding batch.
const BATCH_BYTES: usize = 16 << 20;

/// Tokenizes the documents of `options.input` into `options.output`, calling
/// `on_progress` after each parallel batch.
///
/// The output is built in a temporary sibling directory and renamed when it
/// is complete, so an interrupted run never leaves a directory that looks prepared.
pub fn prepare_corpus(
    tokenizer: &TextTokenizer,
    options: &PrepareOptions,
    on_progress: &mut dyn FnMut(PrepareProgress),
) -> Result<PrepareSummary> {
    check_options(options)?;
    let bos_id = match &options.bos_token {
        Some(token) if tokenizer.is_special_token(token) => tokenizer.token_id(token),
        Some(token) => {
            return Err(DataError::Invalid(format!(
                "BOS token {token:?} is not a special token of the tokenizer {}; pass one of its special tokens, train one in with `dagmoe data tokenizer --special-token`, or leave out --bos-token",
                tokenizer.path().display()
            )));
        }
        None => None,
    };
    let staging = staging_dir(&options.output);
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| DataError::io("remove stale directory", &staging, e))?;
    }
    std::fs::create_dir_all(&staging).map_err(|e| DataError::io("create directory", &staging, e))?;
    let result = write_prepared(tokenizer, options, bos_id, &staging, on_progress);
    if result.is_err() {
        // Best effort: the staging directory is hidden and never mistaken for
        // a prepared one, and the next run removes it anyway.
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

/// Tokenizes the documents into `staging`, then renames it to `options.output`.
fn write_prepared(
    tokenizer: &TextTokenizer,
    options: &PrepareOptions,
    bos_id: Option<u32>,
    staging: &Path,
    on_progress: &mut dyn FnMut(PrepareProgress),
) -> Result<PrepareSummary> {
    let token_bytes = token_bytes_for_vocab(tokenizer.vocab_size());
    let mut writers = [
        SplitWriter::new("train", staging, token_bytes, options.shard_tokens),
        SplitWriter::new("valid", staging, token_bytes, options.shard_tokens),
        SplitWriter::new("test", staging, token_bytes, options.shard_tokens),
    ];
    let mut encoder = SegmentEncoder {
        tokenizer,
        bos_id,
        eos_id: tokenizer.eos_id(),
        valid_fraction: options.valid_fraction,
        test_fraction: options.test_fraction,
        document_ids: Vec::new(),
        document_bytes: 0,
        progress: PrepareProgress::default(),
    };
    let mut source = open_source(options)?;
    let mut pending: Vec<Segment> = Vec::new();
    let mut pending_bytes = 0;
    for segment in source.by_ref() {
        let segment = segment?;
        pending_bytes += segment.text.len();
        pending.push(segment);
        if pending.len() >= options.batch_documents.max(1) || pending_bytes >= BATCH_BYTES {
            encoder.encode(&pending, &mut writers)?;
            on_progress(encoder.progress);
            pending.clear();
            pending_bytes = 0;
        }
    }
    encoder.encode(&pending, &mut writers)?;
    on_progress(encoder.progress);
    let stats = source.stats();
    if encoder.progress.documents == 0 {
        return Err(no_usable_documents(&options.inputs, stats));
    }

    if writers[0].info.documents == 0 {
        tracing::warn!(
            "no document went to the training split; the corpus can be evaluated on but not trained on. Lower --valid-fraction or --test-fraction to train on it"
        );
    }
    let [train, valid, test] = writers;
    let manifest = Manifest {
        format_version: MANIFEST_VERSION,
        name: options.name.clone(),
        tokenizer_sha256: tokenizer.sha256().to_string(),
        vocab_size: tokenizer.vocab_size(),
        eos_id: tokenizer.eos_id(),
        bos_id,
        token_bytes,
        valid_fraction: options.valid_fraction,
        test_fraction: options.test_fraction,
        source: describe_inputs(&options.inputs),
        skipped_documents: stats.empty_documents + stats.bad_records,
        empty_documents: stats.empty_documents,
        bad_records: stats.bad_records,
        train: train.finish()?,
        valid: valid.finish()?,
        test: test.finish()?,
    };
    let manifest_path = staging.join(MANIFEST_FILE);
    let json = serde_json::to_string_pretty(&manifest).expect("manifest serializes");
    std::fs::write(&manifest_path, json).map_err(|e| DataError::io("write manifest", &manifest_path, e))?;
    std::fs::rename(staging, &options.output).map_err(|e| DataError::io("rename prepared directory to", &options.output, e))?;
    Ok(PrepareSummary { manifest, output: options.output.clone() })
}

fn check_options(options: &PrepareOptions) -> Result<()> {
    if options.name.trim().is_empty() || options.name.chars().any(char::is_control) {
        return Err(DataError::Invalid(format!(
            "corpus name {:?} is empty or contains control characters; pass a name such as kernel-docs with --name",
            options.name
        )));
    }
    for (flag, value) in [("--valid-fraction", options.valid_fraction), ("--test-fraction", options.test_fraction)] {
        if !(0.0..=1.0).contains(&value) {
            return Err(DataError::Invalid(format!("{flag} {value} is outside [0, 1]; pass a value such as 0.05")));
        }
    }
    if options.valid_fraction + options.test_fraction >= 1.0 {
        return Err(DataError::Invalid(format!(
            "--valid-fraction {} and --test-fraction {} leave no documents for training; keep their sum below 1",
            options.valid_fraction, options.test_fraction
        )));
    }
    if options.shard_tokens < MIN_SHARD_TOKENS {
        return Err(DataError::Invalid(format!(
            "shard size {} tokens is below the minimum {MIN_SHARD_TOKENS}; pass a larger --shard-tokens",
            options.shard_tokens
        )));
    }
    if options.output.exists() {
        return Err(DataError::Invalid(format!(
            "output directory {} already exists; remove it or choose another --output",
            options.output.display()
        )));
    }
    check_output_outside_inputs(options)
}

/// Rejects an output directory inside an input directory: a later run over
/// that input would read the shards and manifest as documents.
fn check_output_outside_inputs(options: &PrepareOptions) -> Result<()> {
    let absolute = |path: &Path| std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let parent = options.output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    // The parent may not exist yet; compare the nearest existing ancestor's real path.
    let mut existing = absolute(parent);
    while !existing.exists() {
        match existing.parent() {
            Some(up) => existing = up.to_path_buf(),
            None => return Ok(()),
        }
    }
    let output_dir = std::fs::canonicalize(&existing).unwrap_or(existing);
    for input in &options.inputs {
        // Directories are read recursively; a glob matches only what it names.
        let Ok(root) = std::fs::canonicalize(input) else { continue };
        if root.is_dir() && output_dir.starts_with(&root) {
            return Err(DataError::Invalid(format!(
                "--output {} is inside the input directory {}; choose an output outside the corpus",
                options.output.display(),
                input.display()
            )));
        }
    }
    Ok(())
}

/// Encodes segments in parallel batches and routes their tokens to the splits.
struct SegmentEncoder<'a> {
    tokenizer: &'a TextTokenizer,
    bos_id: Option<u32>,
    eos_id: u32,
    valid_fraction: f64,
    test_fraction: f64,
    /// Tokens of the document whose last segment is still to come. They are
    /// written when it ends, so a document the source discards part-way
    /// leaves nothing behind. The buffer keeps one document's ids, not its text.
    document_ids: Vec<u32>,
    document_bytes: u64,
    progress: PrepareProgress,
}

impl SegmentEncoder<'_> {
    fn encode(&mut self, segments: &[Segment], writers: &mut [SplitWriter<'_>; 3]) -> Result<()> {
        if segments.is_empty() {
            return Ok(());
        }
        let texts: Vec<&str> = segments.iter().map(|s| s.text.as_str()).collect();
        let encoded = self.tokenizer.encode_batch(texts)?;
        for (segment, ids) in segments.iter().zip(encoded) {
            if segment.discarded {
                self.document_ids.clear();
                self.document_bytes = 0;
                continue;
            }
            if self.document_ids.is_empty() {
                self.document_ids.extend(self.bos_id);
            }
            self.document_ids.extend_from_slice(&ids);
            self.document_bytes += segment.text.len() as u64;
            self.progress.bytes += segment.text.len() as u64;
            if !segment.end_of_document {
                continue;
            }
            self.document_ids.push(self.eos_id);
            let writer = match split_of(&segment.key, self.valid_fraction, self.test_fraction) {
                Split::Train => &mut writers[0],
                Split::Valid => &mut writers[1],
                Split::Test => &mut writers[2],
            };
            writer.push_document(&self.document_ids, self.document_bytes)?;
            self.progress.documents += 1;
            self.progress.tokens += self.document_ids.len() as u64;
            self.document_ids.clear();
            self.document_bytes = 0;
        }
        Ok(())
    }
}

fn staging_dir(output: &Path) -> PathBuf {
    let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    output.with_file_name(format!(".{name}.partial"))
}

/// Accumulates one split's tokens and cuts them into shards.
struct SplitWriter<'a> {
    name: &'static str,
    dir: &'a Path,
    token_bytes: u32,
    shard_tokens: usize,
    buffer: Vec<u32>,
    info: SplitInfo,
}

impl<'a> SplitWriter<'a> {
    fn new(name: &'static str, dir: &'a Path, token_bytes: u32, shard_tokens: usize) -> Self {
        Self { name, dir, token_bytes, shard_tokens: shard_tokens.max(1), buffer: Vec::new(), info: SplitInfo::default() }
    }

    /// Appends the tokens of one whole document.
    fn push_document(&mut self, ids: &[u32], bytes: u64) -> Result<()> {
        self.info.documents += 1;
        self.info.tokens += ids.len() as u64;
        self.info.bytes += bytes;
        self.buffer.extend_from_slice(ids);
        while self.buffer.len() >= self.shard_tokens {
            let rest = self.buffer.split_off(self.shard_tokens);
            self.flush()?;
            self.buffer = rest;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let file = format!("{}-{:05}.bin", self.name, self.info.shards.len());
        let sha256 = write_shard(&self.dir.join(&file), &self.buffer, self.token_bytes)?;
        self.info.shards.push(ShardInfo { file, tokens: self.buffer.len() as u64, sha256 });
        self.buffer.clear();
        Ok(())
    }

    fn finish(mut self) -> Result<SplitInfo> {
        self.flush()?;
        Ok(self.info)
    }
}
