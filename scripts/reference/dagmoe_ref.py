"""Independent PyTorch reference of the dagmoe model, for interoperability tests.

It reads a dagmoe checkpoint directory (config.toml and model.safetensors),
rebuilds the forward pass from the model description in the README and the
DAG-MoE paper, and writes the logits for given token ids. The DAG level is
computed in the literal concatenation form, materializing the
[tokens, K, K, 2 * d_g] pair tensor that dagmoe avoids, so the test also
checks dagmoe's split-matrix algebra.

Usage:
    python scripts/reference/dagmoe_ref.py --checkpoint DIR --tokens IN.json --output OUT.json

IN.json holds {"tokens": [[id, ...], ...]} (a batch of equal-length rows);
OUT.json receives {"logits": [[[float, ...], ...], ...]} of shape [batch, time, vocab].
Only torch and the standard library are needed.
"""

import argparse
import json
import struct
import tomllib
import warnings

# The torch wheel runs without NumPy here; its import-time warning about that is noise.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def load_safetensors(path):
    """Reads an f32 safetensors file into a dict of tensors (no safetensors package needed)."""
    with open(path, "rb") as file:
        header_len = struct.unpack("<Q", file.read(8))[0]
        header = json.loads(file.read(header_len))
        body = file.read()
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", f"{name}: dtype {info['dtype']}"
        start, end = info["data_offsets"]
        values = torch.frombuffer(bytearray(body[start:end]), dtype=torch.float32)
        tensors[name] = values.reshape(info["shape"])
    return tensors


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def swiglu(x, w, prefix):
    return (F.silu(x @ w[prefix + ".w_gate"]) * (x @ w[prefix + ".w_up"])) @ w[prefix + ".w_down"]


def rotary(x, theta):
    """Half-split rotary embedding of x [b, h, t, c]: channel j pairs with j + c/2."""
    _, _, t, c = x.shape
    half = c // 2
    frequencies = theta ** (-torch.arange(half, dtype=torch.float64) * 2.0 / c)
    angles = torch.arange(t, dtype=torch.float64)[:, None] * frequencies[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().float(), angles.sin().float()
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attention(x, w, prefix, cfg):
    b, t, d = x.shape
    heads, kv_heads = cfg["n_heads"], cfg["n_kv_heads"]
    c = d // heads
    q = (x @ w[prefix + ".wq"]).view(b, t, heads, c).transpose(1, 2)
    k = (x @ w[prefix + ".wk"]).view(b, t, kv_heads, c).transpose(1, 2)
    v = (x @ w[prefix + ".wv"]).view(b, t, kv_heads, c).transpose(1, 2)
    q, k = rotary(q, cfg["rope_theta"]), rotary(k, cfg["rope_theta"])
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(1, 2).reshape(b, t, d) @ w[prefix + ".wo"]


def node_norm(nodes, w, prefix, cfg):
    eps = cfg["norm_eps"]
    if cfg["dag"]["norm"] == "layer-norm":
        return F.layer_norm(nodes, nodes.shape[-1:], w[prefix + ".layer_norm.weight"], w[prefix + ".layer_norm.bias"], eps)
    return rms_norm(nodes, w[prefix + ".rms_norm.weight"], eps)


def dag_level(nodes, w, prefix, cfg):
    """One DAG level in the concatenation form: e_ij = sigmoid([u_i; u_j] W_edge + b),
    a scalar or (with vector edge gates) a d_g vector per edge."""
    u = node_norm(nodes, w, prefix, cfg) @ w[prefix + ".w_down"]  # [t, k, g]
    t, k, g = u.shape
    pairs = torch.cat([u[:, :, None, :].expand(t, k, k, g), u[:, None, :, :].expand(t, k, k, g)], dim=-1)
    edges = torch.sigmoid(pairs @ w[prefix + ".w_edge"] + w[prefix + ".b_edge"])  # [t, k, k, 1 or g]
    messages = (edges * (pairs @ w[prefix + ".w_node"])).sum(dim=2)  # sum over senders j
    return nodes + messages @ w[prefix + ".w_up"]


def moe(x, w, prefix, cfg):
    """An MoE layer; Chain-of-Experts runs several routing rounds x_{r+1} = x_r + y_r
    with a router each and returns x_R - x_0."""
    moe_cfg = cfg["moe"]
    if moe_cfg["aggregation"] != "chain-of-experts":
        return moe_round(x, w, prefix, prefix + ".router", cfg)
    routers = [prefix + ".router"] + [f"{prefix}.round_routers.{r}" for r in range(moe_cfg.get("rounds", 2) - 1)]
    state = x
    for router in routers:
        state = state + moe_round(state, w, prefix, router, cfg)
    return state - x


def moe_round(x, w, prefix, router, cfg):
    moe_cfg = cfg["moe"]
    t, d = x.shape
    k = moe_cfg["top_k"]
    probs = torch.softmax((x @ w[router]).float(), dim=-1)
    gates, experts = probs.topk(k, dim=-1)
    if moe_cfg.get("renormalize_gates", False):
        gates = gates / gates.sum(-1, keepdim=True)
    nodes = torch.zeros(t, k, d)
    for e in range(moe_cfg["n_experts"]):
        tokens, slots = (experts == e).nonzero(as_tuple=True)
        if len(tokens):
            nodes[tokens, slots] = swiglu(x[tokens], w, f"{prefix}.experts.{e}")
    nodes = nodes * gates[..., None]
    if moe_cfg["aggregation"] == "dag":
        dag = cfg["dag"]
        if dag["inject_input"]:
            nodes = nodes + (x / k if dag["scale_injection"] else x)[:, None, :]
        for level in range(dag["depth"]):
            nodes = dag_level(nodes, w, f"{prefix}.dag.levels.{level}", cfg)
    y = nodes.sum(dim=1)
    if moe_cfg["aggregation"] == "mlp-mix":
        mix = prefix + ".mlp_mix"
        u = node_norm(nodes, w, mix, cfg) @ w[mix + ".w_down"]
        y = y + F.silu(u.sum(dim=1)) @ w[mix + ".w_up"]
    if moe_cfg.get("shared_expert_hidden", 0) > 0:
        y = y + swiglu(x, w, prefix + ".shared_expert")
    return y


def forward(tokens, w, cfg):
    h = w["embedding"][tokens]
    b, t, d = h.shape
    eps = cfg["norm_eps"]
    for layer in range(cfg["n_layers"]):
        prefix = f"blocks.{layer}"
        a = h + attention(rms_norm(h, w[prefix + ".attention_norm.weight"], eps), w, prefix + ".attention", cfg)
        x = rms_norm(a, w[prefix + ".ffn_norm.weight"], eps)
        if (layer + 1) % cfg["moe"].get("every", 1) == 0:
            ffn = moe(x.reshape(b * t, d), w, prefix + ".moe", cfg).reshape(b, t, d)
        else:
            ffn = swiglu(x, w, prefix + ".dense")
        h = a + ffn
    h = rms_norm(h, w["final_norm.weight"], eps)
    head = w["embedding"].T if cfg.get("tie_embeddings", False) else w["lm_head"]
    return h @ head


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with open(f"{args.checkpoint}/config.toml", "rb") as file:
        cfg = tomllib.load(file)["model"]
    weights = load_safetensors(f"{args.checkpoint}/model.safetensors")
    with open(args.tokens) as file:
        tokens = torch.tensor(json.load(file)["tokens"], dtype=torch.long)
    with torch.no_grad():
        logits = forward(tokens, weights, cfg)
    with open(args.output, "w") as file:
        json.dump({"logits": logits.tolist()}, file)


if __name__ == "__main__":
    main()
