//! Model property tests, run on every enabled backend with dimensions that
//! are all different so a swapped axis cannot pass.

use burn::module::Module;
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData, Tolerance};

use crate::config::{Aggregation, DagConfig, DagNorm, EdgeGate, ModelConfig, MoeConfig, Precision};
use crate::layers::reference_attention;
use crate::model::{DagMoeModel, token_nll};
use crate::moe::{Dispatch, MoeLayer};

/// Autodiff devices of every enabled backend.
fn devices() -> Vec<Device> {
    let mut devices = Vec::new();
    #[cfg(feature = "tch")]
    devices.push(crate::parse_device("cpu").unwrap().autodiff());
    #[cfg(feature = "flex")]
    devices.push(crate::parse_device("flex").unwrap().autodiff());
    devices
}

fn tiny_config(aggregation: Aggregation, depth: usize) -> ModelConfig {
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
        init_std: 0.1,
        moe: MoeConfig {
            n_experts: 5,
            top_k: 3,
            d_expert: 12,
            every: 1,
            shared_expert_hidden: 0,
            aggregation,
            renormalize_gates: false,
            rounds: 2,
            load_balance_coef: 0.01,
            z_loss_coef: 0.001,
        },
        dag: DagConfig { depth, d_g: 7, inject_input: true, scale_injection: true, norm: DagNorm::LayerNorm, edge_gate: EdgeGate::Scalar },
    }
}

fn moe_layer(config: &ModelConfig, device: &Device) -> MoeLayer {
    MoeLayer::new(config.d_model, &config.moe, &config.dag, config.norm_eps, config.init_std, device)
}

fn random_input(t: usize, d: usize, device: &Device) -> Tensor<2> {
    Tensor::random([t, d], Distribution::Normal(0.0, 1.0), device)
}

fn assert_close<const D: usize>(actual: Tensor<D>, expected: Tensor<D>, what: &str) {
    let tolerance = Tolerance::<f32>::absolute(1e-5).set_relative(1e-4);
    actual.into_data().assert_approx_eq::<f32>(&expected.into_data(), tolerance);
    let _ = what;
}

/// Every aggregation, and the DAG with both edge gates.
fn variants() -> [(Aggregation, EdgeGate); 5] {
    [
        (Aggregation::WeightedSum, EdgeGate::Scalar),
        (Aggregation::Dag, EdgeGate::Scalar),
        (Aggregation::Dag, EdgeGate::Vector),
        (Aggregation::ChainOfExperts, EdgeGate::Scalar),
        (Aggregation::MlpMix, EdgeGate::Scalar),
    ]
}

#[test]
fn mlp_mix_with_zero_up_projection_is_weighted_sum() {
    for device in devices() {
        let layer = moe_layer(&tiny_config(Aggregation::MlpMix, 1), &device);
        let mut weighted_sum = layer.clone();
        weighted_sum.mlp_mix = None;
        let x_td = random_input(13, 24, &device);
        assert_close(
            layer.forward(x_td.clone(), Dispatch::Sparse).y_td,
            weighted_sum.forward(x_td, Dispatch::Sparse).y_td,
            "zero mlp-mix W_up",
        );
    }
}

#[test]
fn dag_with_zero_up_projection_is_weighted_sum_plus_input() {
    for device in devices() {
        for (depth, edge_gate) in [(0, EdgeGate::Scalar), (1, EdgeGate::Scalar), (2, EdgeGate::Scalar), (2, EdgeGate::Vector)] {
            let mut config = tiny_config(Aggregation::Dag, depth);
            config.dag.edge_gate = edge_gate;
            let layer = moe_layer(&config, &device);
            let mut weighted_sum = layer.clone();
            weighted_sum.dag = None;
            let x_td = random_input(13, 24, &device);
            let dag_td = layer.forward(x_td.clone(), Dispatch::Sparse).y_td;
            let baseline_td = weighted_sum.forward(x_td.clone(), Dispatch::Sparse).y_td;
            assert_close(dag_td, baseline_td + x_td, "zero W_up");
        }
    }
}

#[test]
fn dag_without_injection_and_depth_zero_is_weighted_sum() {
    for device in devices() {
        let mut config = tiny_config(Aggregation::Dag, 0);
        config.dag.inject_input = false;
        let layer = moe_layer(&config, &device);
        let mut weighted_sum = layer.clone();
        weighted_sum.dag = None;
        let x_td = random_input(13, 24, &device);
        assert_close(
            layer.forward(x_td.clone(), Dispatch::Sparse).y_td,
            weighted_sum.forward(x_td, Dispatch::Sparse).y_td,
            "no injection",
        );
    }
}

