//! AdamW with decoupled weight decay, a warmup-cosine schedule and
//! global-norm gradient clipping.
//!
//! The optimizer keeps its moments by parameter name, so a checkpoint stores
//! them beside the weights under the same names.

use std::collections::HashMap;

use burn::tensor::Tensor;

use crate::config::{Schedule, TrainConfig};

/// Learning rate at `step` (0-based), a pure function of the step: linear
/// warmup from `lr / warmup_steps` to `lr`, then the configured schedule.
pub fn learning_rate(config: &TrainConfig, step: u64) -> f64 {
    if step < config.warmup_steps {
        return config.lr * (step + 1) as f64 / config.warmup_steps as f64;
    }
    let min_lr = config.lr * config.min_lr_ratio;
    match config.schedule {
        Schedule::Constant => config.lr,
        Schedule::Cosine => {
            let decay_steps = config.steps.saturating_sub(config.warmup_steps).max(1);
            let progress = ((step - config.warmup_steps) as f64 / decay_steps as f64).min(1.0);
            let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
            min_lr + (config.lr - min_lr) * cosine
        }
        Schedule::Wsd => {
            let decay_start = config.steps.saturating_sub(config.decay_steps);
            if step < decay_start {
                return config.lr;
            }
            let progress = ((step - decay_start) as f64 / config.decay_steps.max(1) as f64).min(1.0);
            config.lr + (min_lr - config.lr) * progress
        }
    }
}

/// First and second moments of one parameter.
#[derive(Clone)]
pub struct Moments {
    pub first: Tensor<1>,
    pub second: Tensor<1>,
}

/// AdamW (Loshchilov and Hutter, 2019) over named, flattened parameters.
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Completed updates, for bias correction.
    pub step: u64,
    pub moments: HashMap<String, Moments>,
}

impl AdamW {
    pub fn new(config: &TrainConfig) -> Self {
        Self {
            beta1: config.beta1,
            beta2: config.beta2,
            eps: config.adam_eps,
            weight_decay: config.weight_decay,
            step: 0,
            moments: HashMap::new(),
        }
    }

    /// Returns the updated value of one parameter. Weight decay applies to
    /// matrices only: norms and biases (`rank == 1`) are not decayed.
    pub fn update(&mut self, name: &str, rank: usize, value: Tensor<1>, grad: Tensor<1>, lr: f64) -> Tensor<1> {
        let t = (self.step + 1) as i32;
        let moments = match self.moments.remove(name) {
            Some(m) => Moments {
                first: m.first.mul_scalar(self.beta1).add(grad.clone().mul_scalar(1.0 - self.beta1)),
                second: m.second.mul_scalar(self.beta2).add(grad.square().mul_scalar(1.0 - self.beta2)),
            },
            None => Moments {
                first: grad.clone().mul_scalar(1.0 - self.beta1),
                second: grad.square().mul_scalar(1.0 - self.beta2),
            },
        };
        let first_hat = moments.first.clone().div_scalar(1.0 - self.beta1.powi(t));
        let second_hat = moments.second.clone().div_scalar(1.0 - self.beta2.powi(t));
        let delta = first_hat.div(second_hat.sqrt().add_scalar(self.eps));
        self.moments.insert(name.to_string(), moments);

        let decayed = if rank >= 2 && self.weight_decay > 0.0 {
            value.mul_scalar(1.0 - lr * self.weight_decay)
        } else {
            value
        };
        decayed.sub(delta.mul_scalar(lr))
    }
}

/// Global L2 norm of all gradients together, read to the host.
pub fn global_norm(gradients: &[Tensor<1>]) -> f64 {
    if gradients.is_empty() {
        return 0.0;
    }
    let squares: Vec<Tensor<1>> = gradients.iter().map(|g| g.clone().square().sum()).collect();
    let total = Tensor::cat(squares, 0).sum();
    (total.into_scalar::<f32>() as f64).sqrt()
}

/// Scale that brings a gradient of norm `norm` down to `max_norm`; 1 when
/// clipping is off or not needed.
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm { max_norm / (norm + 1e-6) } else { 1.0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_config;

    fn train_config() -> TrainConfig {
        let text = include_str!("../../../configs/tiny-dagmoe.toml");
        let mut config = parse_config(text, "tiny", &[]).unwrap().train;
        config.steps = 100;
        config.warmup_steps = 10;
        config.lr = 1e-3;
        config.min_lr_ratio = 0.1;
        config
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let config = train_config();
        assert!((learning_rate(&config, 0) - 1e-4).abs() < 1e-12);
        assert!((learning_rate(&config, 9) - 1e-3).abs() < 1e-12);
        assert!((learning_rate(&config, 10) - 1e-3).abs() < 1e-12);
        assert!((learning_rate(&config, 100) - 1e-4).abs() < 1e-12);
        let mid = learning_rate(&config, 55);
        assert!((mid - 5.5e-4).abs() < 1e-9, "{mid}");
    }

    #[test]
    fn constant_and_wsd_schedules() {
        let mut config = train_config();
        config.schedule = Schedule::Constant;
        assert_eq!(learning_rate(&config, 99), 1e-3);
        config.schedule = Schedule::Wsd;
        config.decay_steps = 20;
        assert_eq!(learning_rate(&config, 79), 1e-3);
        assert!((learning_rate(&config, 80) - 1e-3).abs() < 1e-12);
        assert!((learning_rate(&config, 90) - 5.5e-4).abs() < 1e-12);
        assert!((learning_rate(&config, 100) - 1e-4).abs() < 1e-12);
    }

    #[test]
    fn global_norm_covers_all_parameters() {
        let device = dagmoe_model::parse_device("cpu").unwrap();
        let a = Tensor::<1>::from_floats([3.0, 0.0, 0.0], &device);
        let b = Tensor::<1>::from_floats([0.0, 4.0], &device);
        let c = Tensor::<1>::from_floats([12.0], &device);
        // sqrt(9 + 16 + 144) = 13, not the largest per-tensor norm 12.
        assert!((global_norm(&[a, b, c]) - 13.0).abs() < 1e-6);
    }

    #[test]
    fn clip_scale_limits_norm() {
        assert_eq!(clip_scale(0.5, 1.0), 1.0);
        assert!((clip_scale(4.0, 1.0) * 4.0 - 1.0).abs() < 1e-6);
        assert_eq!(clip_scale(4.0, 0.0), 1.0);
    }
}
