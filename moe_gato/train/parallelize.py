"""Distribution applied to a plain single-device model, in the manner of torchtitan's
``parallelize``: process groups, expert parallelism, DeepSpeed, and what the model must do
for them. The model knows nothing of ranks; the trainer calls this module once.

    dist = setup_distributed(cfg)                      # ranks, device, process group
    model = build_model(cfg.model).to(dist.device)
    engine, optimizer = parallelize(model, cfg, dist, make_optimizer)

What the model is asked for: with several ranks every rank must build the same backward
graph (expert parallelism needs every rank in every all-to-all; DeepSpeed's ZeRO-2 reduces
gradients in buckets in the order they become ready), so ``parallelize`` asks it to run
every expert group and the patch block even when a micro-batch has no tokens for them
(``GatoModel.set_uniform_graph``). One process skips them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import torch
import torch.distributed as dist

from moe_gato.config import deep_merge
from moe_gato.train.config import TrainConfig


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: TrainConfig) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for but no CUDA device is visible")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        if cfg.deepspeed.enabled:
            deepspeed = import_deepspeed(cpu=not use_cuda)
            deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
        else:
            dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if cfg.batch_size % (cfg.micro_batch_size * world):
        raise ValueError(f"batch_size ({cfg.batch_size}) must be a multiple of "
                         f"micro_batch_size x ranks ({cfg.micro_batch_size} x {world})")
    if world % cfg.expert_parallel_size:
        raise ValueError(f"expert_parallel_size ({cfg.expert_parallel_size}) must divide the "
                         f"number of ranks ({world})")
    return Dist(rank=rank, world=world, device=device)


def import_deepspeed(cpu: bool):
    """Imports DeepSpeed the way this project runs it. On CPU: the ``cpu`` accelerator
    (``DS_ACCELERATOR`` must be set before the import) and no ``shm_comm`` extension, whose
    first build takes 60-90 s; collectives then run over gloo."""
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import importlib

    import deepspeed

    if cpu:  # (deepspeed.comm's attribute "torch" is the torch package: go by module name)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def needs_uniform_graph(d: Dist) -> bool:
    """Whether every rank must build the same backward graph (module docstring): with
    several ranks (expert parallelism is one case: ``setup_distributed`` makes its size
    divide the ranks)."""
    return d.world > 1


def parallelize(model: torch.nn.Module, cfg: TrainConfig, d: Dist,
                make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]):
    """Shards the experts (``expert_parallel_size``), tells the model whether to build a
    uniform backward graph, makes the optimizer over what this rank holds and, with
    ``deepspeed.enabled``, wraps both in a DeepSpeed engine. Returns ``(engine or None,
    optimizer)``; the engine's optimizer when there is one."""
    if cfg.expert_parallel_size > 1:
        from moe_gato.train.expert_parallel import shard_experts

        shard_experts(model, cfg.expert_parallel_size)
    model.set_uniform_graph(needs_uniform_graph(d))
    optimizer = make_optimizer(model)
    if not cfg.deepspeed.enabled:
        return None, optimizer
    deepspeed = import_deepspeed(cpu=d.device.type == "cpu")
    ds_config = {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.batch_size // (cfg.micro_batch_size * d.world),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": d.device.type == "cuda"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deep_merge(ds_config, cfg.deepspeed.extra))
    return engine, optimizer
