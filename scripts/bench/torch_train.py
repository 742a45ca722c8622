"""Times the dagmoe training step in eager PyTorch, the baseline for `dagmoe bench`.

It builds the model of a dagmoe run config (same shapes, initialisation
scales, losses and optimizer) and times whole optimizer steps: forward,
loss, backward, global-norm clipping, AdamW and zero_grad. It prints one
JSON line with the step times and throughput.

How it maps to the Rust model (crates/dagmoe-model):
- Token-choice top-K routing with the router logits and softmax in f32.
  Dispatch is sparse, as in moe.rs. The t * K (token, slot) assignments are
  sorted by expert, and each expert runs once on its contiguous group, so an
  expert with no token is skipped. The outputs are scattered back into a
  [t, K, d] node tensor, which is multiplied by the gates. Expert weights are
  stacked per layer ([E, d_in, d_out]), as PyTorch MoE code usually stores
  them, which gives the same parameter count as one module per expert.
- The DAG levels use the split-matrix form of dag.rs. [u_i; u_j] W splits
  into u_i W_a + u_j W_b, so no [t, K, K, 2 d_g] pair tensor is built. The
  four small projections of u share one matrix product.
- Losses: mean token cross-entropy, plus load_balance_coef times the
  load-balancing loss and z_loss_coef times the router z-loss, each
  averaged over MoE layers (and over rounds in Chain-of-Experts).
- AdamW with decoupled weight decay on parameters of rank >= 2 only,
  global-norm clipping at train.grad_clip, and a finite check on the loss
  and gradient norm before the update, as in the Rust training step.

Left out on purpose: a data loader thread (each batch is drawn before its
step's timer starts), the learning-rate schedule (train.lr is used as a
constant), checkpointing, evaluation and metrics files. There is no
torch.compile and no custom kernel.

Run it on an otherwise idle machine. On a 2-core VM, 2-thread steps of
small-dagmoe.toml (with model.dag.depth=1) took about 14 s while a Rust build
used both cores, against 0.45 s on the idle VM. The likely cause is OpenMP
worker threads waiting at barriers for a descheduled peer.

Shape letters: b batch, t time or tokens, d model width, h heads, c head
width, f hidden width of a feed-forward layer, e experts, k top-k slots,
g DAG width d_g, w edge gate width (1 or d_g), v vocabulary, n rows of
(token, slot) assignments: all t * k of them sorted by expert, or one expert's group.

Example:
    .venv/bin/python scripts/bench/torch_train.py --config configs/small-dagmoe.toml \\
        --set model.dag.depth=1 --steps 10 --warmup 2 --threads 2
"""

import argparse
import dataclasses
import json
import math
import mmap
import os
import resource
import statistics
import struct
import sys
import time
import tomllib
import warnings
from contextlib import nullcontext
from pathlib import Path

# The torch wheel runs without NumPy here, so its import-time warning about that is noise.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

AGGREGATIONS = ("weighted-sum", "dag", "chain-of-experts", "mlp-mix")
SHARD_MAGIC = b"DAGMOETK"
SHARD_VERSION = 1
SHARD_HEADER_BYTES = 24


class ConfigError(Exception):
    """A config value or command-line option that cannot build the benchmark."""


# --------------------------------------------------------------------------
# Configuration: the TOML file, --set overrides, and the defaults of
# crates/dagmoe/src/config.rs and crates/dagmoe-model/src/config.rs
# --------------------------------------------------------------------------


@dataclasses.dataclass
class MoeConfig:
    n_experts: int
    top_k: int
    d_expert: int
    aggregation: str
    every: int = 1
    shared_expert_hidden: int = 0
    renormalize_gates: bool = False
    rounds: int = 2
    load_balance_coef: float = 0.01
    z_loss_coef: float = 0.001


@dataclasses.dataclass
class DagConfig:
    depth: int = 1
    d_g: int = 64
    inject_input: bool = True
    scale_injection: bool = True
    norm: str = "layer-norm"
    edge_gate: str = "scalar"


@dataclasses.dataclass
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    moe: MoeConfig
    dag: DagConfig
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02

    def is_moe_layer(self, layer):
        return (layer + 1) % self.moe.every == 0


@dataclasses.dataclass
class TrainSettings:
    """The `[data]` and `[train]` values that one optimizer step depends on."""

    seq_len: int
    batch_size: int
    grad_accum: int
    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    adam_eps: float
    grad_clip: float
    seed: int
    threads: int


def parse_override_value(raw):
    """Parse a TOML value (`3`, `1e-3`, `true`, `"text"`), or take the text as a string, as dagmoe does."""
    try:
        return tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_override(table, assignment):
    key, separator, raw = assignment.partition("=")
    path = key.strip().split(".")
    if not separator or len(path) < 2 or any(not part for part in path):
        raise ConfigError(f"invalid --set {assignment!r}: write it as section.key=value, for example model.dag.depth=1")
    current = table
    for section in path[:-1]:
        current = current.setdefault(section, {})
        if not isinstance(current, dict):
            raise ConfigError(f"invalid --set key {key!r}: {section} is a value, not a section")
    current[path[-1]] = parse_override_value(raw.strip())


