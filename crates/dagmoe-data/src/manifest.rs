//! The JSON manifest that describes a prepared data directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{DataError, Result};

/// File name of the manifest inside a prepared data directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Version of the manifest layout; bumped when a field changes meaning.
/// Version 2 added the corpus name, BOS id, test split and record counts;
/// version 1 manifests still load, with those fields empty.
pub const MANIFEST_VERSION: u32 = 2;

/// Description of a prepared data directory: tokenizer identity, splits and shards.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format_version: u32,
    /// Corpus name, used to refer to it in mixtures and reports.
    #[serde(default)]
    pub name: String,
    /// SHA-256 of the `tokenizer.json` used to tokenize the documents.
    pub tokenizer_sha256: String,
    pub vocab_size: usize,
    /// Token appended after every document.
    pub eos_id: u32,
    /// Token inserted before every document, or none.
    #[serde(default)]
    pub bos_id: Option<u32>,
    /// Bytes per token in the shards: 2 when the vocabulary fits in `u16`, else 4.
    pub token_bytes: u32,
    /// Fraction of documents assigned to the validation split by hash of their path.
    pub valid_fraction: f64,
    /// Fraction of documents assigned to the test split, after the validation share.
    #[serde(default)]
    pub test_fraction: f64,
    /// Input the documents were read from, as given to `dagmoe data prepare`.
    pub source: String,
    /// Documents skipped because they were empty or not valid UTF-8, or
    /// records that could not be read: `empty_documents + bad_records`.
    pub skipped_documents: u64,
    #[serde(default)]
    pub empty_documents: u64,
    /// Records skipped as unreadable: invalid JSON or UTF-8, a missing or non-text field.
    #[serde(default)]
    pub bad_records: u64,
    pub train: SplitInfo,
    pub valid: SplitInfo,
    #[serde(default)]
    pub test: SplitInfo,
}

/// Counts and shards of one split.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SplitInfo {
    pub documents: u64,
    /// Tokens in the split, the EOS token after each document included.
    pub tokens: u64,
    /// UTF-8 bytes of the split's documents, for bits-per-byte figures.
    pub bytes: u64,
    pub shards: Vec<ShardInfo>,
}

/// One shard file of a split.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardInfo {
    /// File name relative to the data directory.
    pub file: String,
    pub tokens: u64,
    /// SHA-256 of the whole file, header included.
    pub sha256: String,
}

/// The splits of a prepared directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Valid,
    Test,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
            Split::Test => "test",
        }
    }
}

impl Manifest {
    /// Reads `<dir>/manifest.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| DataError::io("read manifest", &path, e))?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| DataError::Manifest {
            path: path.clone(),
            message: format!("{e}; rerun `dagmoe data prepare` to rebuild it"),
        })?;
        if !(1..=MANIFEST_VERSION).contains(&manifest.format_version) {
            return Err(DataError::Manifest {
                path,
                message: format!(
                    "format version {} is not supported (expected {MANIFEST_VERSION}); rerun `dagmoe data prepare`",
                    manifest.format_version
                ),
            });
        }
        let special_ids = [Some(manifest.eos_id), manifest.bos_id];
        if let Some(id) = special_ids.into_iter().flatten().find(|&id| id as usize >= manifest.vocab_size) {
            return Err(DataError::Manifest {
                path,
                message: format!(
                    "special token id {id} is outside the vocabulary of {}; rerun `dagmoe data prepare`",
                    manifest.vocab_size
                ),
            });
        }
        Ok(manifest)
    }

    pub fn split(&self, split: Split) -> &SplitInfo {
        match split {
            Split::Train => &self.train,
            Split::Valid => &self.valid,
            Split::Test => &self.test,
        }
    }

    pub fn manifest_path(dir: &Path) -> PathBuf {
        dir.join(MANIFEST_FILE)
    }
}
