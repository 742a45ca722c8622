//! DAG aggregation of the K expert outputs of each token.
//!
//! Shape letters: t tokens, k top-k slots (graph nodes), d model width,
//! g message width `d_g`.
//!
//! Level `l` of the graph updates every node from all K nodes of level `l - 1`:
//!
//! ```text
//! u_i   = LN(x_i) W_down                        [g]
//! e_ij  = sigmoid([u_i; u_j] W_edge + b_edge)   soft edge j -> i, a scalar
//! m_ij  = e_ij * ([u_i; u_j] W_node)            [g]
//! x_i'  = x_i + (sum_j m_ij) W_up               W_up starts at zero
//! ```
//!
//! Readings of points the paper leaves open: one scalar per edge by default
//! (a learned K x K adjacency; `edge_gate = "vector"` gives a `d_g` vector);
//! no biases except on `W_edge`; `LN` is LayerNorm (RMSNorm as an option);
//! the weights of a level are shared by all K node positions, so the router
//! rank enters only through the gates.
//!
//! The concatenation splits: `[u_i; u_j] W = u_i W_a + u_j W_b`. The K x K
//! pair terms therefore cost two `[g, g]` products per node and one
//! `[k, k] x [k, g]` product per token, and no `[t, k, k, 2g]` tensor is built.

use burn::module::{Module, Param};
use burn::tensor::activation::{sigmoid, silu};
use burn::tensor::{Device, Tensor};

use crate::config::{DagConfig, DagNorm, EdgeGate, Precision};
use crate::layers::{LayerNorm, RmsNorm, normal_weight, project_at};

/// One message-passing level of the DAG.
#[derive(Module, Debug)]
pub struct DagLevel {
    pub layer_norm: Option<LayerNorm>,
    pub rms_norm: Option<RmsNorm>,
    /// `[d, g]`
    pub w_down: Param<Tensor<2>>,
    /// `[2g, 1]`, or `[2g, g]` for vector edge gates: rows `0..g` act on the
    /// receiving node `i`, rows `g..2g` on the sender `j`.
    pub w_edge: Param<Tensor<2>>,
    /// `[1]`, or `[g]` for vector edge gates.
    pub b_edge: Param<Tensor<1>>,
    /// `[2g, g]`, split like `w_edge`.
    pub w_node: Param<Tensor<2>>,
    /// `[g, d]`, zero at initialization so a new DAG starts as the weighted sum plus `x`.
    pub w_up: Param<Tensor<2>>,
    #[module(skip)]
    pub precision: Precision,
}

impl DagLevel {
    pub fn new(d: usize, config: &DagConfig, eps: f64, std: f64, device: &Device) -> Self {
        let g = config.d_g;
        let edge_width = edge_width(config);
        Self {
            layer_norm: (config.norm == DagNorm::LayerNorm).then(|| LayerNorm::new(d, eps, device)),
            rms_norm: (config.norm == DagNorm::RmsNorm).then(|| RmsNorm::new(d, eps, device)),
            w_down: normal_weight(d, g, std, device),
            w_edge: normal_weight(2 * g, edge_width, std, device),
            b_edge: Param::from_tensor(Tensor::zeros([edge_width], device)),
            w_node: normal_weight(2 * g, g, std, device),
            w_up: Param::from_tensor(Tensor::zeros([g, d], device)),
            precision: Precision::F32,
        }
    }

    /// Parameters of one level.
    pub fn param_count(d: usize, config: &DagConfig) -> usize {
        let g = config.d_g;
        let edge = (2 * g + 1) * edge_width(config);
        norm_param_count(d, config.norm) + d * g + edge + 2 * g * g + g * d
    }

    /// Returns the updated node states and the edge weights `e[t, i, j]`.
    ///
    /// # Shapes
    /// - x: `[t, k, d]` node states of the previous level, output: same
    /// - edges: `[t, k, k]`
    pub fn forward(&self, x_tkd: Tensor<3>) -> (Tensor<3>, Tensor<3>) {
        let normed_tkd = normalize(&self.layer_norm, &self.rms_norm, x_tkd.clone());
        let precision = self.precision;
        let u_tkg = project_at(normed_tkd, self.w_down.val(), precision);
        let [_, g] = self.w_down.dims();
        let [_, edge_width] = self.w_edge.dims();

        // The receiver and sender halves of W_node and W_edge side by side, so
        // one product gives all four projections of u.
        let (w_node, w_edge) = (self.w_node.val(), self.w_edge.val());
        let halves = vec![w_node.clone().narrow(0, 0, g), w_node.narrow(0, g, g), w_edge.clone().narrow(0, 0, g), w_edge.narrow(0, g, g)];
        let projected_tkc = project_at(u_tkg, Tensor::cat(halves, 1), precision);
        let receiver_tkg = projected_tkc.clone().narrow(2, 0, g);
        let sender_tkg = projected_tkc.clone().narrow(2, g, g);
        let receiver_edge = projected_tkc.clone().narrow(2, 2 * g, edge_width);
        let sender_edge = projected_tkc.narrow(2, 2 * g + edge_width, edge_width);

        // NOTE: every ordered pair is an edge, i == j included, because the
        // specification's pair set is "all ordered pairs (i, j)".
        let (message_tkg, edge_tkk) = if edge_width == 1 {
            // Scalar edges e[t, i, j] = sigmoid(u_i W_a + u_j W_b + b); the messages
            // sum_j e_ij (u_i N_a + u_j N_b) = (u_i N_a) sum_j e_ij + sum_j e_ij (u_j N_b).
            let edge_tkk = sigmoid(receiver_edge + sender_edge.swap_dims(1, 2) + self.b_edge.val().unsqueeze());
            let message_tkg = receiver_tkg * edge_tkk.clone().sum_dim(2) + edge_tkk.clone().matmul(sender_tkg);
            (message_tkg, edge_tkk)
        } else {
            // Vector edges gate each channel, so the [t, k, k, g] gate tensor is
            // built (g wide, not the 2g of the concatenated pairs).
            let edge_tkkg = sigmoid(
                receiver_edge.unsqueeze_dim::<4>(2) + sender_edge.unsqueeze_dim::<4>(1) + self.b_edge.val().unsqueeze(),
            );
            let receiver_part = receiver_tkg * edge_tkkg.clone().sum_dim(2).squeeze_dim::<3>(2);
            let sender_part = (edge_tkkg.clone() * sender_tkg.unsqueeze_dim::<4>(1)).sum_dim(2).squeeze_dim::<3>(2);
            let edge_tkk = edge_tkkg.mean_dim(3).squeeze_dim::<3>(3);
            (receiver_part + sender_part, edge_tkk)
        };

        (x_tkd + project_at(message_tkg, self.w_up.val(), precision), edge_tkk)
    }
}

