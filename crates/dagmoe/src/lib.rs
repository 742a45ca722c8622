//! dagmoe: pretrain, fine-tune and evaluate Mixture-of-Experts language
//! models, DAG-MoE first. The `dagmoe` binary parses arguments and calls the
//! functions here; tests call them directly.

pub mod batches;
pub mod checkpoint;
pub mod cloze;
pub mod commands;
pub mod config;
pub mod error;
pub mod eval;
pub mod generate;
pub mod metrics;
pub mod optim;
pub mod params;
pub mod resume;
pub mod tasks;
pub mod train;

pub use config::{RunConfig, load_config, parse_config};
pub use error::{Error, Result};
pub use train::{RunSummary, Start, train};
