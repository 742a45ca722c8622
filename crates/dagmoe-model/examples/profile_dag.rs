//! Times forward plus backward of the operations inside a DAG level at the
//! small preset's sizes (4096 token-slots, d 256, d_g 64), to find what
//! dominates its cost. Run: `cargo run --release --example profile_dag [cpu|flex]`.

use std::time::Instant;
use burn::tensor::{Distribution, Tensor};
use burn::tensor::activation::sigmoid;
use dagmoe_model::layers::LayerNorm;

/// Prints the mean time of `f` over five runs after two warm-up runs.
fn time<F: FnMut() -> Tensor<1>>(name: &str, mut f: F) {
    for _ in 0..2 { let _ = f().into_scalar::<f32>(); }
    let start = Instant::now();
    for _ in 0..5 { let _ = f().into_scalar::<f32>(); }
    println!("{name}: {:.1} ms", start.elapsed().as_secs_f64() * 1000.0 / 5.0);
}

fn main() {
    let device = dagmoe_model::parse_device(&std::env::args().nth(1).unwrap_or("cpu".into())).unwrap().autodiff();
    let x = Tensor::<3>::random([2048, 2, 256], Distribution::Normal(0., 1.), &device).require_grad();
    let norm = LayerNorm::new(256, 1e-5, &device);
    let w = Tensor::<2>::random([256, 64], Distribution::Normal(0., 1.), &device).require_grad();
    let e = Tensor::<3>::random([2048, 2, 2], Distribution::Normal(0., 1.), &device).require_grad();
    let q = Tensor::<3>::random([2048, 2, 64], Distribution::Normal(0., 1.), &device).require_grad();
    time("layernorm fwd+bwd", || { let y = norm.forward(x.clone()).sum(); let _ = y.backward(); y });
    time("linear fwd+bwd", || { let y = burn::tensor::module::linear(x.clone(), w.clone(), None).sum(); let _ = y.backward(); y });
    time("linear 2d fwd+bwd", || { let y = burn::tensor::module::linear(x.clone().reshape([4096, 256]), w.clone(), None).sum(); let _ = y.backward(); y });
    time("matmul 2d fwd+bwd", || { let y = x.clone().reshape([4096, 256]).matmul(w.clone()).sum(); let _ = y.backward(); y });
    time("bmm fwd+bwd", || { let y = e.clone().matmul(q.clone()).sum(); let _ = y.backward(); y });
    time("sigmoid bcast fwd+bwd", || { let a = e.clone().narrow(2,0,1); let y = sigmoid(a.clone() + a.swap_dims(1,2)).sum(); let _ = y.backward(); y });
    time("sum_dim mul fwd+bwd", || { let y = (q.clone() * e.clone().sum_dim(2)).sum(); let _ = y.backward(); y });
    time("elementwise x*2 fwd+bwd", || { let y = x.clone().mul_scalar(2.0).sum(); let _ = y.backward(); y });
}
