"""The layout and cost of one training step of a model on a cluster, for ``moe-gato
plan``: memory per device under ZeRO and expert parallelism, the expert all-to-all and the
gradient reduction, the step's time, and the fastest layout that fits.

The layout: data parallelism over all devices, expert parallelism ``ep`` (a divisor of the
experts per group and of the device count; ep devices hold disjoint experts, each expert is
replicated over devices / ep), ZeRO stage s over data-parallel ranks (experts: over the
devices / ep ranks that hold the same experts). No tensor or pipeline parallelism. Memory
per device: bf16 weights (2 bytes/param) + bf16 gradients (2, sharded from stage 2) + AdamW
fp32 master weights and two moments (12, sharded from stage 1) + the activations one
micro-batch saves for backward (``accounting.activation_bytes``). Time: compute at a given
MFU, plus the exposed all-to-all and the part of the gradient reduction the backward pass
cannot hide (the plan's module docstring, ``scaling.plan``, has the whole cost model).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from scaling.hardware import Hardware

if TYPE_CHECKING:
    from moe_gato.model.config import ModelConfig

MFU = 0.4                 # model FLOPs utilisation of step_time when none is given
HEADROOM = 0.2            # device memory kept free (CUDA context, buffers, fragmentation)
ZERO_STAGES = (1, 2)


# ---------------------------------------------------------------------- memory and layout


@dataclasses.dataclass(kw_only=True, frozen=True)
class Layout:
    data_parallel: int
    expert_parallel: int
    zero_stage: int
    micro_batch: int          # sequences per forward on one device
    grad_accum: int
    memory: dict              # bytes per device: weights, grads, optimizer, activations, total
    limit_bytes: float        # the memory it had to fit: (1 - headroom) x device memory

    def trainer_overrides(self, global_batch: int) -> str:
        """The trainer's dotted overrides that run this layout."""
        batch = f"batch_size={global_batch} micro_batch_size={self.micro_batch}"
        if self.expert_parallel == 1:
            return (f"deepspeed.enabled=true deepspeed.zero_stage={self.zero_stage} {batch}")
        return (f"expert_parallel_size={self.expert_parallel} {batch} (torchrun: the trainer "
                f"does not combine expert parallelism with ZeRO yet; ZeRO-{self.zero_stage} "
                f"with it needs DeepSpeed's MoE)")


def split_params(cfg: ModelConfig) -> tuple[int, int]:
    """(dense, routed-expert) parameters: experts shard over expert-parallel ranks; routers
    and shared experts are replicated like the dense part."""
    from moe_gato.model.accounting import param_breakdown

    b = param_breakdown(cfg)
    expert = sum(v for k, v in b.items() if k.startswith("moe.") and k.endswith(".experts"))
    return sum(b.values()) - expert, expert


