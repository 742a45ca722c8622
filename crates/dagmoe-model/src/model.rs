//! The decoder: token embedding, blocks of attention and FFN or MoE, final norm, LM head.
//!
//! Shape letters: b batch, t time, d model width, v vocabulary.
//!
//! ```text
//! a  = h + Attention(RMSNorm(h))
//! h' = a + FFN(RMSNorm(a))        FFN is a dense SwiGLU or an MoE layer
//! ```

use burn::module::{Module, Param};
use burn::tensor::{Device, Distribution, Int, Tensor};

use crate::config::{Aggregation, ConfigError, ModelConfig, Precision};
use crate::dag::{DagLevel, MlpMix};
use crate::layers::{Attention, RmsNorm, Rotary, SwiGlu, normal_weight, project_at};
use crate::moe::{Dispatch, MoeLayer};

#[derive(Module, Debug)]
pub struct Block {
    pub attention_norm: RmsNorm,
    pub attention: Attention,
    pub ffn_norm: RmsNorm,
    pub dense: Option<SwiGlu>,
    pub moe: Option<MoeLayer>,
}

/// Per-layer routing statistics of one forward pass, for metrics.
#[derive(Debug, Clone, Default)]
pub struct RoutingStats {
    /// For each MoE layer, assignments per expert.
    pub tokens_per_expert: Vec<Vec<usize>>,
    /// For each MoE layer, the DAG edge weights averaged over tokens: one
    /// detached `[k, k]` tensor per level, none for a weighted sum.
    pub mean_edges: Vec<Vec<Tensor<2>>>,
}

/// Output of a forward pass.
#[derive(Debug, Clone)]
pub struct ModelOutput {
    pub logits_btv: Tensor<3>,
    /// Load-balancing loss averaged over MoE layers, unscaled, shape `[1]`.
    pub load_balance: Tensor<1>,
    /// Router z-loss averaged over MoE layers, unscaled, shape `[1]`.
    pub z_loss: Tensor<1>,
    pub routing: RoutingStats,
}

#[derive(Module, Debug)]
pub struct DagMoeModel {
    /// `[v, d]`
    pub embedding: Param<Tensor<2>>,
    pub blocks: Vec<Block>,
    pub final_norm: RmsNorm,
    /// `[d, v]`; absent when the head is tied to the embedding.
    pub lm_head: Option<Param<Tensor<2>>>,
    rotary: Rotary,
    #[module(skip)]
    precision: Precision,
}

impl DagMoeModel {
    /// Builds a model with freshly initialized weights for sequences of up to `max_len` tokens.
    pub fn new(config: &ModelConfig, max_len: usize, device: &Device) -> Result<Self, ConfigError> {
        config.validate()?;
        let d = config.d_model;
        let std = config.init_std;
        let eps = config.norm_eps;
        let blocks = (0..config.n_layers)
            .map(|layer| {
                let is_moe = config.is_moe_layer(layer);
                Block {
                    attention_norm: RmsNorm::new(d, eps, device),
                    attention: Attention::new(d, config.n_heads, config.n_kv_heads, std, device),
                    ffn_norm: RmsNorm::new(d, eps, device),
                    dense: (!is_moe).then(|| SwiGlu::new(d, config.d_ff, std, device)),
                    moe: is_moe.then(|| MoeLayer::new(d, &config.moe, &config.dag, eps, std, device)),
                }
            })
            .collect();
        let embedding = Param::from_tensor(Tensor::random([config.vocab_size, d], Distribution::Normal(0.0, std), device));
        Ok(Self {
            embedding,
            blocks,
            final_norm: RmsNorm::new(d, eps, device),
            lm_head: (!config.tie_embeddings).then(|| normal_weight(d, config.vocab_size, std, device)),
            rotary: Rotary::new(config.head_dim(), max_len, config.rope_theta, device),
            precision: Precision::F32,
        })
    }

