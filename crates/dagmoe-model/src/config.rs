//! Model configuration, validated before any tensor is allocated.

use serde::{Deserialize, Serialize};

/// How an MoE layer combines the outputs of a token's K experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Aggregation {
    /// `y = sum_i g_i E_k[i](x)`, plus the shared expert when one is configured.
    WeightedSum,
    /// DAG aggregation of the K node outputs, `model.dag` sets its depth and width.
    Dag,
    /// Chain-of-Experts: `model.moe.rounds` routing rounds in one layer, each
    /// with its own router and re-routing the previous round's output.
    ChainOfExperts,
    /// The K node outputs mixed by an unstructured MLP through `model.dag.d_g`
    /// (the paper's negative ablation).
    MlpMix,
}

/// Form of a DAG edge weight.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EdgeGate {
    /// One scalar per edge: a learned K x K adjacency per token.
    #[default]
    Scalar,
    /// A `d_g` vector per edge, gating each message channel.
    Vector,
}

/// The normalization applied to each node before a DAG level's down-projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DagNorm {
    LayerNorm,
    RmsNorm,
}

/// Number format of the matrix products in a forward and backward pass.
///
/// Weights, gradients and optimizer state stay float32 in both cases. With
/// `Bf16` each projection (attention, experts, DAG, LM head) rounds its
/// input and weight to bfloat16 and returns float32. The scores and context
/// products of attention do the same around a float32 softmax. The router,
/// norms, residual stream and losses stay float32, the split that
/// `torch.autocast` makes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    /// Every precision, in the order help text lists them.
    pub const ALL: [Precision; 2] = [Precision::F32, Precision::Bf16];

    /// Returns the config value that names this precision.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|precision| precision.name() == name)
            .ok_or_else(|| format!("unknown precision {name:?}; use \"f32\" or \"bf16\""))
    }
}

/// `[model]`: the decoder backbone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Embedding rows; must equal the tokenizer's vocabulary size.
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// Key/value heads for grouped-query attention; `n_heads` gives plain multi-head attention.
    pub n_kv_heads: usize,
    /// Hidden width of the dense SwiGLU FFN in blocks without an MoE layer.
    pub d_ff: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub tie_embeddings: bool,
    /// Standard deviation of the normal initialization of weight matrices.
    #[serde(default = "default_init_std")]
    pub init_std: f64,
    pub moe: MoeConfig,
    #[serde(default)]
    pub dag: DagConfig,
}

/// `[model.moe]`: router, experts and aggregation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeConfig {
    pub n_experts: usize,
    pub top_k: usize,
    /// Hidden width of each SwiGLU expert.
    pub d_expert: usize,
    /// Block `i` gets an MoE layer when `(i + 1) % every == 0`; 1 puts one in every block.
    #[serde(default = "default_every")]
    pub every: usize,
    /// Hidden width of the always-on shared expert; 0 disables it.
    #[serde(default)]
    pub shared_expert_hidden: usize,
    pub aggregation: Aggregation,
    /// Renormalize the K selected gates to sum to one.
    #[serde(default)]
    pub renormalize_gates: bool,
    /// Routing rounds of the "chain-of-experts" aggregation.
    #[serde(default = "default_rounds")]
    pub rounds: usize,
    /// Coefficient of the load-balancing loss (averaged over MoE layers).
    #[serde(default = "default_lb_coef")]
    pub load_balance_coef: f64,
    /// Coefficient of the router z-loss (averaged over MoE layers).
    #[serde(default = "default_z_coef")]
    pub z_loss_coef: f64,
}

/// `[model.dag]`: the DAG aggregation, used when `model.moe.aggregation = "dag"`
/// (`d_g` and `norm` also shape the "mlp-mix" ablation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DagConfig {
    /// Number of message-passing levels `L`; 0 keeps only the token injection.
    pub depth: usize,
    /// Width `d_g` of the low-dimensional messages.
    pub d_g: usize,
    /// Add `x / K` (or `x` without `scale_injection`) to every node at level 0.
    pub inject_input: bool,
    /// Scale the injected input by `1 / K` so the K copies add up to `x`.
    pub scale_injection: bool,
    pub norm: DagNorm,
    #[serde(default)]
    pub edge_gate: EdgeGate,
}

