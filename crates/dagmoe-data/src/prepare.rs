//! `dagmoe data prepare`: documents to token shards plus a manifest.

use std::path::{Path, PathBuf};

use crate::manifest::{MANIFEST_FILE, MANIFEST_VERSION, Manifest, ShardInfo, SplitInfo};
use crate::shard::{token_bytes_for_vocab, write_shard};
use crate::tokenizer::{TextTokenizer, sha256_hex};
use crate::{DataError, Result};

/// Smallest shard size `prepare_corpus` accepts, to keep the file count sane.
pub const MIN_SHARD_TOKENS: usize = 1024;

/// Settings of one `prepare` run.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// A text file, or a directory read recursively with one document per file.
    pub input: PathBuf,
    /// The prepared directory to create; it must not exist yet.
    pub output: PathBuf,
    /// Fraction of documents, chosen by a hash of their relative path, held out for validation.
    pub valid_fraction: f64,
    /// Maximum tokens per shard file.
    pub shard_tokens: usize,
    /// Number of documents tokenized together in one parallel batch.
    pub batch_documents: usize,
}

/// Counts reported after a `prepare` run.
#[derive(Debug, Clone)]
pub struct PrepareSummary {
    pub manifest: Manifest,
    pub output: PathBuf,
}

/// Lists the documents under `input`: the file itself, or every file below the
/// directory, sorted by relative path so the result is the same on every machine.
pub fn list_documents(input: &Path) -> Result<Vec<PathBuf>> {
    let metadata = std::fs::metadata(input).map_err(|e| DataError::io("read corpus path", input, e))?;
    if metadata.is_file() {
        return Ok(vec![input.to_path_buf()]);
    }
    let mut files = Vec::new();
    let mut pending = vec![input.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| DataError::io("list directory", &dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| DataError::io("list directory", &dir, e))?;
            let file_type = entry.file_type().map_err(|e| DataError::io("stat", entry.path(), e))?;
            if file_type.is_dir() {
                pending.push(entry.path());
            } else if file_type.is_file() {
                files.push(entry.path());
            }
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(DataError::Invalid(format!(
            "corpus directory {} contains no files; run scripts/get-corpus.sh or pass another --input",
            input.display()
        )));
    }
    Ok(files)
}

/// Reads every document under `input` as UTF-8, skipping empty and non-UTF-8 files.
/// Returns `(relative path, text)` pairs and the number skipped.
pub fn read_documents(input: &Path) -> Result<(Vec<(String, String)>, u64)> {
    let mut documents = Vec::new();
    let mut skipped = 0;
    for path in list_documents(input)? {
        let bytes = std::fs::read(&path).map_err(|e| DataError::io("read document", &path, e))?;
        let relative = path.strip_prefix(input).unwrap_or(&path).to_string_lossy().into_owned();
        match String::from_utf8(bytes) {
            Ok(text) if !text.trim().is_empty() => documents.push((relative, text)),
            Ok(_) => skipped += 1,
            Err(_) => {
                tracing::warn!(path = %path.display(), "skipping a document that is not valid UTF-8");
                skipped += 1;
            }
        }
    }
    Ok((documents, skipped))
}

/// Returns whether a document belongs to the validation split. The decision
/// depends only on the document's relative path, so adding or removing other
/// documents never moves a document between splits.
pub fn is_validation_document(relative_path: &str, valid_fraction: f64) -> bool {
    let digest = sha256_hex(relative_path.as_bytes());
    let value = u64::from_str_radix(&digest[..16], 16).unwrap_or(0);
    (value as f64 / u64::MAX as f64) < valid_fraction
}

/// Tokenizes the documents under `options.input` into `options.output`.
///
/// The output is built in a temporary sibling directory and renamed when it
/// is complete, so an interrupted run never leaves a directory that looks prepared.
pub fn prepare_corpus(tokenizer: &TextTokenizer, options: &PrepareOptions) -> Result<PrepareSummary> {
    if !(0.0..=1.0).contains(&options.valid_fraction) {
        return Err(DataError::Invalid(format!(
            "valid fraction {} is outside [0, 1]; pass a value such as 0.05",
            options.valid_fraction
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
    let (documents, skipped) = read_documents(&options.input)?;
    if documents.is_empty() {
        return Err(DataError::Invalid(format!(
            "{} contains no usable document ({skipped} files were empty or not UTF-8 text); pass a directory of text files",
            options.input.display()
        )));
    }
    let staging = staging_dir(&options.output);
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| DataError::io("remove stale directory", &staging, e))?;
    }
    std::fs::create_dir_all(&staging).map_err(|e| DataError::io("create directory", &staging, e))?;

    let token_bytes = token_bytes_for_vocab(tokenizer.vocab_size());
    let mut train = SplitWriter::new("train", &staging, token_bytes, options.shard_tokens);
    let mut valid = SplitWriter::new("valid", &staging, token_bytes, options.shard_tokens);
    let eos = tokenizer.eos_id();
    for chunk in documents.chunks(options.batch_documents.max(1)) {
        let texts: Vec<&str> = chunk.iter().map(|(_, text)| text.as_str()).collect();
        let encoded = tokenizer.encode_batch(texts)?;
        for ((relative, text), mut ids) in chunk.iter().zip(encoded) {
            ids.push(eos);
            let writer = if is_validation_document(relative, options.valid_fraction) { &mut valid } else { &mut train };
            writer.push_document(&ids, text.len() as u64)?;
        }
    }

    let manifest = Manifest {
        format_version: MANIFEST_VERSION,
        tokenizer_sha256: tokenizer.sha256().to_string(),
        vocab_size: tokenizer.vocab_size(),
        eos_id: eos,
        token_bytes,
        valid_fraction: options.valid_fraction,
        source: options.input.display().to_string(),
        skipped_documents: skipped,
        train: train.finish()?,
        valid: valid.finish()?,
    };
    let manifest_path = staging.join(MANIFEST_FILE);
    let json = serde_json::to_string_pretty(&manifest).expect("manifest serializes");
    std::fs::write(&manifest_path, json).map_err(|e| DataError::io("write manifest", &manifest_path, e))?;
    std::fs::rename(&staging, &options.output).map_err(|e| DataError::io("rename prepared directory to", &options.output, e))?;
    Ok(PrepareSummary { manifest, output: options.output.clone() })
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