    /// Returns the model with its matrix products computed at `precision`
    /// (see [`Precision`]). A new model computes in float32.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        for block in &mut self.blocks {
            block.attention.precision = precision;
            if let Some(dense) = &mut block.dense {
                dense.precision = precision;
            }
            if let Some(moe) = &mut block.moe {
                moe.set_precision(precision);
            }
        }
        self
    }

    /// Maximum sequence length the rotary tables cover.
    pub fn max_len(&self) -> usize {
        self.rotary.max_len()
    }

    /// # Shapes
    /// - tokens: `[b, t]` with `t <= max_len`, output logits: `[b, t, v]`
    pub fn forward(&self, tokens_bt: Tensor<2, Int>) -> ModelOutput {
        self.forward_with(tokens_bt, Dispatch::Sparse)
    }

    /// [`forward`](Self::forward) with a chosen expert dispatch, for tests of the sparse path.
    pub fn forward_with(&self, tokens_bt: Tensor<2, Int>, dispatch: Dispatch) -> ModelOutput {
        let [b, t] = tokens_bt.dims();
        let device = tokens_bt.device();
        let [_, d] = self.embedding.dims();
        let mut h_btd = self.embedding.val().select(0, tokens_bt.reshape([b * t])).reshape([b, t, d]);

        let mut load_balance = Tensor::<1>::zeros([1], &device);
        let mut z_loss = Tensor::<1>::zeros([1], &device);
        let mut routing = RoutingStats::default();
        for block in &self.blocks {
            let a_btd = h_btd.clone() + block.attention.forward(block.attention_norm.forward(h_btd), &self.rotary);
            let x_btd = block.ffn_norm.forward(a_btd.clone());
            let ffn_btd = match (&block.dense, &block.moe) {
                (Some(dense), _) => dense.forward(x_btd),
                (None, Some(moe)) => {
                    let output = moe.forward(x_btd.reshape([b * t, d]), dispatch);
                    load_balance = load_balance + output.losses.load_balance;
                    z_loss = z_loss + output.losses.z_loss;
                    routing.tokens_per_expert.push(output.tokens_per_expert);
                    routing.mean_edges.push(output.mean_edges);
                    output.y_td.reshape([b, t, d])
                }
                (None, None) => unreachable!("every block has a dense FFN or an MoE layer"),
            };
            h_btd = a_btd + ffn_btd;
        }

        let moe_layers = routing.tokens_per_expert.len().max(1) as f64;
        let h_btd = self.final_norm.forward(h_btd);
        let logits_btv = match &self.lm_head {
            Some(head) => project_at(h_btd, head.val(), self.precision),
            None => project_at(h_btd, self.embedding.val().transpose(), self.precision),
        };
        ModelOutput {
            logits_btv,
            load_balance: load_balance.div_scalar(moe_layers),
            z_loss: z_loss.div_scalar(moe_layers),
            routing,
        }
    }
}

/// Negative log-likelihood of each target token.
///
/// # Shapes
/// - logits: `[b, t, v]`, targets: `[b, t]`, output: `[b, t]`
pub fn token_nll(logits_btv: Tensor<3>, targets_bt: Tensor<2, Int>) -> Tensor<2> {
    let [b, t, _] = logits_btv.dims();
    // log-sum-exp minus the target logit: the same value as gathering from
    // log_softmax, without materialising the [b, t, v] log-probabilities and
    // their gradient, two fewer vocabulary-sized tensors per step.
    let max_bt1 = logits_btv.clone().detach().max_dim(2);
    let shifted_btv = logits_btv.clone() - max_bt1.clone();
    let log_sum_exp_bt1 = shifted_btv.exp().sum_dim(2).log() + max_bt1;
    let target_bt1 = logits_btv.gather(2, targets_bt.unsqueeze_dim(2));
    (log_sum_exp_bt1 - target_bt1).reshape([b, t])
}

/// Parameter counts of a configuration, computed without building the model.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ParamCounts {
    pub total: usize,
    /// Parameters used for one token: everything but the experts it is not routed to.
    pub active_per_token: usize,
    pub embedding: usize,
    pub lm_head: usize,
    pub attention: usize,
    pub norms: usize,
    pub dense_ffn: usize,
    pub router: usize,
    pub experts: usize,
    pub shared_experts: usize,
    /// DAG levels, or the MLP of the "mlp-mix" ablation.
    pub dag: usize,
}

impl ParamCounts {
    pub fn of(config: &ModelConfig) -> Self {
        let d = config.d_model;
        let head_dim = config.head_dim();
        let moe_layers = config.moe_layer_count();
        let dense_layers = config.n_layers - moe_layers;
        let moe = &config.moe;

        let embedding = config.vocab_size * d;
        let lm_head = if config.tie_embeddings { 0 } else { d * config.vocab_size };
        let attention = config.n_layers * (2 * d * config.n_heads * head_dim + 2 * d * config.n_kv_heads * head_dim);
        let norms = (2 * config.n_layers + 1) * d;
        let dense_ffn = dense_layers * SwiGlu::param_count(d, config.d_ff);
        let routers_per_layer = if moe.aggregation == Aggregation::ChainOfExperts { moe.rounds } else { 1 };
        let router = moe_layers * routers_per_layer * d * moe.n_experts;
        let expert = SwiGlu::param_count(d, moe.d_expert);
        let experts = moe_layers * moe.n_experts * expert;
        let shared_experts = moe_layers * SwiGlu::param_count(d, moe.shared_expert_hidden);
        let dag = match moe.aggregation {
            Aggregation::Dag => moe_layers * config.dag.depth * DagLevel::param_count(d, &config.dag),
            Aggregation::MlpMix => moe_layers * MlpMix::param_count(d, &config.dag),
            Aggregation::WeightedSum | Aggregation::ChainOfExperts => 0,
        };
        let total = embedding + lm_head + attention + norms + dense_ffn + router + experts + shared_experts + dag;
        let inactive = moe_layers * (moe.n_experts - moe.top_k) * expert;
        Self {
            total,
            active_per_token: total - inactive,
            embedding,
            lm_head,
            attention,
            norms,
            dense_ffn,
            router,
            experts,
            shared_experts,
            dag,
        }
    }
}