fn edge_width(config: &DagConfig) -> usize {
    match config.edge_gate {
        EdgeGate::Scalar => 1,
        EdgeGate::Vector => config.d_g,
    }
}

fn norm_param_count(d: usize, norm: DagNorm) -> usize {
    match norm {
        DagNorm::LayerNorm => 2 * d,
        DagNorm::RmsNorm => d,
    }
}

fn normalize<const D: usize>(layer_norm: &Option<LayerNorm>, rms_norm: &Option<RmsNorm>, x: Tensor<D>) -> Tensor<D> {
    match (layer_norm, rms_norm) {
        (Some(norm), _) => norm.forward(x),
        (None, Some(norm)) => norm.forward(x),
        (None, None) => x,
    }
}

/// The "mlp-mix" ablation: the K node outputs mixed by an unstructured MLP
/// through `d_g`, with no edges. Our reading of the paper's description:
/// `y = sum_i x_i + W_up silu(sum_i W_down LN(x_i))`, `W_up` zero-initialized
/// like the DAG's, so `2 d d_g` weights plus the norm are added per layer.
#[derive(Module, Debug)]
pub struct MlpMix {
    pub layer_norm: Option<LayerNorm>,
    pub rms_norm: Option<RmsNorm>,
    /// `[d, g]`
    pub w_down: Param<Tensor<2>>,
    /// `[g, d]`, zero at initialization.
    pub w_up: Param<Tensor<2>>,
    #[module(skip)]
    pub precision: Precision,
}

impl MlpMix {
    pub fn new(d: usize, config: &DagConfig, eps: f64, std: f64, device: &Device) -> Self {
        Self {
            layer_norm: (config.norm == DagNorm::LayerNorm).then(|| LayerNorm::new(d, eps, device)),
            rms_norm: (config.norm == DagNorm::RmsNorm).then(|| RmsNorm::new(d, eps, device)),
            w_down: normal_weight(d, config.d_g, std, device),
            w_up: Param::from_tensor(Tensor::zeros([config.d_g, d], device)),
            precision: Precision::F32,
        }
    }

    pub fn param_count(d: usize, config: &DagConfig) -> usize {
        norm_param_count(d, config.norm) + 2 * d * config.d_g
    }

    /// # Shapes
    /// - x: `[t, k, d]` gated node outputs, output: `[t, d]`
    pub fn forward(&self, x_tkd: Tensor<3>) -> Tensor<2> {
        let [t, _, d] = x_tkd.dims();
        let normed_tkd = normalize(&self.layer_norm, &self.rms_norm, x_tkd.clone());
        let u_tkg = project_at(normed_tkd, self.w_down.val(), self.precision);
        let [_, _, g] = u_tkg.dims();
        let mixed_tg = silu(u_tkg.sum_dim(1).reshape([t, g]));
        x_tkd.sum_dim(1).reshape([t, d]) + project_at(mixed_tg, self.w_up.val(), self.precision)
    }
}

/// The `L` levels of a DAG aggregation.
#[derive(Module, Debug)]
pub struct DagAggregation {
    pub levels: Vec<DagLevel>,
}

impl DagAggregation {
    pub fn new(d: usize, config: &DagConfig, eps: f64, std: f64, device: &Device) -> Self {
        Self { levels: (0..config.depth).map(|_| DagLevel::new(d, config, eps, std, device)).collect() }
    }

    /// Runs the levels and sums the final node states. Also returns each
    /// level's edge weights averaged over tokens, detached, for metrics.
    ///
    /// # Shapes
    /// - x: `[t, k, d]` level-0 node states, output: `[t, d]`
    /// - mean edges: one `[k, k]` per level
    pub fn forward(&self, x_tkd: Tensor<3>) -> (Tensor<2>, Vec<Tensor<2>>) {
        let [t, k, d] = x_tkd.dims();
        let mut x_tkd = x_tkd;
        let mut mean_edges = Vec::with_capacity(self.levels.len());
        for level in &self.levels {
            let (next_tkd, edge_tkk) = level.forward(x_tkd);
            mean_edges.push(edge_tkk.detach().mean_dim(0).reshape([k, k]));
            x_tkd = next_tkd;
        }
        (x_tkd.sum_dim(1).reshape([t, d]), mean_edges)
    }
}