#[test]
fn only_up_projection_gets_gradient_at_init() {
    for device in devices() {
        let config = tiny_config(Aggregation::Dag, 2);
        let layer = moe_layer(&config, &device);
        let x_td = random_input(13, 24, &device);
        let grads = layer.forward(x_td, Dispatch::Sparse).y_td.sin().sum().backward();
        let dag = layer.dag.as_ref().unwrap();
        let norm = |t: Option<Tensor<2>>| t.map(|g| g.abs().sum().into_scalar::<f32>()).unwrap_or(0.0);
        for level in &dag.levels {
            assert!(norm(level.w_up.val().grad(&grads)) > 0.0, "W_up gradient is zero");
            assert_eq!(norm(level.w_down.val().grad(&grads)), 0.0, "W_down gradient");
            assert_eq!(norm(level.w_edge.val().grad(&grads)), 0.0, "W_edge gradient");
            assert_eq!(norm(level.w_node.val().grad(&grads)), 0.0, "W_node gradient");
        }
        assert!(norm(layer.router.val().grad(&grads)) > 0.0, "router gradient is zero");
    }
}

#[test]
fn sparse_dispatch_matches_dense_in_value_and_gradient() {
    for device in devices() {
        for (aggregation, edge_gate) in variants() {
            let mut config = tiny_config(aggregation, 2);
            config.dag.edge_gate = edge_gate;
            config.moe.shared_expert_hidden = 9;
            let mut layer = moe_layer(&config, &device);
            // Give W_up a non-zero value so every DAG weight is on the gradient path.
            for level in layer.dag.iter_mut().flat_map(|dag| dag.levels.iter_mut()) {
                level.w_up = level.w_up.clone().map(|w| w.random_like(Distribution::Normal(0.0, 0.1)).require_grad());
            }
            if let Some(mix) = layer.mlp_mix.as_mut() {
                mix.w_up = mix.w_up.clone().map(|w| w.random_like(Distribution::Normal(0.0, 0.1)).require_grad());
            }
            let x_td = random_input(13, 24, &device).require_grad();
            let sparse = layer.forward(x_td.clone(), Dispatch::Sparse).y_td;
            let dense = layer.forward(x_td.clone(), Dispatch::Dense).y_td;
            let sparse_grads = sparse.clone().sin().sum().backward();
            let dense_grads = dense.clone().sin().sum().backward();
            assert_close(sparse, dense, "output");
            assert_close(x_td.grad(&sparse_grads).unwrap(), x_td.grad(&dense_grads).unwrap(), "input gradient");
            let mut visitor = GradientPairs { sparse: &sparse_grads, dense: &dense_grads, compared: 0 };
            layer.visit(&mut visitor);
            assert!(visitor.compared > 10, "compared {} parameter gradients", visitor.compared);
        }
    }
}

struct GradientPairs<'a> {
    sparse: &'a burn::tensor::Gradients,
    dense: &'a burn::tensor::Gradients,
    compared: usize,
}

impl burn::module::ModuleVisitor for GradientPairs<'_> {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
        let value = param.val();
        let zeros = || value.zeros_like().inner();
        let sparse = value.grad(self.sparse).unwrap_or_else(zeros);
        let dense = value.grad(self.dense).unwrap_or_else(zeros);
        assert_close(sparse, dense, "parameter gradient");
        self.compared += 1;
    }
}

#[test]
fn expert_with_no_token_survives_backward() {
    for device in devices() {
        let mut config = tiny_config(Aggregation::Dag, 1);
        config.moe.n_experts = 7;
        config.moe.top_k = 1;
        let layer = moe_layer(&config, &device);
        // Two tokens and seven experts: at least five experts get nothing.
        let output = layer.forward(random_input(2, 24, &device), Dispatch::Sparse);
        assert!(output.tokens_per_expert.iter().filter(|&&n| n == 0).count() >= 5);
        let grads = output.y_td.sum().backward();
        assert!(layer.router.val().grad(&grads).is_some());
    }
}

#[test]
fn router_losses_match_hand_computation() {
    for device in devices() {
        let config = tiny_config(Aggregation::WeightedSum, 1);
        let layer = moe_layer(&config, &device);
        let x_td = random_input(11, 24, &device);
        let output = layer.forward(x_td.clone(), Dispatch::Sparse);

        let logits: Vec<f32> = x_td.matmul(layer.router.val()).into_data().iter::<f32>().collect();
        let (t, e, k) = (11, 5, 3);
        let mut counts = vec![0f64; e];
        let mut mean_prob = vec![0f64; e];
        let mut z = 0f64;
        for row in logits.chunks(e) {
            let max = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let sum: f64 = row.iter().map(|&l| (l as f64 - max).exp()).sum();
            z += (max + sum.ln()).powi(2);
            let probs: Vec<f64> = row.iter().map(|&l| (l as f64 - max).exp() / sum).collect();
            let mut order: Vec<usize> = (0..e).collect();
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
            for &j in &order[..k] {
                counts[j] += 1.0;
            }
            for j in 0..e {
                mean_prob[j] += probs[j] / t as f64;
            }
        }
        let load_balance: f64 = e as f64 * (0..e).map(|j| counts[j] / (t * k) as f64 * mean_prob[j]).sum::<f64>();
        let z_loss = z / t as f64;
        let actual_lb = output.losses.load_balance.into_scalar::<f32>() as f64;
        let actual_z = output.losses.z_loss.into_scalar::<f32>() as f64;
        assert!((actual_lb - load_balance).abs() < 1e-5, "load balance {actual_lb} vs {load_balance}");
        assert!((actual_z - z_loss).abs() < 1e-5, "z-loss {actual_z} vs {z_loss}");
    }
}

