"""Parameter, FLOP and memory accounting, computed from the config alone (``scaling/``
uses exactly these numbers; tests check them against the built module).

Conventions
- Embedding parameters: the token table, an untied output head, the patch ResNet block,
  and the position tables (local, action, row, column). Everything else is non-embedding.
- Active parameters per token: all parameters except the experts (and routers, shared
  experts) of other groups and the K-of-E experts a token does not pick. A token of group
  g uses g's router, K = top_k * granularity experts and g's shared expert. Averaged over a
  batch's modality mix with ``kinds`` (a tensor of ``Kind`` values or {kind: fraction});
  without it, the plain mean over groups. Added experts (``moe.added_experts``, routed on
  top of the K) count as active: a token reaches at most K + added experts, and these
  numbers bound the latency.
- Forward FLOPs per token: 2 x active matmul weights (attention, FFN/experts, router,
  output head) + attention 4 x context x D per layer (scores and values over the full
  context, Chinchilla's convention) + for image tokens the patch block's convolutions.
  Norms, softmax and dispatch are not counted. Training = 3 x forward.
- Memory: parameters at fp32 / bf16, AdamW training state (fp32 weights, grads, two
  moments: 16 bytes per parameter), and an estimate of the activations one training step
  saves for backward for one sequence at the context length (bf16 activations, fp32
  logits, fused attention, no recomputation).

Run ``python -m moe_gato.model.accounting`` for the table of every preset.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from moe_gato.model.config import ModelConfig
from moe_gato.tokenizer.layout import Kind


def param_breakdown(cfg: ModelConfig) -> dict[str, int]:
    D, V, C = cfg.d_model, cfg.vocab_size, cfg.patch_channels
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    Fe = cfg.expert_hidden
    out = {
        "token_table": V * D,
        "output_head": 0 if cfg.tie_embeddings else V * D,
        "patch_embedding": 3 * C * 16 + 2 * 2 * C + 2 * 9 * C * C + 16 * C * D,
        "positions": (cfg.max_local_positions + 2 * cfg.position_bins + 1) * D,
        "value_basis": cfg.num_value_features * D,
        "attention": cfg.num_layers * 4 * D * D,
        "norms": (2 * cfg.num_layers + 1) * D,
        "dense_ffn": (cfg.num_layers - moe_layers) * 2 * D * cfg.ffn_hidden,
    }
    for g in cfg.moe.groups if moe_layers else ():
        E = cfg.moe.num_experts_of(g)
        out[f"moe.{g}.router"] = moe_layers * E * D
        out[f"moe.{g}.experts"] = moe_layers * E * 2 * D * Fe
        out[f"moe.{g}.shared"] = moe_layers * 2 * D * Fe * cfg.moe.shared_expert
        out[f"moe.{g}.added"] = moe_layers * cfg.moe.added_experts * (D + 1 + 2 * D * Fe)
    return out


EMBEDDING_KEYS = ("token_table", "output_head", "patch_embedding", "positions", "value_basis")


def num_params(cfg: ModelConfig) -> int:
    return sum(param_breakdown(cfg).values())


def num_non_embedding_params(cfg: ModelConfig) -> int:
    b = param_breakdown(cfg)
    return sum(v for k, v in b.items() if k not in EMBEDDING_KEYS)


def _group_fractions(cfg: ModelConfig, kinds) -> dict[str, float]:
    """{group: fraction of tokens}; ``kinds`` a Kind tensor, {kind: fraction} or None."""
    groups = list(cfg.moe.groups)
    if kinds is None:
        return {g: 1 / len(groups) for g in groups}
    if isinstance(kinds, torch.Tensor):
        counts = torch.bincount(kinds.reshape(-1).long(), minlength=len(Kind)).tolist()
        kinds = {Kind(i): c for i, c in enumerate(counts) if c}
    total = sum(kinds.values())
    if total <= 0:
        raise ValueError("kinds: the modality mix is empty")
    frac = {g: 0.0 for g in groups}
    for kind, share in kinds.items():
        kind = Kind[kind.upper()] if isinstance(kind, str) else Kind(kind)
        frac[cfg.moe.group_of(kind)] += share / total
    return frac


def _active_moe_params(cfg: ModelConfig, group: str) -> int:
    """Per-token active router + experts + shared + added parameters of ``group`` over all
    layers."""
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    E, K, Fe, D = cfg.moe.num_experts_of(group), cfg.moe.experts_per_token, cfg.expert_hidden, cfg.d_model
    A = cfg.moe.added_experts
    return moe_layers * ((E + A) * D + A + (K + cfg.moe.shared_expert + A) * 2 * D * Fe)


def num_active_params(cfg: ModelConfig, *, group: str | None = None, kinds=None,
                      non_embedding: bool = False) -> float:
    b = param_breakdown(cfg)
    base = sum(v for k, v in b.items() if not k.startswith("moe.")
               and not (non_embedding and k in EMBEDDING_KEYS))
    if cfg.ffn == "dense":
        return base
    if group is not None:
        if group not in cfg.moe.groups:
            raise ValueError(f"group: unknown group {group!r}; groups are {list(cfg.moe.groups)}")
        return base + _active_moe_params(cfg, group)
    return sum(f * (base + _active_moe_params(cfg, g))
               for g, f in _group_fractions(cfg, kinds).items())


def patch_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs of embedding one 16x16 patch (4x4 spatial positions after the stem)."""
    C = cfg.patch_channels
    return 2 * 16 * (C * 48 + 2 * 9 * C * C + C * cfg.d_model)


