//! Data pipeline for dagmoe: byte-level BPE tokenizers, binary token shards
//! with a JSON manifest, and a seeded streaming loader of fixed-length windows.
//!
//! The crate has no tensor dependency: batches are plain `u32` token ids that
//! the trainer moves to its device.

mod error;
pub mod loader;
pub mod manifest;
pub mod prefetch;
pub mod prepare;
pub mod rng;
pub mod sft;
pub mod sources;
pub mod shard;
pub mod tokenizer;

pub use error::{DataError, Result};
pub use loader::{Batch, EvalBatches, LoaderCursor, MixtureComponent, TokenStream, TrainCursor, TrainLoader};
pub use prefetch::{BatchProducer, Prefetcher};
pub use manifest::{Manifest, ShardInfo, SplitInfo};
pub use prepare::{PrepareOptions, PrepareSummary, prepare_corpus};
pub use sft::{SftExample, SftLoader, load_sft};
pub use tokenizer::{EOS_TOKEN, EOS_TOKEN_CANDIDATES, TextTokenizer, sha256_hex, train_bpe_tokenizer};