def memory_per_gpu(cfg: ModelConfig, hardware: Hardware, *, expert_parallel: int,
                   zero_stage: int, micro_batch: int, seq_len: int) -> dict[str, int]:
    """Bytes one device holds while training (see the module docstring)."""
    from moe_gato.model.accounting import activation_bytes

    if zero_stage not in (0, 1, 2):
        raise ValueError(f"zero_stage must be 0, 1 or 2, got {zero_stage}")
    P, ep = hardware.gpus, expert_parallel
    if P % ep:
        raise ValueError(f"expert_parallel ({ep}) must divide the {P} devices")
    dense, expert = split_params(cfg)
    if expert % ep:
        raise ValueError(f"expert_parallel ({ep}) must divide the experts")
    local_expert = expert // ep

    def held(stage_from: int) -> int:  # params whose state is sharded from ``stage_from`` on
        if zero_stage < stage_from:
            return dense + local_expert
        return -(-dense // P) + -(-local_expert // (P // ep))

    out = {"weights": 2 * (dense + local_expert), "grads": 2 * held(2),
           "optimizer": 12 * held(1),
           "activations": activation_bytes(cfg, seq_len=seq_len, batch=micro_batch)}
    out["total"] = sum(out.values())
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ------------------------------------------------------------------------ communication


def all_to_all(cfg: ModelConfig, hardware: Hardware, *, expert_parallel: int,
               tokens_per_gpu: float) -> dict[str, float]:
    """Expert-parallel all-to-all bytes leaving one device per step, and their seconds."""
    ep = expert_parallel
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    if ep == 1 or not moe_layers:
        return {"bytes": 0.0, "intra_bytes": 0.0, "inter_bytes": 0.0, "seconds": 0.0}
    copies = tokens_per_gpu * cfg.moe.experts_per_token
    per_peer = 4 * moe_layers * copies * cfg.d_model * 2 / ep  # 4 = 2 forward + 2 backward
    in_node = min(ep, hardware.gpus_per_node)
    intra, inter = per_peer * (in_node - 1), per_peer * (ep - in_node)
    seconds = max(intra / hardware.intra_node_bytes_per_s, inter / hardware.inter_node_bytes_per_s)
    return {"bytes": intra + inter, "intra_bytes": intra, "inter_bytes": inter,
            "seconds": seconds}


def gradient_reduction(cfg: ModelConfig, hardware: Hardware, *, expert_parallel: int
                       ) -> dict[str, float]:
    """Ring reduction of bf16 gradients per step and device: dense over all devices,
    experts over the devices holding the same experts."""
    dense, expert = split_params(cfg)
    P, ep = hardware.gpus, expert_parallel
    ring = (lambda n: 2 * (n - 1) / n)
    sent = ring(P) * 2 * dense + ring(P // ep) * 2 * expert / ep
    bw = hardware.inter_node_bytes_per_s if P > hardware.gpus_per_node \
        else hardware.intra_node_bytes_per_s
    return {"bytes": sent, "seconds": sent / bw}


def fitting_layouts(cfg: ModelConfig, hardware: Hardware, *, global_batch: int, seq_len: int,
                    zero_stages=ZERO_STAGES, headroom: float = HEADROOM) -> list[Layout]:
    """For each expert-parallel degree (1 for a dense model), the smallest ZeRO stage that
    fits at some micro-batch (a power of two dividing global_batch / devices), with the
    largest micro-batch that fits; degrees where nothing fits are left out."""
    P = hardware.gpus
    if global_batch % P:
        raise ValueError(f"global_batch ({global_batch} sequences) must be a multiple of the "
                         f"{P} devices")
    per_gpu = global_batch // P
    micro = [m for m in (2**i for i in range(per_gpu.bit_length())) if per_gpu % m == 0]
    limit = (1 - headroom) * hardware.memory_bytes
    eps = [1]
    if cfg.ffn == "moe":
        experts = math.gcd(*(cfg.moe.num_experts_of(g) for g in cfg.moe.groups))
        eps = _divisors(math.gcd(experts, P))
    out = []
    for ep in eps:
        for stage in sorted(zero_stages):
            fits = [(m, mem) for m in micro
                    if (mem := memory_per_gpu(cfg, hardware, expert_parallel=ep, zero_stage=stage,
                                              micro_batch=m, seq_len=seq_len))["total"] <= limit]
            if fits:
                m, mem = fits[-1]
                out.append(Layout(data_parallel=P, expert_parallel=ep, zero_stage=stage,
                                  micro_batch=m, grad_accum=per_gpu // m, memory=mem,
                                  limit_bytes=limit))
                break
    return out


def step_time(cfg: ModelConfig, hardware: Hardware, layout: Layout, *, global_batch: int,
              seq_len: int, mfu: float = MFU) -> dict:
    """Seconds of one optimizer step: compute at ``mfu``, the all-to-all (exposed) and the
    part of the gradient reduction the backward pass (2/3 of compute) cannot hide."""
    from moe_gato.model.accounting import flops_per_token

    tokens = global_batch * seq_len / hardware.gpus
    compute = tokens * flops_per_token(cfg, training=True, seq_len=seq_len) \
        / (hardware.peak_flops * mfu)
    a2a = all_to_all(cfg, hardware, expert_parallel=layout.expert_parallel, tokens_per_gpu=tokens)
    red = gradient_reduction(cfg, hardware, expert_parallel=layout.expert_parallel)
    exposed = max(0.0, red["seconds"] - 2 / 3 * compute)
    return {"compute_s": compute, "all_to_all": a2a, "gradient_reduction": red,
            "reduction_exposed_s": exposed, "step_s": compute + a2a["seconds"] + exposed}


def choose_layout(cfg: ModelConfig, hardware: Hardware, *, global_batch: int, seq_len: int,
                  zero_stages=ZERO_STAGES, headroom: float = HEADROOM, mfu: float = MFU
                  ) -> Layout | None:
    """The fastest step among ``fitting_layouts`` (ties: less expert parallelism); None
    when no layout fits."""
    options = fitting_layouts(cfg, hardware, global_batch=global_batch, seq_len=seq_len,
                              zero_stages=zero_stages, headroom=headroom)
    if not options:
        return None
    return min(options, key=lambda lay: (step_time(cfg, hardware, lay, global_batch=global_batch,
                                                   seq_len=seq_len, mfu=mfu)["step_s"],
                                         lay.expert_parallel))
