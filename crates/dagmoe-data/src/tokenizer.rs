//! Byte-level BPE tokenizers in the Hugging Face `tokenizer.json` format.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::{DataError, Result};

/// The end-of-document token that separates documents in the token stream,
/// as `train_bpe_tokenizer` names it.
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// End-of-document token names looked up, in this order, in a loaded
/// tokenizer: dagmoe's and GPT-2's, Llama 3's, SentencePiece models', Gemma's.
pub const EOS_TOKEN_CANDIDATES: [&str; 4] = [EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>"];

/// Largest vocabulary `train_bpe_tokenizer` accepts, 2^21 entries; larger
/// requests are typing mistakes and would exhaust memory in the trainer.
pub const MAX_VOCAB_SIZE: usize = 1 << 21;

/// A loaded tokenizer with the identity recorded in manifests and checkpoints.
pub struct TextTokenizer {
    inner: Tokenizer,
    path: PathBuf,
    sha256: String,
    eos_id: u32,
}

impl TextTokenizer {
    /// Loads a `tokenizer.json` file whose vocabulary has one of the
    /// [`EOS_TOKEN_CANDIDATES`]; the first found is the end-of-document token.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => DataError::Invalid(format!(
                "tokenizer {} does not exist; train one with `dagmoe data tokenizer` or fix the path",
                path.display()
            )),
            _ => DataError::io("read tokenizer", path, e),
        })?;
        let mut inner = Tokenizer::from_bytes(&bytes).map_err(|e| DataError::Tokenizer {
            path: path.to_path_buf(),
            message: format!("{e}; pass a Hugging Face tokenizer.json or train one with `dagmoe data tokenizer`"),
        })?;
        // A literal `<|endoftext|>` inside a document is text, not a document
        // boundary: only prepare inserts EOS ids.
        inner.set_encode_special_tokens(true);
        let eos_id = EOS_TOKEN_CANDIDATES.iter().find_map(|name| inner.token_to_id(name)).ok_or_else(|| {
            DataError::Tokenizer {
                path: path.to_path_buf(),
                message: format!(
                    "no end-of-document token (looked for {}); train one with `dagmoe data tokenizer` or add `{EOS_TOKEN}` as a special token",
                    EOS_TOKEN_CANDIDATES.join(", ")
                ),
            }
        })?;
        Ok(Self { inner, path: path.to_path_buf(), sha256: sha256_hex(&bytes), eos_id })
    }

    /// Vocabulary size including special tokens: the model's embedding rows.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Returns whether `token` is one of the tokenizer's special tokens.
    pub fn is_special_token(&self, token: &str) -> bool {
        self.inner.get_added_vocabulary().is_special_token(token)
    }

    /// Id of a token of the vocabulary, special tokens included.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// SHA-256 of the `tokenizer.json` bytes, which identifies the tokenizer in manifests.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Encodes one document without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode_fast(text, false).map_err(|e| self.error(e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Encodes documents in parallel (the `tokenizers` crate uses rayon).
    pub fn encode_batch(&self, texts: Vec<&str>) -> Result<Vec<Vec<u32>>> {
        let encodings = self.inner.encode_batch_fast(texts, false).map_err(|e| self.error(e))?;
        Ok(encodings.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| self.error(e))
    }

    fn error(&self, e: tokenizers::Error) -> DataError {
        DataError::Tokenizer { path: self.path.clone(), message: e.to_string() }
    }
}

/// Trains a byte-level BPE tokenizer on `documents` and writes it to `output`.
///
/// The vocabulary contains the 256 byte symbols, [`EOS_TOKEN`], the
/// `special_tokens` and the learned merges, `vocab_size` entries in all.
pub fn train_bpe_tokenizer(
    documents: &[String],
    vocab_size: usize,
    special_tokens: &[String],
    output: &Path,
) -> Result<TextTokenizer> {
    let mut specials = vec![EOS_TOKEN.to_string()];
    for token in special_tokens {
        if token.is_empty() {
            return Err(DataError::Invalid("special token \"\" is empty; pass a non-empty --special-token".into()));
        }
        if !specials.contains(token) {
            specials.push(token.clone());
        }
    }
    let minimum = ByteLevel::alphabet().len() + specials.len();
    if vocab_size > MAX_VOCAB_SIZE {
        return Err(DataError::Invalid(format!(
            "vocab size {vocab_size} is larger than the supported {MAX_VOCAB_SIZE}; pass a smaller --vocab-size"
        )));
    }
    if vocab_size <= minimum {
        return Err(DataError::Invalid(format!(
            "vocab size {vocab_size} is too small: a byte-level BPE needs more than {minimum} entries (256 byte symbols plus the special tokens); pass a larger --vocab-size"
        )));
    }
    let tokenizer_error = |e: tokenizers::Error| DataError::Tokenizer {
        path: output.to_path_buf(),
        message: e.to_string(),
    };

    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials.iter().map(|token| AddedToken::from(token.as_str(), true)).collect())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);

    let mut tokenizer = Tokenizer::new(BPE::default());
    // NOTE: no prefix space, so a document encodes to the same ids whether it
    // starts a window or follows an EOS token.
    let byte_level = ByteLevel::default().add_prefix_space(false);
    tokenizer.with_pre_tokenizer(Some(byte_level));
    tokenizer.with_decoder(Some(byte_level));
    tokenizer.with_post_processor(Some(byte_level));
    tokenizer
        .train(&mut trainer, documents.iter())
        .map_err(tokenizer_error)?;

    if let Some(parent) = output.parent() {
        std::fs::create_dir_all(parent).map_err(|e| DataError::io("create directory", parent, e))?;
    }
    let temporary = output.with_extension("json.partial");
    tokenizer.save(&temporary, true).map_err(tokenizer_error)?;
    std::fs::rename(&temporary, output).map_err(|e| DataError::io("rename tokenizer to", output, e))?;
    TextTokenizer::load(output)
}

/// Lowercase hexadecimal SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
