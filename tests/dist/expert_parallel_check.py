"""Run by tests/test_train.py under ``torchrun --nproc-per-node 2``: expert parallelism
over 2 ranks gives the loss and every gradient of all experts on one rank.

Each rank builds the same tiny MoE model and the same 2-sequence batch. Reference (every
rank, no collectives): the whole model on the whole batch, loss = mean over all targets.
Expert parallel: rank r keeps experts [r*E/2, (r+1)*E/2) of every group, runs sequence r,
scales its loss as the trainer does (targets of this rank / all targets x ranks), and
averages gradients with ``all_reduce_gradients``. Writes a JSON verdict per rank.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from moe_gato.data.loader import SequenceLoader
from moe_gato.data.mixture import MixtureConfig
from moe_gato.model import build_model, load_config
from moe_gato.tokenizer import collate
from moe_gato.train.expert_parallel import all_reduce_gradients, full_state_dict, shard_experts


def main(data_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config("configs/model/tiny-moe.yaml",
                      ["context_length=128", "num_layers=2", "moe.aux_loss_coef=0",
                       "moe.z_loss_coef=0"])
    tasks = {"babyai/BabyAI-GoToLocal-v0": 1.0, "vl/digits": 1.0, "text/shakespeare": 1.0}
    loader = SequenceLoader(MixtureConfig(context_len=128, tasks=tasks), data_dir=data_dir)
    seqs = [loader.sequence(i) for i in range(world)]

    torch.manual_seed(0)
    ref = build_model(cfg).eval()  # eval: no random patch positions
    ref_out = ref(collate(seqs))
    ref_out.lm_loss.backward()
    ref_grads = {n: p.grad if p.grad is not None else torch.zeros_like(p)
                 for n, p in ref.named_parameters()}

    torch.manual_seed(0)
    model = build_model(cfg).eval()
    shard_experts(model, world)
    model.set_uniform_graph(True)  # as moe_gato.train.parallelize does with several ranks
    batch = collate([seqs[rank]])
    ep_out = model(batch)
    n_local = batch["loss_mask"][:, 1:].sum().float()
    n_total = n_local.clone()
    dist.all_reduce(n_total)
    loss = ep_out.lm_loss * n_local / n_total * world
    touch = sum(p.view(-1)[0] for p in model.parameters()) * 0.0
    (loss + touch).backward()
    all_reduce_gradients(model, world)
    loss_sum = (ep_out.lm_loss.detach() * n_local).reshape(1)
    dist.all_reduce(loss_sum)
    ep_loss = float(loss_sum / n_total)

    grads = {n: p.grad for n, p in model.named_parameters()}
    sharded = {n for n, p in model.named_parameters() if getattr(p, "expert_parallel", False)}
    for name in sorted(sharded):  # gather every expert shard's gradient
        parts = [torch.empty_like(grads[name]) for _ in range(world)]
        dist.all_gather(parts, grads[name].contiguous())
        grads[name] = torch.cat(parts)
    worst = max(float((grads[n] - ref_grads[n]).abs().max()
                      / ref_grads[n].abs().max().clamp(min=1e-6)) for n in ref_grads)
    full = full_state_dict(model)
    same_weights = all(torch.equal(full[k], v) for k, v in ref.state_dict().items())
    verdict = {"rank": rank, "ref_loss": float(ref_out.lm_loss), "ep_loss": ep_loss,
               "max_rel_grad_err": worst, "num_params": len(ref_grads),
               "num_expert_params": len(sharded), "same_weights": same_weights}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(verdict, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
