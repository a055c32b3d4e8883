"""What each fine-tuning mode trains, and how ``new-expert`` starts its added experts.

    cfg = mode_model_config(pretrained.cfg, "new-expert")   # one more expert per group
    model = build_model(cfg)
    start_model(model, pretrained, "new-expert", batches)    # weights in, the rest frozen

Modes (``MODES``): ``full`` (every weight trains), ``experts`` (the MoE layers' routers and
experts, routed, shared and added; embeddings, attention, norms and dense FFNs frozen),
``new-expert`` (one added expert per group of every MoE layer, ``moe.added_experts`` + 1:
its router row, router bias and FFN train, every pre-existing weight is frozen) and
``scratch`` (the pretrained architecture from its random initialisation, every weight
trains: the baseline). A frozen weight is left out of the optimizer (``requires_grad``
False), so no step, weight decay or optimizer state can touch it; balancing biases
(``moe.bias_balancing``) are frozen in ``new-expert`` by ``bias_update_rate: 0``.

How ``new-expert`` starts an added expert of group g in layer l (see ``moe_gato.model.moe``
for its routing: on top of the top-K, never displacing a routed expert):
  - output weights ``w2 = 0``: it adds exactly zero, so the model's outputs, losses and
    routing equal the pretrained model's bit for bit at step 0;
  - router row = the row of the expert the demonstrations' tokens of g were routed to
    most, input weights ``w1`` = that expert's (sparse upcycling: features known to
    respond to these tokens);
  - router bias = the median over those tokens of (lowest chosen logit - the row's logit),
    so that half of them reach the new expert at step 0 and give ``w2`` a gradient from
    the first step (``w1``, the row and the bias follow once ``w2`` is non-zero);
  - a group the demonstrations never reach (no image in a classic-control task) gets a
    zero row and bias ``INERT_BIAS``: no token takes that expert, it stays zero.
"""

from __future__ import annotations

import dataclasses

import torch

from moe_gato.model.config import ModelConfig

MODES = ("full", "experts", "new-expert", "scratch")
#: router bias of an added expert whose group the demonstrations never reach
INERT_BIAS = -1.0e4


def mode_model_config(cfg: ModelConfig, mode: str) -> ModelConfig:
    """The model a mode trains: the pretrained one, with one more added expert per group
    and frozen balancing biases for ``new-expert``. Refuses experts modes on a dense model."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if mode in ("experts", "new-expert") and cfg.ffn != "moe":
        raise ValueError(f"mode {mode} trains experts, and the checkpoint is dense (ffn: "
                         f"{cfg.ffn}); use --mode full (or scratch) for a dense model")
    if mode != "new-expert":
        return cfg
    moe = dataclasses.replace(cfg.moe, added_experts=cfg.moe.added_experts + 1,
                              bias_update_rate=0.0 if cfg.moe.bias_balancing
                              else cfg.moe.bias_update_rate)
    return dataclasses.replace(cfg, moe=moe)


def is_trained(name: str, mode: str, new_index: int) -> bool:
    """Whether parameter ``name`` trains in ``mode``; ``new_index`` is the index of the
    added expert ``new-expert`` adds (the pretrained model's ``moe.added_experts``)."""
    if mode in ("full", "scratch"):
        return True
    if mode == "experts":
        return ".ffn.groups." in name
    return f".added.{new_index}." in name


@torch.no_grad()
def start_model(model: torch.nn.Module, pretrained: torch.nn.Module, mode: str, batches
                ) -> int:
    """Puts the pretrained weights into ``model`` (built from ``mode_model_config``),
    starts ``new-expert``'s added experts from ``batches`` of demonstrations (module
    docstring) and freezes what the mode does not train; ``scratch`` keeps the random
    weights. Returns the number of parameters that train."""
    new_index = pretrained.cfg.moe.added_experts
    if mode != "scratch":
        missing, unexpected = model.load_state_dict(pretrained.state_dict(), strict=False)
        added = [k for k in missing if f".added.{new_index}." in k]
        if unexpected or len(added) != len(missing) or (missing and mode != "new-expert"):
            raise ValueError(f"the {mode} model does not take the checkpoint's weights: "
                             f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    if mode == "new-expert":
        start_added_experts(model, pretrained, batches, new_index)
    trained = 0
    for name, p in model.named_parameters():
        p.requires_grad_(is_trained(name, mode, new_index))
        trained += p.numel() if p.requires_grad else 0
    return trained


@torch.no_grad()
def start_added_experts(model: torch.nn.Module, pretrained: torch.nn.Module, batches,
                        index: int) -> None:
    """Added expert ``index`` of every group of every MoE layer, from the pretrained
    model's routing of ``batches`` (module docstring)."""
    from moe_gato.model.moe import ModalityRoutedMoE

    ours = [b.ffn for b in model.blocks if isinstance(b.ffn, ModalityRoutedMoE)]
    theirs = [b.ffn for b in pretrained.blocks if isinstance(b.ffn, ModalityRoutedMoE)]
    seen: list[list] = [[] for _ in theirs]
    hooks = [m.register_forward_hook(lambda mod, args, out, i=i: seen[i].append(
        (args[0].detach().float(), out[1]))) for i, m in enumerate(theirs)]
    was_training = pretrained.training
    pretrained.eval()
    try:
        for batch in batches:
            pretrained(batch, compute_loss=False)
    finally:
        for h in hooks:
            h.remove()
        pretrained.train(was_training)
    for layer, (moe, source) in enumerate(zip(ours, theirs, strict=True)):
        for name, group in moe.groups.items():
            router_ED = source.groups[name].router_ED.float()
            xs, lowest, load = [], [], torch.zeros(router_ED.shape[0], dtype=torch.float64)
            for x_TD, routing in seen[layer]:
                r = routing.get(name)
                if r is None:
                    continue
                x_tD = x_TD.index_select(0, r.token_index_t)
                chosen_tK = (x_tD @ router_ED.t()).gather(1, r.expert_ids_tK)
                xs.append(x_tD)
                lowest.append(chosen_tK.min(dim=-1).values)
                load += r.load_E.double().cpu()
            new = group.added[index]
            if not xs:  # the demonstrations never reach this group
                new.router_D.zero_()
                new.bias_1.fill_(INERT_BIAS)
                new.w1_DF.copy_(group.w1_EDF[0])
                new.w2_FD.zero_()
                continue
            e = int(load.argmax())
            new.router_D.copy_(group.router_ED[e])
            logit_t = torch.cat(xs) @ new.router_D.float()
            new.bias_1.fill_(float((torch.cat(lowest) - logit_t).median()))
            new.w1_DF.copy_(group.w1_EDF[e])
            new.w2_FD.zero_()
