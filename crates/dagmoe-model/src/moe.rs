//! Mixture-of-Experts layer: router, experts, sparse dispatch and aggregation.
//!
//! Shape letters: t tokens, d model width, e experts, k top-k slots.
//!
//! Routing is dropless token-choice top-K. The router's indices are read to
//! the host once per layer to group the `t * k` assignments by expert; each
//! expert then runs once on its contiguous group, so the cost follows `k`,
//! not `n_experts`. Gate values stay on the device and keep their gradient.

use burn::module::{Module, Param};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::config::{Aggregation, DagConfig, MoeConfig, Precision};
use crate::dag::{DagAggregation, MlpMix};
use crate::layers::{SwiGlu, normal_weight, project};

/// Auxiliary losses of one MoE layer, unscaled.
#[derive(Debug, Clone)]
pub struct RouterLosses {
    /// Switch Transformer load-balancing loss `n_experts * sum_j f_j P_j`, shape `[1]`.
    pub load_balance: Tensor<1>,
    /// ST-MoE router z-loss, the mean of `logsumexp(logits)^2`, shape `[1]`.
    pub z_loss: Tensor<1>,
}

/// Output of an MoE layer.
#[derive(Debug, Clone)]
pub struct MoeOutput {
    pub y_td: Tensor<2>,
    pub losses: RouterLosses,
    /// Assignments per expert in this batch (host values, for metrics).
    pub tokens_per_expert: Vec<usize>,
    /// DAG edge weights averaged over tokens, one detached `[k, k]` per level
    /// (row i, column j: the edge j -> i); empty for a weighted sum.
    pub mean_edges: Vec<Tensor<2>>,
}

/// How node outputs are computed, for testing the sparse path against the naive one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatch {
    /// Each expert runs on the tokens routed to it.
    Sparse,
    /// Every expert runs on every token and the routed outputs are gathered.
    Dense,
}

#[derive(Module, Debug)]
pub struct MoeLayer {
    /// `[d, e]`
    pub router: Param<Tensor<2>>,
    pub experts: Vec<SwiGlu>,
    pub shared_expert: Option<SwiGlu>,
    pub dag: Option<DagAggregation>,
    pub mlp_mix: Option<MlpMix>,
    /// `[d, e]` routers of Chain-of-Experts rounds after the first.
    pub round_routers: Vec<Param<Tensor<2>>>,
    top_k: usize,
    renormalize_gates: bool,
    inject_input: bool,
    scale_injection: bool,
}

impl MoeLayer {
    pub fn new(d: usize, moe: &MoeConfig, dag: &DagConfig, eps: f64, std: f64, device: &Device) -> Self {
        let is_dag = moe.aggregation == Aggregation::Dag;
        let extra_rounds = if moe.aggregation == Aggregation::ChainOfExperts { moe.rounds - 1 } else { 0 };
        Self {
            router: normal_weight(d, moe.n_experts, std, device),
            experts: (0..moe.n_experts).map(|_| SwiGlu::new(d, moe.d_expert, std, device)).collect(),
            shared_expert: (moe.shared_expert_hidden > 0).then(|| SwiGlu::new(d, moe.shared_expert_hidden, std, device)),
            dag: is_dag.then(|| DagAggregation::new(d, dag, eps, std, device)),
            mlp_mix: (moe.aggregation == Aggregation::MlpMix).then(|| MlpMix::new(d, dag, eps, std, device)),
            round_routers: (0..extra_rounds).map(|_| normal_weight(d, moe.n_experts, std, device)).collect(),
            top_k: moe.top_k,
            renormalize_gates: moe.renormalize_gates,
            inject_input: is_dag && dag.inject_input,
            scale_injection: dag.scale_injection,
        }
    }

    pub fn n_experts(&self) -> usize {
        self.experts.len()
    }