impl Default for DagConfig {
    fn default() -> Self {
        Self {
            depth: 1,
            d_g: 64,
            inject_input: true,
            scale_injection: true,
            norm: DagNorm::LayerNorm,
            edge_gate: EdgeGate::Scalar,
        }
    }
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_init_std() -> f64 {
    0.02
}
fn default_rounds() -> usize {
    2
}
fn default_every() -> usize {
    1
}
fn default_lb_coef() -> f64 {
    0.01
}
fn default_z_coef() -> f64 {
    0.001
}

/// A configuration value that cannot build a model.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid {field} = {value}: {fix}")]
pub struct ConfigError {
    pub field: &'static str,
    pub value: String,
    pub fix: String,
}

fn reject(field: &'static str, value: impl ToString, fix: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError { field, value: value.to_string(), fix: fix.into() })
}

impl ModelConfig {
    /// Checks every field that could yield an impossible or degenerate model.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("model.vocab_size", self.vocab_size),
            ("model.d_model", self.d_model),
            ("model.n_layers", self.n_layers),
            ("model.n_heads", self.n_heads),
            ("model.n_kv_heads", self.n_kv_heads),
            ("model.d_ff", self.d_ff),
            ("model.moe.n_experts", self.moe.n_experts),
            ("model.moe.top_k", self.moe.top_k),
            ("model.moe.d_expert", self.moe.d_expert),
            ("model.moe.every", self.moe.every),
        ];
        for (field, value) in positive {
            if value == 0 {
                reject(field, value, "use a positive integer")?;
            }
        }
        if self.d_model % self.n_heads != 0 {
            reject("model.d_model", self.d_model, format!("must be divisible by model.n_heads = {}", self.n_heads))?;
        }
        let head_dim = self.d_model / self.n_heads;
        if head_dim % 2 != 0 {
            reject("model.n_heads", self.n_heads, format!("d_model / n_heads = {head_dim} must be even for rotary embeddings"))?;
        }
        if self.n_heads % self.n_kv_heads != 0 {
            reject("model.n_kv_heads", self.n_kv_heads, format!("must divide model.n_heads = {}", self.n_heads))?;
        }
        if self.moe.top_k > self.moe.n_experts {
            reject("model.moe.top_k", self.moe.top_k, format!("must be at most model.moe.n_experts = {}", self.moe.n_experts))?;
        }
        if self.moe.every > self.n_layers {
            reject("model.moe.every", self.moe.every, format!("must be at most model.n_layers = {} or no block gets an MoE layer", self.n_layers))?;
        }
        let nonnegative = [
            ("model.moe.load_balance_coef", self.moe.load_balance_coef),
            ("model.moe.z_loss_coef", self.moe.z_loss_coef),
            ("model.rope_theta", self.rope_theta),
            ("model.norm_eps", self.norm_eps),
            ("model.init_std", self.init_std),
        ];
        for (field, value) in nonnegative {
            if !(value.is_finite() && value >= 0.0) {
                reject(field, value, "use a finite value >= 0")?;
            }
        }
        if self.rope_theta <= 0.0 {
            reject("model.rope_theta", self.rope_theta, "use a positive base such as 10000")?;
        }
        if self.moe.aggregation == Aggregation::ChainOfExperts && self.moe.rounds == 0 {
            reject("model.moe.rounds", self.moe.rounds, "use at least 1 routing round")?;
        }
        if matches!(self.moe.aggregation, Aggregation::Dag | Aggregation::MlpMix) && self.dag.d_g == 0 {
            reject("model.dag.d_g", self.dag.d_g, "use a positive width such as 64")?;
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// Whether block `layer` (0-based) has an MoE layer rather than a dense FFN.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        (layer + 1) % self.moe.every == 0
    }

    pub fn moe_layer_count(&self) -> usize {
        (0..self.n_layers).filter(|&i| self.is_moe_layer(i)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn tiny() -> ModelConfig {
        ModelConfig {
            vocab_size: 61,
            d_model: 24,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            d_ff: 40,
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
            tie_embeddings: false,
            init_std: 0.02,
            moe: MoeConfig {
                n_experts: 5,
                top_k: 3,
                d_expert: 12,
                every: 1,
                shared_expert_hidden: 0,
                aggregation: Aggregation::Dag,
                renormalize_gates: false,
                rounds: 2,
                load_balance_coef: 0.01,
                z_loss_coef: 0.001,
            },
            dag: DagConfig { depth: 2, d_g: 7, ..DagConfig::default() },
        }
    }

    #[test]
    fn validate_rejects_impossible_values() {
        let cases: Vec<(&str, Box<dyn Fn(&mut ModelConfig)>)> = vec![
            ("model.moe.top_k", Box::new(|c| c.moe.top_k = 6)),
            ("model.d_model", Box::new(|c| c.d_model = 26)),
            ("model.n_kv_heads", Box::new(|c| c.n_kv_heads = 3)),
            ("model.dag.d_g", Box::new(|c| c.dag.d_g = 0)),
            ("model.moe.load_balance_coef", Box::new(|c| c.moe.load_balance_coef = -0.1)),
            ("model.moe.every", Box::new(|c| c.moe.every = 3)),
        ];
        for (field, mutate) in cases {
            let mut config = tiny();
            mutate(&mut config);
            let error = config.validate().expect_err(field);
            assert_eq!(error.field, field);
        }
        assert!(tiny().validate().is_ok());
    }
}