#[test]
fn attention_matches_masked_softmax_reference() {
    for device in devices() {
        let q = Tensor::<4>::random([2, 3, 7, 6], Distribution::Normal(0.0, 1.0), &device);
        let k = Tensor::<4>::random([2, 3, 7, 6], Distribution::Normal(0.0, 1.0), &device);
        let v = Tensor::<4>::random([2, 3, 7, 6], Distribution::Normal(0.0, 1.0), &device);
        let options = burn::tensor::ops::AttentionModuleOptions { scale: None, softcap: None, is_causal: true };
        let fused = burn::tensor::module::attention(q.clone(), k.clone(), v.clone(), None, None, options);
        assert_close(fused, reference_attention(q, k, v), "attention");
    }
}

/// Returns a fixed `[2, 16]` batch of inputs and their next-token targets.
fn next_token_batch(device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let ids: Vec<i64> = (0..34).map(|i| (i * i % 61) as i64).collect();
    let batch = Tensor::<2, Int>::from_data(TensorData::new(ids, [2, 17]), device);
    (batch.clone().narrow(1, 0, 16), batch.narrow(1, 1, 16))
}

/// Norm of the difference over the norm of `expected`.
fn relative_error<const D: usize>(actual: Tensor<D>, expected: Tensor<D>) -> f32 {
    let norm = |x: Tensor<D>| x.square().sum().sqrt().into_scalar::<f32>();
    norm(actual - expected.clone()) / norm(expected)
}

#[test]
fn bf16_tracks_float32_logits_and_gradients() {
    for device in devices() {
        for (aggregation, edge_gate) in variants() {
            let case = format!("{device:?} {aggregation:?} {edge_gate:?}");
            let mut config = tiny_config(aggregation, 2);
            config.dag.edge_gate = edge_gate;
            // Every expert is chosen, so bf16 rounding cannot move a token to
            // another expert, and the aggregations do not depend on slot order.
            config.moe.top_k = config.moe.n_experts;
            device.seed(11);
            let model = DagMoeModel::new(&config, 16, &device).unwrap();
            // A DAG starts with W_up = 0, which would hide its products.
            let model = model.map(&mut Perturb { device: device.clone() });
            let bf16_model = model.clone().with_precision(Precision::Bf16);
            let (inputs, targets) = next_token_batch(&device);

            let f32_logits = model.forward(inputs.clone()).logits_btv;
            let bf16_logits = bf16_model.forward(inputs).logits_btv;
            assert_eq!(bf16_logits.dtype(), burn::tensor::DType::F32, "{case}: logits leave the model in float32");
            let error = relative_error(bf16_logits.clone(), f32_logits.clone());
            // bfloat16 keeps 8 significant bits: a relative rounding of 2^-9 per operand.
            assert!(error > 0.0, "{case}: bf16 logits equal float32 ones");
            assert!(error < 0.02, "{case}: bf16 logits off by {error}");

            let f32_grads = token_nll(f32_logits, targets.clone()).mean().backward();
            let bf16_grads = token_nll(bf16_logits, targets).mean().backward();
            let mut pairs = GradientAgreement {
                f32: &f32_grads,
                bf16: &bf16_grads,
                squared_difference: 0.0,
                squared_reference: 0.0,
                worst: 0.0,
                compared: 0,
            };
            model.visit(&mut pairs);
            assert!(pairs.compared > 10, "{case}: only {} gradients compared", pairs.compared);
            // One parameter's gradient may be a sum with much cancellation (the
            // DAG's scalar edge bias), so single parameters get a looser bound.
            assert!(pairs.overall() < 0.03, "{case}: bf16 gradients off by {} overall", pairs.overall());
            assert!(pairs.worst < 0.25, "{case}: a bf16 gradient is off by {}", pairs.worst);
        }
    }
}

/// Adds noise to every float parameter so that no product is zero.
struct Perturb {
    device: Device,
}