def checked_value(key, value, expected):
    """Return `value` as the `expected` type (int, float, bool or str), or raise a ConfigError naming `key`."""
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool):
        raise ConfigError(f"invalid {key} = {value!r}: use an integer")
    if not isinstance(value, expected):
        raise ConfigError(f"invalid {key} = {value!r}: use a value of type {expected.__name__}")
    return value


def build_dataclass(cls, table, section):
    """Build `cls` from a TOML table, naming the key of an unknown, missing or mistyped value."""
    fields = {field.name: field.type for field in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {section}.{unknown[0]}: remove it or correct its spelling")
    values = {}
    for name, value in table.items():
        expected = fields[name]
        values[name] = checked_value(f"{section}.{name}", value, expected) if expected in (int, float, bool, str) else value
    try:
        return cls(**values)
    except TypeError as error:
        raise ConfigError(f"[{section}] is incomplete ({error}); add the missing key or pass --set") from error


def parse_model_config(table):
    table = dict(table)
    moe = build_dataclass(MoeConfig, table.pop("moe", {}), "model.moe")
    dag = build_dataclass(DagConfig, table.pop("dag", {}), "model.dag")
    return build_dataclass(ModelConfig, {**table, "moe": moe, "dag": dag}, "model")


def validate_model_config(config):
    """Reject the values that dagmoe's ModelConfig::validate rejects and that would break this script."""
    moe, dag = config.moe, config.dag
    positive = {
        "model.vocab_size": config.vocab_size,
        "model.d_model": config.d_model,
        "model.n_layers": config.n_layers,
        "model.n_heads": config.n_heads,
        "model.n_kv_heads": config.n_kv_heads,
        "model.d_ff": config.d_ff,
        "model.moe.n_experts": moe.n_experts,
        "model.moe.top_k": moe.top_k,
        "model.moe.d_expert": moe.d_expert,
        "model.moe.every": moe.every,
    }
    for field, value in positive.items():
        if value <= 0:
            raise ConfigError(f"invalid {field} = {value}: use a positive integer")

    if config.d_model % config.n_heads != 0 or (config.d_model // config.n_heads) % 2 != 0:
        raise ConfigError(
            f"invalid model.d_model = {config.d_model}: d_model / n_heads must be an even integer "
            f"(n_heads = {config.n_heads})"
        )
    if config.n_heads % config.n_kv_heads != 0:
        raise ConfigError(f"invalid model.n_kv_heads = {config.n_kv_heads}: must divide model.n_heads = {config.n_heads}")
    if moe.top_k > moe.n_experts:
        raise ConfigError(f"invalid model.moe.top_k = {moe.top_k}: must be at most model.moe.n_experts = {moe.n_experts}")
    if moe.every > config.n_layers:
        raise ConfigError(f"invalid model.moe.every = {moe.every}: must be at most model.n_layers = {config.n_layers}")

    if moe.aggregation not in AGGREGATIONS:
        raise ConfigError(f"invalid model.moe.aggregation = {moe.aggregation!r}: use one of {', '.join(AGGREGATIONS)}")
    if moe.aggregation == "chain-of-experts" and moe.rounds <= 0:
        raise ConfigError(f"invalid model.moe.rounds = {moe.rounds}: use at least 1 routing round")
    if moe.aggregation in ("dag", "mlp-mix") and dag.d_g <= 0:
        raise ConfigError(f"invalid model.dag.d_g = {dag.d_g}: use a positive width such as 64")
    if dag.norm not in ("layer-norm", "rms-norm"):
        raise ConfigError(f"invalid model.dag.norm = {dag.norm!r}: use \"layer-norm\" or \"rms-norm\"")
    if dag.edge_gate not in ("scalar", "vector"):
        raise ConfigError(f"invalid model.dag.edge_gate = {dag.edge_gate!r}: use \"scalar\" or \"vector\"")


def parse_train_settings(table):
    data, train = table.get("data", {}), table.get("train", {})
    required = [("data", "seq_len", data), ("train", "batch_size", train), ("train", "lr", train)]
    required += [("train", "weight_decay", train), ("train", "grad_clip", train)]
    for section, key, values in required:
        if key not in values:
            raise ConfigError(f"missing {section}.{key}: add it to the config or pass --set {section}.{key}=VALUE")
    # The defaults of crates/dagmoe/src/config.rs.
    values = {
        "seq_len": data["seq_len"],
        "batch_size": train["batch_size"],
        "grad_accum": train.get("grad_accum", 1),
        "lr": train["lr"],
        "weight_decay": train["weight_decay"],
        "beta1": train.get("beta1", 0.9),
        "beta2": train.get("beta2", 0.95),
        "adam_eps": train.get("adam_eps", 1e-8),
        "grad_clip": train["grad_clip"],
        "seed": train.get("seed", 0),
        "threads": train.get("threads", 0),
    }
    for field in dataclasses.fields(TrainSettings):
        section = "data" if field.name == "seq_len" else "train"
        values[field.name] = checked_value(f"{section}.{field.name}", values[field.name], field.type)
    settings = TrainSettings(**values)

    for key in ("seq_len", "batch_size", "grad_accum"):
        if getattr(settings, key) <= 0:
            section = "data" if key == "seq_len" else "train"
            raise ConfigError(f"invalid {section}.{key} = {getattr(settings, key)}: use a positive integer")
    for key in ("lr", "weight_decay", "grad_clip"):
        if not (math.isfinite(getattr(settings, key)) and getattr(settings, key) >= 0):
            raise ConfigError(f"invalid train.{key} = {getattr(settings, key)}: use a finite value >= 0")
    return settings


def load_config(path, overrides):
    try:
        with open(path, "rb") as file:
            table = tomllib.load(file)
    except OSError as error:
        raise ConfigError(f"failed to read config {path}: {error.strerror}; pass an existing TOML file with --config") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from error
    for assignment in overrides:
        apply_override(table, assignment)
    if "model" not in table:
        raise ConfigError(f"{path} has no [model] section; pass a dagmoe run config")
    model_config = parse_model_config(table["model"])
    validate_model_config(model_config)
    return model_config, parse_train_settings(table)


# --------------------------------------------------------------------------
# Token batches: random windows of a prepared directory, or random tokens
# --------------------------------------------------------------------------


class TokenStream:
    """The train split of a prepared directory as one memory-mapped stream of its shards in manifest order."""

    def __init__(self, directory, vocab_size):
        manifest_path = Path(directory) / "manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ConfigError(f"failed to read {manifest_path}: {error}; pass a directory made by `dagmoe data prepare`") from error
        if manifest.get("vocab_size", vocab_size) > vocab_size:
            raise ConfigError(
                f"{manifest_path} has vocab_size {manifest['vocab_size']} but model.vocab_size is {vocab_size}; "
                "use the config the data was prepared for"
            )
        self.shards = [self.open_shard(Path(directory) / info["file"]) for info in manifest["train"]["shards"]]
        self.starts = []
        self.length = 0
        for shard in self.shards:
            self.starts.append(self.length)
            self.length += len(shard)

    @staticmethod
    def open_shard(path):
        with open(path, "rb") as file:
            # ACCESS_COPY gives a writable (copy-on-write) buffer, which torch.frombuffer
            # needs to avoid a warning. Nothing is written back to the file.
            buffer = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
        if len(buffer) < SHARD_HEADER_BYTES or buffer[:8] != SHARD_MAGIC:
            raise ConfigError(f"{path} is not a dagmoe token shard (bad magic number); rerun `dagmoe data prepare`")
        version, width, count = struct.unpack("<IIQ", buffer[8:SHARD_HEADER_BYTES])
        if version != SHARD_VERSION or width not in (2, 4) or len(buffer) != SHARD_HEADER_BYTES + count * width:
            raise ConfigError(
                f"{path}: header (version {version}, {width}-byte tokens, {count} tokens) does not match "
                f"the file of {len(buffer)} bytes; rerun `dagmoe data prepare`"
            )
        dtype = torch.uint16 if width == 2 else torch.uint32
        return torch.frombuffer(buffer, dtype=dtype, count=count, offset=SHARD_HEADER_BYTES)

    def read(self, start, length):
        """Return tokens start..start + length of the stream as int64, across shard boundaries."""
        pieces = []
        for shard, shard_start in zip(self.shards, self.starts):
            shard_end = shard_start + len(shard)
            if shard_end <= start or shard_start >= start + length:
                continue
            lo = max(start, shard_start) - shard_start
            hi = min(start + length, shard_end) - shard_start
            pieces.append(shard[lo:hi].to(torch.int64))
        return torch.cat(pieces)


class BatchSource:
    """Source of [b, seq_len + 1] token windows, drawn with a fixed seed.

    With a prepared directory, window w covers stream tokens
    w * seq_len ..= (w + 1) * seq_len (the windows of dagmoe's loader), taken
    in a random order per epoch. Without one, tokens are uniform below vocab_size.
    """

    def __init__(self, settings, vocab_size, data_dir):
        self.batch_size = settings.batch_size
        self.seq_len = settings.seq_len
        self.vocab_size = vocab_size
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.stream = TokenStream(data_dir, vocab_size) if data_dir else None
        self.order = []
        if self.stream is not None:
            self.windows = (self.stream.length - 1) // self.seq_len
            if self.windows < 1:
                raise ConfigError(
                    f"{data_dir} has {self.stream.length} train tokens, fewer than one window of "
                    f"seq_len + 1 = {self.seq_len + 1}; lower data.seq_len or prepare more data"
                )

    def next_window(self):
        if not self.order:
            self.order = torch.randperm(self.windows, generator=self.generator).tolist()
        window = self.order.pop()
        return self.stream.read(window * self.seq_len, self.seq_len + 1)

    def next_batch(self):
        """Return inputs and targets, both [b, seq_len] int64 on the CPU."""
        if self.stream is None:
            shape = (self.batch_size, self.seq_len + 1)
            tokens_bt = torch.randint(0, self.vocab_size, shape, generator=self.generator)
        else:
            tokens_bt = torch.stack([self.next_window() for _ in range(self.batch_size)])
            max_token = int(tokens_bt.max())
            if max_token >= self.vocab_size:
                raise ConfigError(f"token id {max_token} is not below model.vocab_size = {self.vocab_size}")
        return tokens_bt[:, :-1], tokens_bt[:, 1:]


# --------------------------------------------------------------------------
# Model: leaf modules, MoE, DAG, block, decoder
# --------------------------------------------------------------------------


def normal_parameter(shape, std):
    return nn.Parameter(torch.empty(shape).normal_(0.0, std))


def linear(d_in, d_out, std):
    """Build a bias-free nn.Linear drawn from N(0, std^2), as dagmoe's normal_weight does."""
    layer = nn.Linear(d_in, d_out, bias=False)
    nn.init.normal_(layer.weight, 0.0, std)
    return layer


def make_norm(kind, d, eps):
    return nn.LayerNorm(d, eps=eps) if kind == "layer-norm" else nn.RMSNorm(d, eps=eps)


class SwiGlu(nn.Module):
    """SwiGLU feed-forward layer: (silu(x W_gate) * x W_up) W_down."""

    def __init__(self, d, hidden, std):
        super().__init__()
        self.w_gate = linear(d, hidden, std)
        self.w_up = linear(d, hidden, std)
        self.w_down = linear(hidden, d, std)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Rotary(nn.Module):
    """Half-split rotary embedding tables: channel j pairs with channel j + c/2."""

    def __init__(self, head_dim, max_len, theta):
        super().__init__()
        half = head_dim // 2
        channel = torch.arange(head_dim, dtype=torch.float64) % half
        frequency_c = theta ** (-channel * 2.0 / head_dim)
        angle_tc = torch.arange(max_len, dtype=torch.float64)[:, None] * frequency_c[None, :]
        self.register_buffer("cos_tc", angle_tc.cos().float(), persistent=False)
        self.register_buffer("sin_tc", angle_tc.sin().float(), persistent=False)

    def forward(self, x_bhtc):
        t, c = x_bhtc.shape[2], x_bhtc.shape[3]
        cos_tc = self.cos_tc[:t].to(x_bhtc.dtype)
        sin_tc = self.sin_tc[:t].to(x_bhtc.dtype)
        rotated_bhtc = torch.cat([-x_bhtc[..., c // 2 :], x_bhtc[..., : c // 2]], dim=-1)
        return x_bhtc * cos_tc + rotated_bhtc * sin_tc


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary embeddings."""

    def __init__(self, d, n_heads, n_kv_heads, std):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        head_dim = d // n_heads
        self.wq = linear(d, n_heads * head_dim, std)
        self.wk = linear(d, n_kv_heads * head_dim, std)
        self.wv = linear(d, n_kv_heads * head_dim, std)
        self.wo = linear(n_heads * head_dim, d, std)

    def forward(self, x_btd, rotary):
        b, t, d = x_btd.shape
        c = d // self.n_heads
        q_bhtc = rotary(self.wq(x_btd).view(b, t, self.n_heads, c).transpose(1, 2))
        k_bhtc = rotary(self.wk(x_btd).view(b, t, self.n_kv_heads, c).transpose(1, 2))
        v_bhtc = self.wv(x_btd).view(b, t, self.n_kv_heads, c).transpose(1, 2)
        out_bhtc = F.scaled_dot_product_attention(q_bhtc, k_bhtc, v_bhtc, is_causal=True, enable_gqa=True)
        return self.wo(out_bhtc.transpose(1, 2).reshape(b, t, d))


class Experts(nn.Module):
    """The routed SwiGLU experts of one MoE layer, with weights stacked per expert."""

    def __init__(self, n_experts, d, hidden, std):
        super().__init__()
        self.w_gate_edf = normal_parameter((n_experts, d, hidden), std)
        self.w_up_edf = normal_parameter((n_experts, d, hidden), std)
        self.w_down_efd = normal_parameter((n_experts, hidden, d), std)

    def forward(self, x_sorted_nd, counts):
        """Run expert j on its counts[j] rows of x_sorted, which follow the rows of experts 0..j-1.

        Splitting the input and unbinding the weights (not slicing them per
        expert) keeps the backward pass to one concatenation and one stack,
        where per-expert slices would each allocate a full-size zero gradient.
        """
        groups = torch.split(x_sorted_nd, counts)
        weights = zip(self.w_gate_edf.unbind(0), self.w_up_edf.unbind(0), self.w_down_efd.unbind(0))
        outputs = []
        for x_nd, count, (w_gate_df, w_up_df, w_down_fd) in zip(groups, counts, weights):
            if count == 0:
                continue
            outputs.append((F.silu(x_nd @ w_gate_df) * (x_nd @ w_up_df)) @ w_down_fd)
        return torch.cat(outputs)

    def forward_dense(self, x_td):
        """Run every expert on every token into [t, e, d], the naive reference for --check."""
        hidden_etf = F.silu(torch.einsum("td,edf->etf", x_td, self.w_gate_edf))
        hidden_etf = hidden_etf * torch.einsum("td,edf->etf", x_td, self.w_up_edf)
        return torch.einsum("etf,efd->ted", hidden_etf, self.w_down_efd)


class DagLevel(nn.Module):
    """One message-passing level of the DAG over a token's K nodes.

    u_i = norm(x_i) W_down, e_ij = sigmoid([u_i; u_j] W_edge + b_edge),
    m_ij = e_ij * ([u_i; u_j] W_node), x_i' = x_i + (sum_j m_ij) W_up.
    Rows 0..g of W_edge and W_node act on the receiver i, rows g..2g on the sender j.
    """

    def __init__(self, d, config, eps, std):
        super().__init__()
        g = config.d_g
        w = 1 if config.edge_gate == "scalar" else g
        self.norm = make_norm(config.norm, d, eps)
        self.w_down = normal_parameter((d, g), std)
        self.w_edge = normal_parameter((2 * g, w), std)
        self.b_edge = nn.Parameter(torch.zeros(w))
        self.w_node = normal_parameter((2 * g, g), std)
        # Zero at initialisation, so a new DAG starts as the weighted sum plus x.
        self.w_up = nn.Parameter(torch.zeros(g, d))

    def forward(self, x_tkd):
        u_tkg = self.norm(x_tkd) @ self.w_down
        g, w = self.w_node.shape[1], self.w_edge.shape[1]

        # The four receiver and sender projections of u in one matrix product.
        w_split = torch.cat([self.w_node[:g], self.w_node[g:], self.w_edge[:g], self.w_edge[g:]], dim=1)
        projected = u_tkg @ w_split
        receiver_tkg, sender_tkg, edge_receiver_tkw, edge_sender_tkw = projected.split([g, g, w, w], dim=-1)

        # Every ordered pair (i, j) is an edge, i == j included.
        if w == 1:
            # sum_j e_ij (u_i N_a + u_j N_b) = (u_i N_a) sum_j e_ij + sum_j e_ij (u_j N_b).
            edge_tkk = torch.sigmoid(edge_receiver_tkw + edge_sender_tkw.transpose(1, 2) + self.b_edge)
            message_tkg = receiver_tkg * edge_tkk.sum(dim=2, keepdim=True) + torch.bmm(edge_tkk, sender_tkg)
        else:
            # Vector edges gate each channel, so the [t, k, k, g] gate tensor is built.
            edge_tkkg = torch.sigmoid(edge_receiver_tkw[:, :, None, :] + edge_sender_tkw[:, None, :, :] + self.b_edge)
            message_tkg = receiver_tkg * edge_tkkg.sum(dim=2) + (edge_tkkg * sender_tkg[:, None, :, :]).sum(dim=2)
        return x_tkd + message_tkg @ self.w_up

    def forward_concat(self, x_tkd):
        """Compute the level in the concatenation form with its [t, k, k, 2g] pair tensor, the reference for --check."""
        u_tkg = self.norm(x_tkd) @ self.w_down
        t, k, g = u_tkg.shape
        pairs = torch.cat([u_tkg[:, :, None, :].expand(t, k, k, g), u_tkg[:, None, :, :].expand(t, k, k, g)], dim=-1)
        edges = torch.sigmoid(pairs @ self.w_edge + self.b_edge)
        messages_tkg = (edges * (pairs @ self.w_node)).sum(dim=2)
        return x_tkd + messages_tkg @ self.w_up


class MlpMix(nn.Module):
    """The mlp-mix ablation: y = sum_i x_i + W_up silu(sum_i W_down norm(x_i)), W_up zero at initialisation."""

    def __init__(self, d, config, eps, std):
        super().__init__()
        self.norm = make_norm(config.norm, d, eps)
        self.w_down = normal_parameter((d, config.d_g), std)
        self.w_up = nn.Parameter(torch.zeros(config.d_g, d))

    def forward(self, x_tkd):
        mixed_tg = F.silu((self.norm(x_tkd) @ self.w_down).sum(dim=1))
        return x_tkd.sum(dim=1) + mixed_tg @ self.w_up


class MoeLayer(nn.Module):
    """Router, routed experts and the configured aggregation of the K expert outputs."""

    def __init__(self, d, config, eps):
        super().__init__()
        moe, dag, std = config.moe, config.dag, config.init_std
        self.top_k = moe.top_k
        self.n_experts = moe.n_experts
        self.aggregation = moe.aggregation
        self.renormalize_gates = moe.renormalize_gates
        self.injection_scale = None
        if moe.aggregation == "dag" and dag.inject_input:
            self.injection_scale = 1.0 / moe.top_k if dag.scale_injection else 1.0
        extra_rounds = moe.rounds - 1 if moe.aggregation == "chain-of-experts" else 0

        self.router = linear(d, moe.n_experts, std)
        self.round_routers = nn.ModuleList(linear(d, moe.n_experts, std) for _ in range(extra_rounds))
        self.experts = Experts(moe.n_experts, d, moe.d_expert, std)
        self.shared_expert = SwiGlu(d, moe.shared_expert_hidden, std) if moe.shared_expert_hidden > 0 else None
        self.dag_levels = nn.ModuleList()
        if moe.aggregation == "dag":
            self.dag_levels.extend(DagLevel(d, dag, eps, std) for _ in range(dag.depth))
        self.mlp_mix = MlpMix(d, dag, eps, std) if moe.aggregation == "mlp-mix" else None

    def forward(self, x_td):
        """Return y [t, d] and this layer's load-balancing loss and z-loss (unscaled)."""
        if not self.round_routers:
            return self.forward_round(x_td, self.router)

        # Chain-of-Experts: x_{r+1} = x_r + y_r with a router per round. The
        # layer returns x_R - x_0, and the auxiliary losses average over rounds.
        state_td = x_td
        load_balance, z_loss = 0.0, 0.0
        routers = [self.router, *self.round_routers]
        for router in routers:
            y_td, round_balance, round_z = self.forward_round(state_td, router)
            state_td = state_td + y_td
            load_balance, z_loss = load_balance + round_balance, z_loss + round_z
        return state_td - x_td, load_balance / len(routers), z_loss / len(routers)

    def route(self, x_td, router):
        """Return router logits and probabilities [t, e] in f32, gates [t, k] and expert ids [t, k]."""
        with torch.autocast(x_td.device.type, enabled=False):
            logits_te = F.linear(x_td.float(), router.weight.float())
            probs_te = torch.softmax(logits_te, dim=-1)
        gates_tk, experts_tk = probs_te.topk(self.top_k, dim=-1)
        if self.renormalize_gates:
            gates_tk = gates_tk / gates_tk.sum(dim=-1, keepdim=True)
        return logits_te, probs_te, gates_tk, experts_tk

    def dispatch(self, x_td, experts_tk):
        """Run each expert once on the tokens routed to it, and return nodes [t, k, d] and counts [e]."""
        t, d = x_td.shape
        k = self.top_k
        expert_of_slot = experts_tk.reshape(-1)
        counts_e = torch.bincount(expert_of_slot, minlength=self.n_experts)
        # A stable sort keeps each expert's slots in (token, slot) order, like dagmoe's counting sort.
        order = torch.argsort(expert_of_slot, stable=True)
        x_sorted_nd = x_td.index_select(0, order // k)
        # The group sizes are read to the host once per layer, as in dagmoe.
        out_sorted_nd = self.experts(x_sorted_nd, counts_e.tolist())
        nodes_tkd = out_sorted_nd.new_empty(t * k, d).index_copy(0, order, out_sorted_nd).view(t, k, d)
        return nodes_tkd, counts_e

    def forward_round(self, x_td, router):
        t = x_td.shape[0]
        logits_te, probs_te, gates_tk, experts_tk = self.route(x_td, router)
        nodes_tkd, counts_e = self.dispatch(x_td, experts_tk)
        y_td = self.aggregate(x_td, nodes_tkd * gates_tk.unsqueeze(-1))

        # Load balancing is n_experts * sum_j f_j P_j, where the fraction f_j of
        # assignments is a count without gradient. The z-loss is the mean logsumexp^2.
        fraction_e = counts_e.float() / (t * self.top_k)
        load_balance = self.n_experts * (fraction_e * probs_te.mean(dim=0)).sum()
        z_loss = torch.logsumexp(logits_te, dim=-1).square().mean()
        return y_td, load_balance, z_loss

    def aggregate(self, x_td, weighted_tkd):
        """Combine the gated node outputs [t, k, d] into y [t, d]."""
        if self.aggregation == "dag":
            nodes_tkd = weighted_tkd
            if self.injection_scale is not None:
                # The injected x is the MoE input (the normalised hidden state).
                nodes_tkd = nodes_tkd + (x_td * self.injection_scale).unsqueeze(1)
            for level in self.dag_levels:
                nodes_tkd = level(nodes_tkd)
            y_td = nodes_tkd.sum(dim=1)
        elif self.mlp_mix is not None:
            y_td = self.mlp_mix(weighted_tkd)
        else:
            y_td = weighted_tkd.sum(dim=1)
        if self.shared_expert is not None:
            y_td = y_td + self.shared_expert(x_td)
        return y_td


class Block(nn.Module):
    """A pre-norm block: a = h + Attention(RMSNorm(h)), then h' = a + FFN(RMSNorm(a)) with a dense or MoE FFN."""

    def __init__(self, config, is_moe):
        super().__init__()
        d, eps, std = config.d_model, config.norm_eps, config.init_std
        self.attention_norm = nn.RMSNorm(d, eps=eps)
        self.attention = Attention(d, config.n_heads, config.n_kv_heads, std)
        self.ffn_norm = nn.RMSNorm(d, eps=eps)
        self.dense = None if is_moe else SwiGlu(d, config.d_ff, std)
        self.moe = MoeLayer(d, config, eps) if is_moe else None

    def forward(self, h_btd, rotary):
        """Return h' [b, t, d] and the MoE layer's auxiliary losses (None in a dense block)."""
        a_btd = h_btd + self.attention(self.attention_norm(h_btd), rotary)
        x_btd = self.ffn_norm(a_btd)
        if self.dense is not None:
            return a_btd + self.dense(x_btd), None
        b, t, d = x_btd.shape
        y_td, load_balance, z_loss = self.moe(x_btd.reshape(b * t, d))
        return a_btd + y_td.view(b, t, d), (load_balance, z_loss)


class DagMoeModel(nn.Module):
    def __init__(self, config, max_len):
        super().__init__()
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.embedding.weight, 0.0, config.init_std)
        self.blocks = nn.ModuleList(Block(config, config.is_moe_layer(layer)) for layer in range(config.n_layers))
        self.final_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = None if config.tie_embeddings else linear(config.d_model, config.vocab_size, config.init_std)
        self.rotary = Rotary(config.d_model // config.n_heads, max_len, config.rope_theta)

    def forward(self, tokens_bt):
        """Return logits [b, t, v] and the load-balancing loss and z-loss averaged over MoE layers."""
        h_btd = self.embedding(tokens_bt)
        balance_losses, z_losses = [], []
        for block in self.blocks:
            h_btd, aux = block(h_btd, self.rotary)
            if aux is not None:
                balance_losses.append(aux[0])
                z_losses.append(aux[1])
        h_btd = self.final_norm(h_btd)
        head = self.embedding.weight if self.lm_head is None else self.lm_head.weight
        logits_btv = F.linear(h_btd, head)
        return logits_btv, torch.stack(balance_losses).mean(), torch.stack(z_losses).mean()


# --------------------------------------------------------------------------
# Training step
# --------------------------------------------------------------------------


def build_optimizer(model, settings):
    """Build AdamW with decoupled weight decay on matrices only (rank >= 2), as crates/dagmoe/src/optim.rs applies it."""
    decayed = [p for p in model.parameters() if p.ndim >= 2]
    not_decayed = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decayed, "weight_decay": settings.weight_decay},
        {"params": not_decayed, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=settings.lr,
        betas=(settings.beta1, settings.beta2),
        eps=settings.adam_eps,
        foreach=True,
    )


def train_step(model, optimizer, batches, model_config, settings, autocast):
    """Run one optimizer step over the micro-batches and return (loss, grad_norm) as floats.

    As in dagmoe, the LM loss of each micro-batch is its summed token NLL
    divided by the target tokens of the whole step, and the auxiliary losses
    are averaged over micro-batches.
    """
    moe = model_config.moe
    step_tokens = sum(targets_bt.numel() for _, targets_bt in batches)

    # Forward and backward of each micro-batch, accumulating gradients.
    loss_sum = 0.0
    for inputs_bt, targets_bt in batches:
        with autocast():
            logits_btv, load_balance, z_loss = model(inputs_bt)
        lm_loss = F.cross_entropy(logits_btv.flatten(0, 1).float(), targets_bt.flatten(), reduction="sum") / step_tokens
        aux_loss = (moe.load_balance_coef * load_balance + moe.z_loss_coef * z_loss) / len(batches)
        loss = lm_loss + aux_loss
        loss.backward()
        loss_sum = loss_sum + loss.detach()

    # Global-norm clipping over all parameters together (0 turns clipping off).
    parameters = [p for p in model.parameters() if p.grad is not None]
    if settings.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, settings.grad_clip, foreach=True)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters], foreach=True)

    # Finite check before any weight changes. It reads both scalars to the host, as dagmoe does.
    loss_value, norm_value = float(loss_sum), float(grad_norm)
    if math.isfinite(loss_value) and math.isfinite(norm_value):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, norm_value


# --------------------------------------------------------------------------
# --check: the fast paths against their naive references
# --------------------------------------------------------------------------


def run_checks(model, batch_source, device):
    """Compare sparse dispatch and the split-matrix DAG with their naive forms on first-layer activations.

    Print one line per check to stderr, and return True when every difference is within its tolerance.
    """
    moe_layers = [block.moe for block in model.blocks if block.moe is not None]
    layer = moe_layers[0]
    inputs_bt, _ = batch_source.next_batch()
    torch.manual_seed(7)
    passed = True

    def report(name, difference, tolerance):
        nonlocal passed
        ok = difference <= tolerance
        passed = passed and ok
        print(f"check {name}: max abs difference {difference:.3e} (tolerance {tolerance:.0e}) {'ok' if ok else 'FAILED'}", file=sys.stderr)

    with torch.no_grad():
        block = model.blocks[0]
        h_btd = model.embedding(inputs_bt.to(device))
        a_btd = h_btd + block.attention(block.attention_norm(h_btd), model.rotary)
        x_td = block.ffn_norm(a_btd).flatten(0, 1)
        _, _, gates_tk, experts_tk = layer.route(x_td, layer.router)

    # Sparse dispatch against every expert on every token followed by a gather,
    # for both the outputs and the expert weight gradients.
    expert_weights = list(layer.experts.parameters())
    sparse_tkd, _ = layer.dispatch(x_td, experts_tk)
    probe_tkd = torch.randn_like(sparse_tkd)
    sparse_grads = torch.autograd.grad((sparse_tkd * probe_tkd).sum(), expert_weights)
    all_ted = layer.experts.forward_dense(x_td)
    dense_tkd = all_ted.gather(1, experts_tk.unsqueeze(-1).expand(-1, -1, all_ted.shape[-1]))
    dense_grads = torch.autograd.grad((dense_tkd * probe_tkd).sum(), expert_weights)
    report("sparse dispatch = dense gather", (sparse_tkd - dense_tkd).abs().max().item(), 1e-5)
    grad_difference = max((a - b).abs().max().item() for a, b in zip(sparse_grads, dense_grads))
    report("sparse dispatch expert gradients = dense gather", grad_difference, 1e-4)

    with torch.no_grad():
        sparse_tkd = sparse_tkd.detach()
        weighted_tkd = sparse_tkd * gates_tk.unsqueeze(-1)
        if layer.aggregation == "dag":
            # With W_up zero (as initialised) the DAG returns the weighted sum plus
            # the K injected copies of x (x itself when they are scaled by 1/K).
            expected_td = weighted_tkd.sum(dim=1)
            if layer.injection_scale is not None:
                expected_td = expected_td + x_td * (layer.injection_scale * layer.top_k)
            if layer.shared_expert is not None:
                expected_td = expected_td + layer.shared_expert(x_td)
            report("DAG with zero W_up = weighted sum + x", (layer.aggregate(x_td, weighted_tkd) - expected_td).abs().max().item(), 1e-5)

        if layer.dag_levels:
            # With W_up random, the split-matrix form against the concatenation form.
            level = layer.dag_levels[0]
            saved_up, saved_bias = level.w_up.clone(), level.b_edge.clone()
            level.w_up.normal_(0.0, 0.02)
            level.b_edge.normal_(0.0, 0.5)
            nodes_tkd = weighted_tkd + x_td.unsqueeze(1) / layer.top_k
            difference = (level(nodes_tkd) - level.forward_concat(nodes_tkd)).abs().max().item()
            level.w_up.copy_(saved_up)
            level.b_edge.copy_(saved_bias)
            report("split-matrix DAG level = concatenation form", difference, 1e-5)
    return passed


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Time the dagmoe training step in eager PyTorch and print one JSON line.",
    )
    parser.add_argument("--config", required=True, help="dagmoe run config (TOML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. model.dag.depth=1 (value in TOML syntax); repeatable")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before the timed ones (default 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads value; default: the config's train.threads, where 0 means every core")
    parser.add_argument("--data", default=None,
                        help="prepared data directory to draw train windows from; default: random tokens")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="float32 (default), or bfloat16 to run the model under autocast with the router and the losses in float32")
    parser.add_argument("--check", action="store_true",
                        help="compare sparse dispatch and the split-matrix DAG with naive forms, then exit (status 1 on a mismatch)")
    parser.add_argument("--log-steps", action="store_true",
                        help="print each step's loss, gradient norm and seconds to stderr")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be at least 1 and --warmup at least 0 (got {args.steps} and {args.warmup})")
    return args


def resolve_threads(requested):
    if requested and requested > 0:
        return requested
    return len(os.sched_getaffinity(0))


def resolve_device(name):
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"invalid --device {name!r}: use cpu or cuda:N") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available in this torch build or machine; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"invalid --device {name!r}: use cpu or cuda:N")
    return device


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, optimizer, batch_source, model_config, settings, args, device):
    """Run the warm-up and timed steps, and return the timed steps' seconds and the last step's loss."""
    if args.dtype == "bfloat16":
        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        autocast = nullcontext

    step_seconds, loss = [], float("nan")
    for step in range(args.warmup + args.steps):
        # Each batch is on the device before its step's timer starts.
        batches = [batch_source.next_batch() for _ in range(settings.grad_accum)]
        batches = [(inputs_bt.to(device), targets_bt.to(device)) for inputs_bt, targets_bt in batches]
        synchronize(device)

        started = time.perf_counter()
        loss, grad_norm = train_step(model, optimizer, batches, model_config, settings, autocast)
        synchronize(device)
        seconds = time.perf_counter() - started

        if step >= args.warmup:
            step_seconds.append(seconds)
        if args.log_steps:
            phase = "warmup" if step < args.warmup else "timed"
            print(f"step {step + 1} ({phase}) loss {loss:.4f} grad_norm {grad_norm:.3f} seconds {seconds:.3f}", file=sys.stderr)
    return step_seconds, loss


