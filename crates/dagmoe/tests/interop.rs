//! The PyTorch reference in scripts/reference/dagmoe_ref.py loads dagmoe
//! checkpoints and reproduces their logits on real tokens. The reference is
//! written independently from the model description and computes the DAG
//! in the concatenation form, so agreement checks the parameter names and
//! layouts, every layer, and the split-matrix algebra of the DAG.

mod common;

use std::process::Command;

use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData};
use common::{Fixture, repo_path};
use dagmoe::checkpoint::Checkpoint;
use dagmoe::{Start, train};
use dagmoe_data::manifest::Split;
use dagmoe_data::{Manifest, TokenStream};

/// Largest absolute logit difference accepted: f32 round-off of two
/// libtorch CPU implementations over a few layers, with margin.
const TOLERANCE: f32 = 1e-4;

#[test]
fn pytorch_reference_reproduces_logits() {
    let fixture = Fixture::new();
    let variants: &[(&str, &[&str])] = &[
        ("tiny-moe", &[]),
        ("tiny-dagmoe", &["model.dag.depth=2"]),
        ("tiny-dagmoe", &["model.dag.edge_gate=\"vector\""]),
        ("tiny-moe", &["model.moe.aggregation=\"chain-of-experts\"", "model.moe.rounds=3"]),
        ("tiny-moe", &["model.moe.aggregation=\"mlp-mix\""]),
        (
            "tiny-dagmoe",
            &[
                "model.dag.norm=\"rms-norm\"",
                "model.dag.scale_injection=false",
                "model.tie_embeddings=true",
                "model.moe.every=2",
                "model.moe.renormalize_gates=true",
                "model.moe.shared_expert_hidden=6",
                "model.n_kv_heads=4",
            ],
        ),
    ];
    let stream = {
        let dir = fixture.path("prepared");
        TokenStream::open(&dir, &Manifest::load(&dir).unwrap(), Split::Valid).unwrap()
    };
    let mut ids = vec![0u32; 2 * 32];
    stream.read(100, &mut ids);

    for (index, (config, overrides)) in variants.iter().enumerate() {
        let mut settings = vec!["train.steps=20"];
        settings.extend_from_slice(overrides);
        let summary = train(fixture.config(config, &format!("run-{index}"), &settings), Start::Scratch).unwrap();
        let checkpoint = Checkpoint::open(&summary.checkpoint).unwrap();

        let device = dagmoe_model::parse_device("cpu").unwrap().autodiff();
        let model = checkpoint.load_model(&device).unwrap().valid();
        let moved = |w: &burn::module::Param<Tensor<2>>| w.val().abs().max().into_scalar::<f32>() > 0.0;
        let up_projections_moved = model.blocks.iter().filter_map(|b| b.moe.as_ref()).all(|moe| {
            moe.dag.iter().flat_map(|dag| &dag.levels).all(|level| moved(&level.w_up))
                && moe.mlp_mix.iter().all(|mix| moved(&mix.w_up))
        });
        assert!(up_projections_moved, "{config} {overrides:?}: training left a W_up at zero, so its path would go untested");
        let tokens: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
        let input = Tensor::<2, Int>::from_data(TensorData::new(tokens, [2, 32]), &device.clone().inner());
        let logits: Vec<f32> = model.forward(input).logits_btv.into_data().iter::<f32>().collect();

        let tokens_file = fixture.path(&format!("tokens-{index}.json"));
        let output_file = fixture.path(&format!("reference-{index}.json"));
        let rows: Vec<Vec<u32>> = ids.chunks(32).map(<[u32]>::to_vec).collect();
        std::fs::write(&tokens_file, serde_json::json!({ "tokens": rows }).to_string()).unwrap();
        let status = Command::new(repo_path(".venv/bin/python"))
            .arg(repo_path("scripts/reference/dagmoe_ref.py"))
            .args(["--checkpoint".as_ref(), summary.checkpoint.as_os_str()])
            .args(["--tokens".as_ref(), tokens_file.as_os_str()])
            .args(["--output".as_ref(), output_file.as_os_str()])
            .status()
            .expect("the project's .venv from scripts/setup.sh runs the reference");
        assert!(status.success(), "the reference failed on {config} {overrides:?}");
        let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&output_file).unwrap()).unwrap();
        let reference: Vec<f32> = reference["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap().iter().flat_map(|position| position.as_array().unwrap().clone()))
            .map(|value| value.as_f64().unwrap() as f32)
            .collect();

        assert_eq!(reference.len(), logits.len());
        let max_difference = logits.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        eprintln!("{config} {overrides:?}: max |logit difference| {max_difference:.2e} over {} logits", logits.len());
        assert!(max_difference < TOLERANCE, "{config} {overrides:?}: max difference {max_difference}");
    }
}