    /// Sets the precision of the experts' and the aggregation's products.
    /// The router stays float32.
    pub fn set_precision(&mut self, precision: Precision) {
        for expert in self.experts.iter_mut().chain(&mut self.shared_expert) {
            expert.precision = precision;
        }
        for level in self.dag.iter_mut().flat_map(|dag| &mut dag.levels) {
            level.precision = precision;
        }
        if let Some(mix) = &mut self.mlp_mix {
            mix.precision = precision;
        }
    }

    /// # Shapes
    /// - x: `[t, d]` normalized hidden states, output `y`: `[t, d]`
    pub fn forward(&self, x_td: Tensor<2>, dispatch: Dispatch) -> MoeOutput {
        if self.round_routers.is_empty() {
            return self.forward_round(x_td, &self.router, dispatch);
        }

        // Chain-of-Experts: round r routes x_r with its own router over the
        // shared experts, x_{r+1} = x_r + y_r, and the layer returns
        // x_R - x_0 for the block's residual. Aux losses average over rounds.
        let rounds = 1 + self.round_routers.len();
        let mut state_td = x_td.clone();
        let mut total: Option<MoeOutput> = None;
        for router in std::iter::once(&self.router).chain(&self.round_routers) {
            let round = self.forward_round(state_td.clone(), router, dispatch);
            state_td = state_td + round.y_td.clone();
            total = Some(match total {
                None => round,
                Some(sum) => MoeOutput {
                    y_td: sum.y_td + round.y_td,
                    losses: RouterLosses {
                        load_balance: sum.losses.load_balance + round.losses.load_balance,
                        z_loss: sum.losses.z_loss + round.losses.z_loss,
                    },
                    tokens_per_expert: sum.tokens_per_expert.iter().zip(&round.tokens_per_expert).map(|(a, b)| a + b).collect(),
                    mean_edges: Vec::new(),
                },
            });
        }
        let mut output = total.expect("at least one round");
        output.losses.load_balance = output.losses.load_balance.div_scalar(rounds as f64);
        output.losses.z_loss = output.losses.z_loss.div_scalar(rounds as f64);
        output
    }

    /// One routing round with `router`: top-K experts and the configured aggregation.
    fn forward_round(&self, x_td: Tensor<2>, router: &Param<Tensor<2>>, dispatch: Dispatch) -> MoeOutput {
        let [t, d] = x_td.dims();
        let k = self.top_k;
        let e = self.n_experts();

        // Router: softmax over experts, then the K largest probabilities.
        let logits_te = project(x_td.clone(), router);
        let probs_te = softmax(logits_te.clone(), 1);
        let (gates_tk, experts_tk) = probs_te.clone().topk_with_indices(k, 1);
        let gates_tk = if self.renormalize_gates { gates_tk.clone().div(gates_tk.sum_dim(1)) } else { gates_tk };

        let assignment: Vec<i64> = experts_tk.to_data().iter::<i64>().collect();
        let mut tokens_per_expert = vec![0usize; e];
        for &expert in &assignment {
            tokens_per_expert[expert as usize] += 1;
        }

        let nodes_tkd = match dispatch {
            Dispatch::Sparse => self.expert_outputs_sparse(x_td.clone(), &assignment, &tokens_per_expert),
            Dispatch::Dense => self.expert_outputs_dense(x_td.clone(), experts_tk),
        };
        let weighted_tkd = nodes_tkd.mul(gates_tk.unsqueeze_dim(2));

        let (mut y_td, mean_edges) = match (&self.dag, &self.mlp_mix) {
            (Some(dag), _) => {
                // NOTE: the injected `x` is the MoE input, the normalized hidden
                // state, and the block keeps its outer residual `h' = a + y`.
                let nodes_tkd = if self.inject_input {
                    let scale = if self.scale_injection { 1.0 / k as f64 } else { 1.0 };
                    weighted_tkd + x_td.clone().mul_scalar(scale).unsqueeze_dim::<3>(1)
                } else {
                    weighted_tkd
                };
                dag.forward(nodes_tkd)
            }
            (None, Some(mix)) => (mix.forward(weighted_tkd), Vec::new()),
            (None, None) => (weighted_tkd.sum_dim(1).reshape([t, d]), Vec::new()),
        };
        if let Some(shared) = &self.shared_expert {
            y_td = y_td + shared.forward(x_td);
        }

        let losses = router_losses(logits_te, probs_te, &tokens_per_expert, t * k);
        MoeOutput { y_td, losses, tokens_per_expert, mean_edges }
    }

