//! Leaf modules of the decoder: norms, SwiGLU, rotary embeddings and attention.
//!
//! Shape letters: b batch, t time (sequence) or tokens, d model width,
//! h attention heads, c head width, f hidden width of a feed-forward layer.
//! Weight matrices are stored `[d_in, d_out]` and applied as `x W`.

use burn::module::{Module, Param};
use burn::tensor::activation::silu;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Device, Distribution, FloatDType, Tensor};

use crate::config::Precision;

/// Draws a `[d_in, d_out]` weight from `N(0, std^2)`.
pub(crate) fn normal_weight(d_in: usize, d_out: usize, std: f64, device: &Device) -> Param<Tensor<2>> {
    Param::from_tensor(Tensor::random([d_in, d_out], Distribution::Normal(0.0, std), device))
}

/// `x W` for a `[.., d_in]` input and a `[d_in, d_out]` weight.
pub(crate) fn project<const D: usize>(x: Tensor<D>, weight: &Param<Tensor<2>>) -> Tensor<D> {
    project_with(x, weight.val())
}

/// `x W` computed as one 2-D matrix product.
///
/// NOTE: burn 0.22.1 broadcasts the weight over the leading axes of a 3-D
/// input. On libtorch CPU that made a `[4096 tokens, 256] x [256, 64]`
/// product with its backward 15x slower (57 ms against 3.7 ms, measured with
/// examples/profile_dag.rs), so inputs are flattened to 2-D first.
pub(crate) fn project_with<const D: usize>(x: Tensor<D>, weight: Tensor<2>) -> Tensor<D> {
    let dims = x.dims();
    let [d_in, d_out] = weight.dims();
    let rows = dims[..D - 1].iter().product();
    let mut out_dims = dims;
    out_dims[D - 1] = d_out;
    x.reshape([rows, d_in]).matmul(weight).reshape(out_dims)
}

/// Computes `x W` at `precision` and returns it in float32.
pub(crate) fn project_at<const D: usize>(x: Tensor<D>, weight: Tensor<2>, precision: Precision) -> Tensor<D> {
    match precision {
        Precision::F32 => project_with(x, weight),
        Precision::Bf16 => project_with(x.cast(FloatDType::BF16), weight.cast(FloatDType::BF16)).cast(FloatDType::F32),
    }
}

/// Root-mean-square normalization with a learned scale (Zhang and Sennrich, 2019).
#[derive(Module, Debug)]
pub struct RmsNorm {
    pub weight: Param<Tensor<1>>,
    eps: f64,
}

impl RmsNorm {
    pub fn new(d: usize, eps: f64, device: &Device) -> Self {
        Self { weight: Param::from_tensor(Tensor::ones([d], device)), eps }
    }

    /// # Shapes
    /// - x: `[.., d]`, output: same
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let rms = x.clone().square().mean_dim(D - 1).add_scalar(self.eps).sqrt();
        x.div(rms).mul(self.weight.val().unsqueeze())
    }
}

/// Layer normalization with a learned scale and bias (Ba et al., 2016).
#[derive(Module, Debug)]
pub struct LayerNorm {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    eps: f64,
}

impl LayerNorm {
    pub fn new(d: usize, eps: f64, device: &Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([d], device)),
            bias: Param::from_tensor(Tensor::zeros([d], device)),
            eps,
        }
    }

    /// # Shapes
    /// - x: `[.., d]`, output: same
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let centered = x.clone().sub(x.mean_dim(D - 1));
        let std = centered.clone().square().mean_dim(D - 1).add_scalar(self.eps).sqrt();
        centered.div(std).mul(self.weight.val().unsqueeze()).add(self.bias.val().unsqueeze())
    }
}

/// SwiGLU feed-forward layer (Shazeer, 2020): `(silu(x W_gate) * x W_up) W_down`.
#[derive(Module, Debug)]
pub struct SwiGlu {
    pub w_gate: Param<Tensor<2>>,
    pub w_up: Param<Tensor<2>>,
    pub w_down: Param<Tensor<2>>,
    #[module(skip)]
    pub precision: Precision,
}

impl SwiGlu {
    pub fn new(d: usize, hidden: usize, std: f64, device: &Device) -> Self {
        Self {
            w_gate: normal_weight(d, hidden, std, device),
            w_up: normal_weight(d, hidden, std, device),
            w_down: normal_weight(hidden, d, std, device),
            precision: Precision::F32,
        }
    }

    /// Parameters of a SwiGLU layer of these sizes.
    pub fn param_count(d: usize, hidden: usize) -> usize {
        3 * d * hidden
    }

    /// # Shapes
    /// - x: `[.., d]`, output: `[.., d]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let gate_tf = silu(project_at(x.clone(), self.w_gate.val(), self.precision));
        let up_tf = project_at(x, self.w_up.val(), self.precision);
        project_at(gate_tf.mul(up_tf), self.w_down.val(), self.precision)
    }
}

/// Precomputed rotary position embedding tables (Su et al., 2021), in the
/// half-split layout: the first `c / 2` channels pair with the last `c / 2`.
#[derive(Module, Debug)]
pub struct Rotary {
    cos_tc: Tensor<2>,
    sin_tc: Tensor<2>,
}

