"""Writes the golden fixture of one DAG-MoE layer from a fixed seed.

The layer is the reference implementation in dagmoe_ref.py: router, sparse
top-K experts and a two-level DAG, with non-zero W_up so that every weight is
on the gradient path. The fixture holds the config, every weight, an input,
the output, and the gradients of sum(output * probe) with respect to the
input and every weight, all f32.

Usage (writes the committed file):
    .venv/bin/python scripts/reference/make_fixture.py \
        crates/dagmoe-model/tests/fixtures/dag_layer.json
"""

import json
import sys
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402

from dagmoe_ref import moe  # noqa: E402

SEED = 20261204
TOKENS, D_MODEL, EXPERTS, TOP_K, D_EXPERT, D_G, DEPTH = 7, 12, 5, 3, 10, 6, 2


def main():
    torch.manual_seed(SEED)
    cfg = {
        "norm_eps": 1e-5,
        "moe": {"n_experts": EXPERTS, "top_k": TOP_K, "aggregation": "dag", "shared_expert_hidden": 0},
        "dag": {"depth": DEPTH, "d_g": D_G, "inject_input": True, "scale_injection": True, "norm": "layer-norm"},
    }
    shapes = {"router": [D_MODEL, EXPERTS]}
    for e in range(EXPERTS):
        shapes[f"experts.{e}.w_gate"] = [D_MODEL, D_EXPERT]
        shapes[f"experts.{e}.w_up"] = [D_MODEL, D_EXPERT]
        shapes[f"experts.{e}.w_down"] = [D_EXPERT, D_MODEL]
    for level in range(DEPTH):
        prefix = f"dag.levels.{level}"
        shapes[f"{prefix}.layer_norm.weight"] = [D_MODEL]
        shapes[f"{prefix}.layer_norm.bias"] = [D_MODEL]
        shapes[f"{prefix}.w_down"] = [D_MODEL, D_G]
        shapes[f"{prefix}.w_edge"] = [2 * D_G, 1]
        shapes[f"{prefix}.b_edge"] = [1]
        shapes[f"{prefix}.w_node"] = [2 * D_G, D_G]
        shapes[f"{prefix}.w_up"] = [D_G, D_MODEL]
    weights = {}
    for name, shape in shapes.items():
        value = torch.randn(shape) * 0.3
        if name.endswith("layer_norm.weight"):
            value = 1.0 + value
        weights["layer." + name] = value.requires_grad_()
    x = torch.randn(TOKENS, D_MODEL, requires_grad=True)
    probe = torch.randn(TOKENS, D_MODEL)

    y = moe(x, weights, "layer", cfg)
    (y * probe).sum().backward()

    def pack(tensor):
        return {"shape": list(tensor.shape), "data": tensor.detach().reshape(-1).tolist()}

    fixture = {
        "note": "written by scripts/reference/make_fixture.py with torch 2.9.0, seed " + str(SEED),
        "config": cfg,
        "dims": {"tokens": TOKENS, "d_model": D_MODEL, "d_expert": D_EXPERT},
        "input": pack(x),
        "probe": pack(probe),
        "output": pack(y),
        "input_grad": pack(x.grad),
        "weights": {name[len("layer."):]: pack(w) for name, w in weights.items()},
        "weight_grads": {name[len("layer."):]: pack(w.grad) for name, w in weights.items()},
    }
    with open(sys.argv[1], "w") as file:
        json.dump(fixture, file)


if __name__ == "__main__":
    main()
