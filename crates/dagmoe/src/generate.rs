//! Text generation from a checkpoint, for sanity checks: greedy decoding or
//! sampling with temperature, top-k and top-p (nucleus) filtering.

use burn::tensor::{Device, Int, Tensor, TensorData};
use dagmoe_data::TextTokenizer;
use dagmoe_data::rng::SplitMix64;
use dagmoe_model::DagMoeModel;

use crate::error::{Error, Result};

/// Settings of next-token selection.
#[derive(Debug, Clone)]
pub struct SamplingOptions {
    /// Tokens to generate at most; generation also stops at the EOS token.
    pub max_tokens: usize,
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f64,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 keeps all.
    pub top_p: f64,
    pub seed: u64,
}

impl SamplingOptions {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::Usage(format!("invalid --temperature {}: use a value >= 0 (0 is greedy)", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Usage(format!("invalid --top-p {}: use a value in (0, 1]", self.top_p)));
        }
        Ok(())
    }
}

/// Continues `prompt` and returns the generated text (without the prompt).
///
/// Each token reruns the model on the last `max_len` tokens. There is no
/// key/value cache, because the short samples this is meant for do not need one.
pub fn generate(
    model: &DagMoeModel,
    tokenizer: &TextTokenizer,
    prompt: &str,
    options: &SamplingOptions,
    device: &Device,
) -> Result<String> {
    options.validate()?;
    let mut tokens = tokenizer.encode(prompt)?;
    if tokens.is_empty() {
        tokens.push(tokenizer.eos_id());
    }
    let prompt_len = tokens.len();
    let mut rng = SplitMix64::new(options.seed);
    for _ in 0..options.max_tokens {
        let context = &tokens[tokens.len().saturating_sub(model.max_len())..];
        let ids: Vec<i64> = context.iter().map(|&t| t as i64).collect();
        let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, context.len()]), device);
        let logits_btv = model.forward(input).logits_btv;
        let [_, t, v] = logits_btv.dims();
        let last: Vec<f32> = logits_btv.narrow(1, t - 1, 1).reshape([v]).into_data().iter::<f32>().collect();
        let next = sample(&last, options, &mut rng);
        if next == tokenizer.eos_id() {
            break;
        }
        tokens.push(next);
    }
    Ok(tokenizer.decode(&tokens[prompt_len..])?)
}

/// Picks a token id from `logits` with the filters and temperature of `options`.
pub fn sample(logits: &[f32], options: &SamplingOptions, rng: &mut SplitMix64) -> u32 {
    let argmax = || {
        logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32).unwrap_or(0)
    };
    if options.temperature == 0.0 {
        return argmax();
    }

    // Candidates sorted by probability, most likely first.
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if options.top_k > 0 {
        order.truncate(options.top_k);
    }
    let max = logits[order[0]] as f64;
    let mut weights: Vec<f64> = order.iter().map(|&i| ((logits[i] as f64 - max) / options.temperature).exp()).collect();
    let total: f64 = weights.iter().sum();
    weights.iter_mut().for_each(|w| *w /= total);

    if options.top_p < 1.0 {
        let mut cumulative = 0.0;
        let keep = weights
            .iter()
            .position(|&w| {
                cumulative += w;
                cumulative >= options.top_p
            })
            .map_or(weights.len(), |i| i + 1);
        order.truncate(keep);
        weights.truncate(keep);
        let kept: f64 = weights.iter().sum();
        weights.iter_mut().for_each(|w| *w /= kept);
    }

    let mut draw = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    for (&token, &weight) in order.iter().zip(&weights) {
        if draw < weight {
            return token as u32;
        }
        draw -= weight;
    }
    *order.last().expect("at least one candidate") as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(temperature: f64, top_k: usize, top_p: f64) -> SamplingOptions {
        SamplingOptions { max_tokens: 1, temperature, top_k, top_p, seed: 0 }
    }

    const LOGITS: [f32; 5] = [0.1, 2.0, -1.0, 1.9, 0.5];

    #[test]
    fn greedy_and_single_candidate_pick_argmax() {
        let mut rng = SplitMix64::new(1);
        assert_eq!(sample(&LOGITS, &options(0.0, 0, 1.0), &mut rng), 1);
        for _ in 0..20 {
            assert_eq!(sample(&LOGITS, &options(1.0, 1, 1.0), &mut rng), 1);
            assert_eq!(sample(&LOGITS, &options(1.0, 0, 1e-6), &mut rng), 1);
        }
    }

    #[test]
    fn top_k_limits_candidates() {
        let mut rng = SplitMix64::new(2);
        for _ in 0..200 {
            let token = sample(&LOGITS, &options(5.0, 2, 1.0), &mut rng);
            assert!(token == 1 || token == 3, "token {token} is outside the top 2");
        }
    }

    #[test]
    fn sampling_follows_softmax_frequencies() {
        let mut rng = SplitMix64::new(3);
        let mut counts = [0usize; 5];
        for _ in 0..20_000 {
            counts[sample(&LOGITS, &options(1.0, 0, 1.0), &mut rng) as usize] += 1;
        }
        let total: f64 = LOGITS.iter().map(|&l| (l as f64).exp()).sum();
        for (i, &count) in counts.iter().enumerate() {
            let expected = (LOGITS[i] as f64).exp() / total;
            let observed = count as f64 / 20_000.0;
            assert!((observed - expected).abs() < 0.015, "token {i}: {observed} vs {expected}");
        }
    }
}