def run(args):
    model_config, settings = load_config(args.config, args.overrides)
    threads = resolve_threads(args.threads if args.threads is not None else settings.threads)
    torch.set_num_threads(threads)
    device = resolve_device(args.device)
    torch.manual_seed(settings.seed)

    model = DagMoeModel(model_config, settings.seq_len).to(device)
    batch_source = BatchSource(settings, model_config.vocab_size, args.data)
    if args.check:
        return 0 if run_checks(model, batch_source, device) else 1

    optimizer = build_optimizer(model, settings)
    step_seconds, loss = time_steps(model, optimizer, batch_source, model_config, settings, args, device)

    tokens_per_step = settings.batch_size * settings.seq_len * settings.grad_accum
    median = statistics.median(step_seconds)
    result = {
        "impl": "pytorch",
        "config": args.config,
        "overrides": args.overrides,
        "params": sum(p.numel() for p in model.parameters()),
        "tokens_per_step": tokens_per_step,
        "steps": args.steps,
        "step_seconds": [round(seconds, 6) for seconds in step_seconds],
        "median_step_seconds": round(median, 6),
        "tokens_per_second": round(tokens_per_step / median, 1),
        # ru_maxrss is in KiB on Linux.
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": threads,
        "device": str(device),
        "dtype": args.dtype,
        "final_loss": loss,
    }
    if device.type == "cuda":
        result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    print(json.dumps(result))
    return 0


def main():
    try:
        sys.exit(run(parse_args(sys.argv[1:])))
    except ConfigError as error:
        print(f"torch_train: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
