//! DAG-MoE language models as burn modules: a Llama-style decoder whose FFN
//! layers can be Mixture-of-Experts layers aggregated by a weighted sum or by
//! a learned DAG over the K routed experts (DAG-MoE, arXiv 2606.01062).

pub mod config;
pub mod dag;
pub mod device;
pub mod layers;
pub mod model;
pub mod moe;

#[cfg(test)]
mod tests;

pub use config::{Aggregation, ConfigError, DagConfig, DagNorm, EdgeGate, ModelConfig, MoeConfig, Precision};
pub use device::{check_device_name, parse_device};
pub use model::{DagMoeModel, ModelOutput, ParamCounts, RoutingStats, token_nll};
pub use moe::Dispatch;