impl Rotary {
    pub fn new(head_dim: usize, max_len: usize, theta: f64, device: &Device) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_len * head_dim);
        let mut sin = Vec::with_capacity(max_len * head_dim);
        for position in 0..max_len {
            for channel in 0..head_dim {
                let frequency = theta.powf(-((channel % half) as f64) * 2.0 / head_dim as f64);
                let angle = position as f64 * frequency;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let table = |values: Vec<f32>| Tensor::<1>::from_floats(values.as_slice(), device).reshape([max_len, head_dim]);
        Self { cos_tc: table(cos), sin_tc: table(sin) }
    }

    /// # Shapes
    /// - x: `[b, h, t, c]`, output: same
    pub fn apply(&self, x_bhtc: Tensor<4>) -> Tensor<4> {
        let [_, _, t, c] = x_bhtc.dims();
        let cos_tc = self.cos_tc.clone().narrow(0, 0, t).unsqueeze::<4>();
        let sin_tc = self.sin_tc.clone().narrow(0, 0, t).unsqueeze::<4>();
        let first = x_bhtc.clone().narrow(3, 0, c / 2);
        let second = x_bhtc.clone().narrow(3, c / 2, c / 2);
        let rotated = Tensor::cat(vec![second.neg(), first], 3);
        x_bhtc.mul(cos_tc).add(rotated.mul(sin_tc))
    }

    pub fn max_len(&self) -> usize {
        self.cos_tc.dims()[0]
    }
}

/// Causal self-attention with grouped-query heads and rotary embeddings.
#[derive(Module, Debug)]
pub struct Attention {
    pub wq: Param<Tensor<2>>,
    pub wk: Param<Tensor<2>>,
    pub wv: Param<Tensor<2>>,
    pub wo: Param<Tensor<2>>,
    n_heads: usize,
    n_kv_heads: usize,
    #[module(skip)]
    pub precision: Precision,
}

impl Attention {
    pub fn new(d: usize, n_heads: usize, n_kv_heads: usize, std: f64, device: &Device) -> Self {
        let head_dim = d / n_heads;
        Self {
            wq: normal_weight(d, n_heads * head_dim, std, device),
            wk: normal_weight(d, n_kv_heads * head_dim, std, device),
            wv: normal_weight(d, n_kv_heads * head_dim, std, device),
            wo: normal_weight(n_heads * head_dim, d, std, device),
            n_heads,
            n_kv_heads,
            precision: Precision::F32,
        }
    }

    /// # Shapes
    /// - x: `[b, t, d]`, output: `[b, t, d]`
    pub fn forward(&self, x_btd: Tensor<3>, rotary: &Rotary) -> Tensor<3> {
        let [b, t, d] = x_btd.dims();
        let c = d / self.n_heads;
        let heads = |x: Tensor<3>, h: usize| x.reshape([b, t, h, c]).swap_dims(1, 2);
        let precision = self.precision;
        let q_bhtc = rotary.apply(heads(project_at(x_btd.clone(), self.wq.val(), precision), self.n_heads));
        let k_bhtc = rotary.apply(heads(project_at(x_btd.clone(), self.wk.val(), precision), self.n_kv_heads));
        let v_bhtc = heads(project_at(x_btd, self.wv.val(), precision), self.n_kv_heads);
        let k_bhtc = self.repeat_kv(k_bhtc);
        let v_bhtc = self.repeat_kv(v_bhtc);

        let out_bhtc = match precision {
            Precision::F32 => {
                let options = AttentionModuleOptions { scale: None, softcap: None, is_causal: true };
                attention(q_bhtc, k_bhtc, v_bhtc, None, None, options)
            }
            Precision::Bf16 => bf16_attention(q_bhtc, k_bhtc, v_bhtc),
        };
        let out_btd = out_bhtc.swap_dims(1, 2).reshape([b, t, d]);
        project_at(out_btd, self.wo.val(), precision)
    }

    /// Repeats each key/value head for the query heads of its group.
    fn repeat_kv(&self, x_bhtc: Tensor<4>) -> Tensor<4> {
        let group = self.n_heads / self.n_kv_heads;
        if group == 1 {
            return x_bhtc;
        }
        let [b, h, t, c] = x_bhtc.dims();
        x_bhtc.unsqueeze_dim::<5>(2).expand([b, h, group, t, c]).reshape([b, h * group, t, c])
    }
}

/// Computes causal attention with its two products in bfloat16 around a
/// float32 softmax. Inputs and output are float32.
///
/// NOTE: composed of separate kernels, so autodiff keeps the `[b, h, t, t]`
/// scores and probabilities for the backward pass, where a fused
/// flash-attention kernel keeps O(t) state per row.
pub(crate) fn bf16_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let [_, _, t, c] = q.dims();
    let bf16 = |x: Tensor<4>| x.cast(FloatDType::BF16);
    let scores = bf16(q).matmul(bf16(k).swap_dims(2, 3)).cast(FloatDType::F32).div_scalar((c as f64).sqrt());
    // `tril_mask` is true above the diagonal: the positions a query may not see.
    let future = Tensor::<2, Bool>::tril_mask([t, t], 0, &scores.device());
    let scores = scores.mask_fill(future.unsqueeze::<4>(), f32::NEG_INFINITY);
    bf16(burn::tensor::activation::softmax(scores, 3)).matmul(bf16(v)).cast(FloatDType::F32)
}

/// Plain softmax attention with an explicit causal mask, the reference the
/// fused `attention` call is tested against.
#[cfg(test)]
pub(crate) fn reference_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let [_, _, t, c] = q.dims();
    let scores = q.matmul(k.swap_dims(2, 3)).div_scalar((c as f64).sqrt());
    let mask = Tensor::<2, Bool>::tril_mask([t, t], 0, &scores.device());
    let scores = scores.mask_fill(mask.unsqueeze::<4>(), f32::NEG_INFINITY);
    burn::tensor::activation::softmax(scores, 3).matmul(v)
}