    /// Groups the `t * k` assignments by expert, runs each expert once on its
    /// group and returns the outputs in `(token, slot)` order.
    fn expert_outputs_sparse(&self, x_td: Tensor<2>, assignment: &[i64], tokens_per_expert: &[usize]) -> Tensor<3> {
        let [t, d] = x_td.dims();
        let k = self.top_k;
        let device = x_td.device();

        // Counting sort of the flat slots `t * k + i` by expert.
        let mut offsets = vec![0usize; tokens_per_expert.len()];
        for expert in 1..offsets.len() {
            offsets[expert] = offsets[expert - 1] + tokens_per_expert[expert - 1];
        }
        let mut sorted_tokens = vec![0i64; t * k];
        let mut position_of_slot = vec![0i64; t * k];
        let mut next = offsets.clone();
        for (slot, &expert) in assignment.iter().enumerate() {
            let position = next[expert as usize];
            next[expert as usize] += 1;
            sorted_tokens[position] = (slot / k) as i64;
            position_of_slot[slot] = position as i64;
        }
        let index = |values: Vec<i64>| Tensor::<1, Int>::from_data(TensorData::new(values, [t * k]), &device);

        let x_sorted = x_td.select(0, index(sorted_tokens));
        // NOTE: an expert with no token is skipped rather than run on an empty
        // tensor, because backward through an empty tensor panics on libtorch.
        let outputs: Vec<Tensor<2>> = self
            .experts
            .iter()
            .zip(offsets.iter().zip(tokens_per_expert))
            .filter(|(_, (_, count))| **count > 0)
            .map(|(expert, (&start, &count))| expert.forward(x_sorted.clone().narrow(0, start, count)))
            .collect();
        let out_sorted = Tensor::cat(outputs, 0);
        out_sorted.select(0, index(position_of_slot)).reshape([t, k, d])
    }

    /// Naive reference: every expert on every token, then a gather of the routed outputs.
    fn expert_outputs_dense(&self, x_td: Tensor<2>, experts_tk: Tensor<2, Int>) -> Tensor<3> {
        let [t, d] = x_td.dims();
        let k = self.top_k;
        let all_ted = Tensor::stack::<3>(self.experts.iter().map(|expert| expert.forward(x_td.clone())).collect(), 1);
        let index_tkd = experts_tk.unsqueeze_dim::<3>(2).expand([t, k, d]);
        all_ted.gather(1, index_tkd)
    }
}

/// Load-balancing loss and z-loss of one layer.
///
/// `f_j` (the fraction of assignments routed to expert j) is a count and
/// carries no gradient; `P_j` (the mean router probability) does.
fn router_losses(logits_te: Tensor<2>, probs_te: Tensor<2>, tokens_per_expert: &[usize], assignments: usize) -> RouterLosses {
    let e = tokens_per_expert.len();
    let device = probs_te.device();
    let fractions: Vec<f32> = tokens_per_expert.iter().map(|&n| n as f32 / assignments as f32).collect();
    let fraction_1e = Tensor::<1>::from_floats(fractions.as_slice(), &device).unsqueeze::<2>();
    let mean_prob_1e = probs_te.mean_dim(0);
    let load_balance = mean_prob_1e.mul(fraction_1e).sum().mul_scalar(e as f64);

    let max_t1 = logits_te.clone().max_dim(1).detach();
    let logsumexp_t1 = logits_te.sub(max_t1.clone()).exp().sum_dim(1).log().add(max_t1);
    let z_loss = logsumexp_t1.square().mean();
    RouterLosses { load_balance, z_loss }
}
