use std::path::PathBuf;

/// Errors raised while reading corpora, tokenizers, shards and manifests.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("failed to {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("tokenizer error for {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },

    #[error("invalid manifest {path}: {message}")]
    Manifest { path: PathBuf, message: String },

    #[error("invalid shard {path}: {message}")]
    Shard { path: PathBuf, message: String },

    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, DataError>;

impl DataError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { action, path: path.into(), source }
    }
}