impl burn::module::ModuleMapper for Perturb {
    fn map_float<const D: usize>(&mut self, param: burn::module::Param<Tensor<D>>) -> burn::module::Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let noise = Tensor::<D>::random(tensor.shape(), Distribution::Normal(0.0, 0.05), &self.device);
        let perturbed = Tensor::from_inner(tensor.inner() + noise.inner()).require_grad();
        burn::module::Param::from_mapped_value(id, perturbed, mapper)
    }
}

/// Compares the float32 and bf16 gradients of every parameter and checks
/// that the bf16 ones are float32.
struct GradientAgreement<'a> {
    f32: &'a burn::tensor::Gradients,
    bf16: &'a burn::tensor::Gradients,
    /// Sums over all parameters of the squared difference and the squared float32 gradient.
    squared_difference: f32,
    squared_reference: f32,
    /// Largest relative error of one parameter's gradient.
    worst: f32,
    compared: usize,
}

impl GradientAgreement<'_> {
    fn overall(&self) -> f32 {
        (self.squared_difference / self.squared_reference).sqrt()
    }
}

impl burn::module::ModuleVisitor for GradientAgreement<'_> {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
        let value = param.val();
        let (Some(f32), Some(bf16)) = (value.grad(self.f32), value.grad(self.bf16)) else { return };
        assert_eq!(bf16.dtype(), burn::tensor::DType::F32, "gradients of float32 weights are float32");
        let squared = |x: Tensor<D>| x.square().sum().into_scalar::<f32>();
        let difference = squared(bf16 - f32.clone());
        let reference = squared(f32);
        self.squared_difference += difference;
        self.squared_reference += reference;
        self.worst = self.worst.max((difference / reference).sqrt());
        self.compared += 1;
    }
}

#[test]
fn bf16_attention_matches_reference() {
    for device in devices() {
        let q = Tensor::<4>::random([2, 3, 7, 6], Distribution::Normal(0.0, 1.0), &device);
        let k = Tensor::<4>::random([2, 3, 7, 6], Distribution::Normal(0.0, 1.0), &device);
        let v = Tensor::<4>::random([2, 3, 7, 6], Distribution::Normal(0.0, 1.0), &device);
        let expected = reference_attention(q.clone(), k.clone(), v.clone());
        let actual = crate::layers::bf16_attention(q, k, v);
        let error = relative_error(actual, expected);
        assert!(error < 0.03, "bf16 attention off by {error}");
    }
}

#[test]
fn logits_are_causal() {
    for device in devices() {
        let config = tiny_config(Aggregation::Dag, 1);
        let model = DagMoeModel::new(&config, 16, &device).unwrap();
        let tokens: Vec<i64> = (0..18).map(|i| (i * 7 % 61) as i64).collect();
        let mut changed = tokens.clone();
        changed[8] = 60; // row 0 position 8 and later may change; positions 0..8 may not
        let logits = |ids: Vec<i64>| {
            let tokens_bt = Tensor::<2, Int>::from_data(TensorData::new(ids, [2, 9]), &device);
            model.forward(tokens_bt).logits_btv
        };
        let before = logits(tokens).narrow(1, 0, 8);
        let after = logits(changed).narrow(1, 0, 8);
        assert_close(before, after, "causal");
    }
}

#[test]
fn training_steps_reduce_the_loss() {
    for device in devices() {
        for (aggregation, edge_gate) in variants() {
            let mut config = tiny_config(aggregation, 1);
            config.dag.edge_gate = edge_gate;
            device.seed(7);
            let mut model = DagMoeModel::new(&config, 16, &device).unwrap();
            let (inputs, targets) = next_token_batch(&device);
            let mut losses = Vec::new();
            for _ in 0..12 {
                let loss = token_nll(model.forward(inputs.clone()).logits_btv, targets.clone()).mean();
                losses.push(loss.clone().into_scalar::<f32>());
                let grads = loss.backward();
                model = model.map(&mut SgdStep { grads: &grads, lr: 0.3 });
            }
            // Plain SGD on 32 tokens can overshoot for a step; judge the best
            // of the last few steps rather than the very last one.
            let late_best = losses[8..].iter().copied().fold(f32::INFINITY, f32::min);
            assert!(late_best < losses[0] * 0.9, "{aggregation:?} {edge_gate:?} losses {losses:?}");
        }
    }
}

struct SgdStep<'a> {
    grads: &'a burn::tensor::Gradients,
    lr: f64,
}

impl burn::module::ModuleMapper for SgdStep<'_> {
    fn map_float<const D: usize>(&mut self, param: burn::module::Param<Tensor<D>>) -> burn::module::Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let updated = match tensor.grad(self.grads) {
            Some(grad) => Tensor::from_inner(tensor.inner() - grad.mul_scalar(self.lr)).require_grad(),
            None => tensor,
        };
        burn::module::Param::from_mapped_value(id, updated, mapper)
    }
}
