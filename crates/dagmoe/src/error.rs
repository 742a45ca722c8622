use std::path::PathBuf;

/// Errors of the dagmoe library. The binary maps [`Error::Config`] and
/// [`Error::Usage`] to exit code 2 and everything else to 1.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An invalid configuration or override.
    #[error("{0}")]
    Config(String),

    /// An invalid command-line value or a request that cannot be carried out as given.
    #[error("{0}")]
    Usage(String),

    #[error("failed to {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(transparent)]
    Data(#[from] dagmoe_data::DataError),

    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },

    /// Training stopped because a value was not finite.
    #[error("{0}")]
    Diverged(String),

    /// SIGINT or SIGTERM stopped training after a step and a checkpoint.
    #[error("interrupted after step {step}; checkpoint saved to {}. Continue with the same command plus --resume", checkpoint.display())]
    Interrupted { step: u64, checkpoint: PathBuf },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { action, path: path.into(), source }
    }

    pub(crate) fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Checkpoint { path: path.into(), message: message.into() }
    }

    /// Formats `error` with its chain of causes, for messages that wrap it in a string.
    pub(crate) fn with_causes(error: &dyn std::error::Error) -> String {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        message
    }

    /// Exit code documented in the README: 2 for usage and config errors,
    /// 130 after an interruption with a saved checkpoint, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) | Error::Usage(_) | Error::Data(dagmoe_data::DataError::Invalid(_)) => 2,
            Error::Interrupted { .. } => 130,
            _ => 1,
        }
    }
}
