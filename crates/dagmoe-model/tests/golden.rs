//! Golden test of one DAG-MoE layer against the PyTorch reference.
//!
//! tests/fixtures/dag_layer.json was written by
//! scripts/reference/make_fixture.py (seed 20261204, torch 2.9.0): the
//! weights of a layer with 5 experts, top-3 routing and a two-level DAG with
//! non-zero W_up, an input, the output, and the gradients of
//! sum(output * probe) with respect to the input and every weight. The
//! reference computes the DAG in the concatenation form, so this also checks
//! the split-matrix algebra. Tolerance: 1e-5 absolute plus 1e-4 relative,
//! the f32 round-off of two implementations.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Device, Gradients, Tensor, TensorData, Tolerance};
use dagmoe_model::moe::{Dispatch, MoeLayer};
use dagmoe_model::{Aggregation, DagConfig, DagNorm, EdgeGate, MoeConfig};
use serde_json::Value;

fn tensor(value: &Value, device: &Device) -> (Vec<usize>, Tensor<1>) {
    let shape: Vec<usize> = value["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
    let data: Vec<f32> = value["data"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    let len = data.len();
    (shape, Tensor::from_data(TensorData::new(data, [len]), device))
}

/// Replaces each parameter with the fixture tensor of the same dotted path.
struct LoadWeights<'a> {
    path: Vec<String>,
    weights: &'a Value,
    device: Device,
    loaded: usize,
}

impl ModuleMapper for LoadWeights<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let name = self.path.join(".");
        let (id, value, mapper) = param.consume();
        let (shape, flat) = tensor(&self.weights[&name], &self.device);
        assert_eq!(shape, value.dims().to_vec(), "{name}");
        self.loaded += 1;
        let loaded = Tensor::from_inner(flat.reshape::<D, _>(value.dims()).inner()).require_grad();
        Param::from_mapped_value(id, loaded, mapper)
    }
}

/// Compares every parameter's gradient with the fixture's.
struct CompareGradients<'a> {
    path: Vec<String>,
    grads: &'a Gradients,
    expected: &'a Value,
    device: Device,
    compared: usize,
}

impl ModuleVisitor for CompareGradients<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let name = self.path.join(".");
        let grad = param.val().grad(self.grads).unwrap_or_else(|| panic!("{name} has no gradient"));
        let (_, expected) = tensor(&self.expected[&name], &self.device);
        let numel = grad.dims().iter().product::<usize>();
        grad.reshape([numel]).into_data().assert_approx_eq::<f32>(&expected.into_data(), tolerance());
        self.compared += 1;
    }
}

fn tolerance() -> Tolerance<f32> {
    Tolerance::absolute(1e-5).set_relative(1e-4)
}

/// Autodiff devices of every enabled backend.
fn devices() -> Vec<Device> {
    let mut devices = Vec::new();
    #[cfg(feature = "tch")]
    devices.push(dagmoe_model::parse_device("cpu").unwrap().autodiff());
    #[cfg(feature = "flex")]
    devices.push(dagmoe_model::parse_device("flex").unwrap().autodiff());
    devices
}

#[test]
fn dag_layer_matches_pytorch_fixture() {
    let fixture: Value = serde_json::from_str(include_str!("fixtures/dag_layer.json")).unwrap();
    let dims = &fixture["dims"];
    let tokens = dims["tokens"].as_u64().unwrap() as usize;
    let d = dims["d_model"].as_u64().unwrap() as usize;
    let moe = MoeConfig {
        n_experts: 5,
        top_k: 3,
        d_expert: dims["d_expert"].as_u64().unwrap() as usize,
        every: 1,
        shared_expert_hidden: 0,
        aggregation: Aggregation::Dag,
        renormalize_gates: false,
        rounds: 2,
        load_balance_coef: 0.0,
        z_loss_coef: 0.0,
    };
    let dag = DagConfig { depth: 2, d_g: 6, inject_input: true, scale_injection: true, norm: DagNorm::LayerNorm, edge_gate: EdgeGate::Scalar };

    for device in devices() {
        let layer = MoeLayer::new(d, &moe, &dag, 1e-5, 0.02, &device);
        let mut loader = LoadWeights { path: Vec::new(), weights: &fixture["weights"], device: device.clone(), loaded: 0 };
        let layer = layer.map(&mut loader);
        assert_eq!(loader.loaded, fixture["weights"].as_object().unwrap().len());

        let x_td = tensor(&fixture["input"], &device).1.reshape([tokens, d]).require_grad();
        let probe_td = tensor(&fixture["probe"], &device).1.reshape([tokens, d]);
        for dispatch in [Dispatch::Sparse, Dispatch::Dense] {
            let y_td = layer.forward(x_td.clone(), dispatch).y_td;
            let grads = (y_td.clone() * probe_td.clone()).sum().backward();

            let expected_y = tensor(&fixture["output"], &device).1;
            y_td.reshape([tokens * d]).into_data().assert_approx_eq::<f32>(&expected_y.into_data(), tolerance());
            let expected_dx = tensor(&fixture["input_grad"], &device).1;
            let dx = x_td.grad(&grads).unwrap().reshape([tokens * d]);
            dx.into_data().assert_approx_eq::<f32>(&expected_dx.into_data(), tolerance());

            let mut compare = CompareGradients {
                path: Vec::new(),
                grads: &grads,
                expected: &fixture["weight_grads"],
                device: device.clone(),
                compared: 0,
            };
            layer.visit(&mut compare);
            assert_eq!(compare.compared, loader.loaded, "every weight's gradient was compared");
        }
    }
}