def flops_per_token(cfg: ModelConfig, *, training: bool = False, seq_len: int | None = None,
                    kinds=None) -> float:
    D, V = cfg.d_model, cfg.vocab_size
    seq_len = cfg.context_length if seq_len is None else seq_len
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    dense = cfg.num_layers * 4 * D * D + (cfg.num_layers - moe_layers) * 2 * D * cfg.ffn_hidden
    fwd = 2 * (dense + D * V) + cfg.num_layers * 4 * seq_len * D
    if moe_layers:
        fwd += sum(f * 2 * _active_moe_params(cfg, g)
                   for g, f in _group_fractions(cfg, kinds).items())
    if kinds is not None:
        image = kinds.get(Kind.IMAGE, 0) / sum(kinds.values()) if isinstance(kinds, dict) \
            else float((kinds == Kind.IMAGE).float().mean())
        fwd += image * patch_flops(cfg)
    return 3 * fwd if training else fwd


def mfu(cfg: ModelConfig, tokens_per_second: float, peak_flops: float, **kw) -> float:
    return flops_per_token(cfg, training=True, **kw) * tokens_per_second / peak_flops


def activation_bytes(cfg: ModelConfig, *, seq_len: int | None = None, batch: int = 1) -> int:
    """Estimated bytes saved for backward by one training step (see module docstring)."""
    D, L = cfg.d_model, seq_len or cfg.context_length
    per_token = 2 * D  # embedding output
    for i in range(cfg.num_layers):
        per_token += 2 * 6 * D  # norm in/out, q, k, v, attention output
        if cfg.is_moe_layer(i):
            K, Fe, E = cfg.moe.experts_per_token, cfg.expert_hidden, cfg.moe.num_experts
            shared = cfg.moe.shared_expert + cfg.moe.added_experts
            per_token += 2 * (2 * D + 2 * K * D + 2 * (K + shared) * Fe) + 4 * 2 * E
        else:
            per_token += 2 * (2 * D + 2 * cfg.ffn_hidden)
    per_token += 2 * 2 * D + 4 * 2 * cfg.vocab_size  # final norm, fp32 logits + softmax
    return per_token * L * batch


def memory_row(cfg: ModelConfig) -> dict[str, float]:
    n = num_params(cfg)
    return {"params_M": n / 1e6, "active_M": num_active_params(cfg) / 1e6,
            "fp32_GiB": 4 * n / 2**30, "bf16_GiB": 2 * n / 2**30,
            "adamw_state_GiB": 16 * n / 2**30,
            "act_GiB_per_seq": activation_bytes(cfg) / 2**30,
            "fwd_GFLOP_per_token": flops_per_token(cfg) / 1e9}


def memory_table(paths: list[str | Path]) -> str:
    """Markdown table of parameters, memory and FLOPs for each preset YAML."""
    from moe_gato.model import load_config

    cols = ["params_M", "active_M", "fp32_GiB", "bf16_GiB", "adamw_state_GiB",
            "act_GiB_per_seq", "fwd_GFLOP_per_token"]
    lines = ["| preset | ctx | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for path in sorted(map(Path, paths)):
        cfg = load_config(path)
        row = memory_row(cfg)
        lines.append(f"| {path.stem} | {cfg.context_length} | "
                     + " | ".join(f"{row[c]:.4g}" for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """python -m moe_gato.model.accounting [configs/model/*.yaml]"""
    argv = sys.argv[1:] if argv is None else argv
    paths = argv or sorted(Path("configs/model").glob("*.yaml"))
    print(memory_table(paths))


if __name__ == "__main__":
    main()
