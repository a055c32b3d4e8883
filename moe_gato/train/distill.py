"""Distillation of a MoE teacher into a dense student, on the teacher's data mixture.

    moe-gato distill --teacher runs/recipe/tiny-moe --student configs/model/tiny-dense.yaml \
        --config configs/train/tiny-dense.yaml --data data --out runs/distill
    moe-gato distill ... --alpha 0.75 --temperature 2 --init copy+mean tokens=1152000

Loss per target token (the text and action targets: the loss mask) =
``alpha * CE(student, data) + (1 - alpha) * T^2 * KL(teacher_T || student_T)``, with
``p_T = softmax(logits / T)``; defaults from the Switch Transformer study (Fedus et al.
2022, section 5): alpha = 0.75, T = 1. The teacher runs in eval mode without gradients on
the student's batch (same autocast). The two parts are logged as ``objective/ce`` and
``objective/kl``; the trainer's validation loss stays the plain next-token loss, so that
teacher, student and a model trained from scratch compare directly.

Student initialisation (``--init``), applied before the optimizer exists:
  ``none``       the student's own random weights;
  ``copy``       every non-expert weight (embeddings, patch block, attention, norms) copied
                 from the teacher (Switch Table 6: this alone moved the retained gain from
                 3% to 20%);
  ``copy+mean``  and each layer's FFN from the teacher's experts: the student's hidden
                 units are G blocks, block j the mean over every group's experts e with
                 e mod G = j (a token's output is G x its renormalized expert mixture, so G
                 such blocks match it at the mean);
  ``copy+load``  the same with each expert weighted by the tokens it was routed and each
                 group by its share of tokens, measured by running the teacher on training
                 sequences (knowledge gathering in the manner of OneS, Xue et al. 2022);
  ``copy+fit``   (default) each student FFN fitted to its MoE layer on the teacher's own
                 inputs: the input weights of the most-routed whole experts, the output
                 weights by ridge least squares onto the MoE layer's output over
                 ``--load-sequences`` training sequences.
Averaging experts' weights averages unrelated hidden units: on the default agent the
student's next-token loss at initialisation was 14.5 nats with ``copy+mean``, 9.7 with
``copy+load``, 9.3 with ``copy`` (9.2 untouched; the teacher 2.86) and 4.5 with
``copy+fit`` (its layers leave 2-21% of the MoE output variance unexplained). Student
hidden units left over (tiny-dense has 514 = 512 + 2) keep their random input weights and
start with zero output weights. Resuming restores the student
from its checkpoint (the initialisation is not applied again); ``distill.json`` in the run
directory holds the teacher and the settings, and a resume with other ones is refused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_gato.train.objective import LanguageModelLoss, ObjectivePart

INITS = ("none", "copy", "copy+mean", "copy+load", "copy+fit")


class DistillationLoss:
    def __init__(self, teacher: torch.nn.Module, *, alpha: float = 0.75,
                 temperature: float = 1.0) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.hard = LanguageModelLoss()

    def __call__(self, model, batch: dict) -> ObjectivePart:
        part = self.hard(model, batch)
        with torch.no_grad():
            teacher_BLV = self.teacher(batch, compute_loss=False).logits
        kl = soft_target_kl(part.out.logits, teacher_BLV, batch["loss_mask"], self.temperature,
                            batch.get("loss_weight"))
        loss = self.alpha * part.loss + (1 - self.alpha) * self.temperature**2 * kl
        return ObjectivePart(loss=loss, aux=part.aux, out=part.out,
                             parts={"ce": part.loss.detach(), "kl": kl.detach()})


def soft_target_kl(student_BLV: torch.Tensor, teacher_BLV: torch.Tensor,
                   loss_mask_BL: torch.Tensor, temperature: float,
                   loss_weight_BL: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the target positions of KL(teacher_T || student_T), next-token aligned
    like the model's loss (position l predicts token l + 1 where ``loss_mask[l + 1]``),
    weighted like it by ``loss_weight`` when the loader weights the targets."""
    mask_BL = loss_mask_BL[:, 1:].bool()
    s_NV = (student_BLV[:, :-1][mask_BL].float() / temperature).log_softmax(-1)
    t_NV = (teacher_BLV[:, :-1][mask_BL].float() / temperature).log_softmax(-1)
    if s_NV.shape[0] == 0:
        return student_BLV.new_zeros((), dtype=torch.float32) + 0.0 * student_BLV.sum()
    if loss_weight_BL is None:
        return F.kl_div(s_NV, t_NV, log_target=True, reduction="batchmean")
    w_N = loss_weight_BL[:, 1:][mask_BL].float()
    kl_N = F.kl_div(s_NV, t_NV, log_target=True, reduction="none").sum(-1)
    return (kl_N * w_N).sum() / w_N.sum().clamp(min=1e-12)


# ------------------------------------------------------------------- initialisation
@torch.no_grad()
def copy_shared_weights(student: torch.nn.Module, teacher: torch.nn.Module) -> list[str]:
    """Copies every teacher weight whose name and shape the student shares, the FFNs
    excepted; returns the names copied."""
    theirs = dict(teacher.named_parameters())
    copied = []
    for name, p in student.named_parameters():
        if ".ffn." in name or name not in theirs or theirs[name].shape != p.shape:
            continue
        p.copy_(theirs[name])
        copied.append(name)
    return copied


@torch.no_grad()
def measure_load(teacher: torch.nn.Module, batches) -> list[dict[str, torch.Tensor]]:
    """Per MoE layer: {group: (E,) slots routed to each expert} over ``batches``."""
    totals: list[dict[str, torch.Tensor]] = []
    for batch in batches:
        out = teacher(batch, compute_loss=False)
        for layer, groups in enumerate(out.routing):
            if layer == len(totals):
                totals.append({})
            for name, r in groups.items():
                load = r.load_E.double().cpu()
                totals[layer][name] = totals[layer].get(name, 0) + load
    return totals


def paired_moe_layers(student: torch.nn.Module, teacher: torch.nn.Module, init: str) -> list:
    """The teacher's MoE layers, one per student layer (the FFN initialisations need it)."""
    from moe_gato.model.moe import ModalityRoutedMoE

    moe_layers = [b.ffn for b in teacher.blocks if isinstance(b.ffn, ModalityRoutedMoE)]
    if len(moe_layers) != len(student.blocks):
        raise ValueError(f"the teacher has {len(moe_layers)} MoE layers and the student "
                         f"{len(student.blocks)} layers; --init {init} needs one MoE layer "
                         f"per student layer (moe_every: 1)")
    return moe_layers


@torch.no_grad()
def gather_experts(student: torch.nn.Module, teacher: torch.nn.Module,
                   load: list[dict[str, torch.Tensor]] | None = None) -> None:
    """Each dense student FFN from its layer's experts (module docstring): uniform weights
    without ``load``, else experts weighted by their routed slots and groups by theirs."""
    G = teacher.cfg.moe.granularity
    moe_layers = paired_moe_layers(student, teacher, "copy+mean/copy+load")
    for i, (block, moe) in enumerate(zip(student.blocks, moe_layers, strict=True)):
        fc1, fc2 = block.ffn.fc1.weight, block.ffn.fc2.weight       # (F_s, D), (D, F_s)
        first = next(iter(moe.groups.values()))
        Fe = first.w1_EDF.shape[2]
        if fc1.shape[0] < G * Fe:
            raise ValueError(f"the student's ffn_hidden ({fc1.shape[0]}) is below G x expert "
                             f"hidden ({G} x {Fe}); pick a student at least that wide")
        w1_DF = torch.zeros(fc1.shape[1], G * Fe, dtype=torch.float64)
        w2_FD = torch.zeros(G * Fe, fc1.shape[1], dtype=torch.float64)
        shares = {name: (float(load[i][name].sum()) if load and name in load[i] else
                         (0.0 if load else 1.0)) for name in moe.groups}
        total = sum(shares.values()) or 1.0
        for name, group in moe.groups.items():
            E = group.w1_EDF.shape[0]
            weight_E = (load[i][name].double().cpu() if load and name in load[i]
                        else torch.ones(E, dtype=torch.float64))
            for j in range(G):
                sel = torch.arange(j, E, G)
                w = weight_E[sel] + 1e-12  # an expert never routed still counts a little
                w = w / w.sum() * shares[name] / total
                w1_DF[:, j * Fe:(j + 1) * Fe] += torch.einsum(
                    "e,edf->df", w, group.w1_EDF[sel].double().cpu())
                w2_FD[j * Fe:(j + 1) * Fe] += torch.einsum(
                    "e,efd->fd", w, group.w2_EFD[sel].double().cpu())
        fc1[:G * Fe] = w1_DF.t().to(fc1)
        fc2[:, :G * Fe] = w2_FD.t().to(fc2)
        fc2[:, G * Fe:] = 0.0


@torch.no_grad()
def fit_experts(student: torch.nn.Module, teacher: torch.nn.Module, batches, *,
                ridge: float = 1e-3) -> list[float]:
    """Each dense student FFN fitted to its layer's MoE on the teacher's own inputs: the
    student's hidden units take the input weights of the experts routed the most tokens
    (across groups, as many whole experts as fit), and the output weights solve ridge
    least squares from those units to the MoE layer's output over the tokens of
    ``batches``. Returns each layer's fraction of the output variance left unexplained."""
    import torch.nn.functional as F

    moe_layers = paired_moe_layers(student, teacher, "copy+fit")
    seen: list[list] = [[] for _ in moe_layers]
    hooks = [m.register_forward_hook(lambda mod, args, out, i=i: seen[i].append(
        (args[0].detach().double().cpu(), out[0].detach().double().cpu(),
         {n: r.load_E.double().cpu() for n, r in out[1].items()})))
        for i, m in enumerate(moe_layers)]
    try:
        for batch in batches:
            teacher(batch, compute_loss=False)
    finally:
        for h in hooks:
            h.remove()
    if not seen[0]:
        raise ValueError("copy+fit needs at least one batch of training sequences "
                         "(--load-sequences >= micro_batch_size)")
    unexplained = []
    for i, (block, moe) in enumerate(zip(student.blocks, moe_layers, strict=True)):
        X = torch.cat([x for x, _, _ in seen[i]])
        Y = torch.cat([y for _, y, _ in seen[i]])
        load = {}
        for _, _, loads in seen[i]:
            for name, v in loads.items():
                load[name] = load.get(name, 0) + v
        ranked = sorted(((float(v[e]), name, e) for name, v in load.items()
                         for e in range(v.numel())), reverse=True)
        fc1, fc2 = block.ffn.fc1.weight, block.ffn.fc2.weight      # (F_s, D), (D, F_s)
        cols, n = [], 0
        for _, name, e in ranked:
            w1 = moe.groups[name].w1_EDF[e].double().cpu()            # (D, Fe)
            if n + w1.shape[1] > fc1.shape[0]:
                break
            cols.append(w1)
            n += w1.shape[1]
        if not cols:
            raise ValueError(f"the student's ffn_hidden ({fc1.shape[0]}) is below one "
                             f"expert's hidden size")
        w1_DF = torch.cat(cols, dim=1)
        H = F.gelu(X @ w1_DF)                                          # (N, n)
        gram = H.t() @ H
        gram += ridge * gram.diagonal().mean() * torch.eye(n, dtype=gram.dtype)
        w2_FD = torch.linalg.solve(gram, H.t() @ Y)
        resid = Y - H @ w2_FD
        unexplained.append(float(resid.pow(2).sum() / (Y - Y.mean(0)).pow(2).sum()))
        fc1[:n] = w1_DF.t().to(fc1)
        fc2[:, :n] = w2_FD.t().to(fc2)
        fc2[:, n:] = 0.0
    return unexplained


def load_teacher(path: str | Path, device) -> tuple[torch.nn.Module, Path]:
    from moe_gato.model import load_checkpoint
    from moe_gato.train.checkpoint import model_folder

    folder = model_folder(path)
    return load_checkpoint(folder, map_location=device).to(device).eval(), folder


# ----------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="the MoE teacher: a run directory or a "
                                                    "checkpoint folder")
    p.add_argument("--student", required=True, help="the student's model preset "
                                                    "(configs/model/tiny-dense.yaml)")
    p.add_argument("--config", required=True, help="training config: mixture, budget, optimizer "
                                                   "(its model is replaced by --student)")
    p.add_argument("--data", default=None, help="collected suite (default: data.data_dir)")
    p.add_argument("--out", required=True, help="the student's run directory")
    p.add_argument("--alpha", type=float, default=0.75, help="weight of the hard-label loss "
                                                             "(default 0.75)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature T "
                                                                   "(default 1)")
    p.add_argument("--init", choices=INITS, default="copy+fit",
                   help="student initialisation (default copy+fit; see the module docstring)")
    p.add_argument("--load-sequences", type=int, default=64,
                   help="training sequences the teacher runs on to measure expert load "
                        "or fit the student's FFNs (copy+load, copy+fit; default 64)")
    p.add_argument("--overwrite", action="store_true",
                   help="move an existing run directory aside and start again")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher; the rank is read from LOCAL_RANK")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of the training config (tokens=1152000)")


def run(args: argparse.Namespace) -> int:
    distill(teacher=args.teacher, student=args.student, config=args.config, out=args.out,
            data=args.data, alpha=args.alpha, temperature=args.temperature, init=args.init,
            load_sequences=args.load_sequences, overrides=args.overrides,
            overwrite=args.overwrite)
    return 0


def distill(*, teacher: str | Path, student: str | Path, config: str | Path, out: str | Path,
            data: str | Path | None = None, alpha: float = 0.75, temperature: float = 1.0,
            init: str = "copy+fit", load_sequences: int = 64, overrides=(),
            overwrite: bool = False) -> dict:
    """Distils ``teacher`` (a run directory or checkpoint folder) into the dense ``student``
    preset trained with ``config``; returns the last logged record ({} when the run had
    already reached its budget)."""
    from moe_gato.train import Trainer

    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if load_sequences < 1:
        raise ValueError(f"load_sequences must be >= 1, got {load_sequences}")
    cfg = student_config(config, student, overrides)
    if cfg.model.ffn != "dense":
        raise ValueError(f"--student must be a dense model (ffn: dense), got ffn: "
                         f"{cfg.model.ffn} from {student}")
    out = Path(out)
    record = {"teacher": str(Path(teacher).resolve()), "student": str(student),
              "alpha": alpha, "temperature": temperature, "init": init}
    saved = out / "distill.json"
    if saved.is_file() and not overwrite:
        before = json.loads(saved.read_text())
        changed = {k: (before.get(k), v) for k, v in record.items() if before.get(k) != v}
        if changed:
            raise ValueError(f"{out} was distilled with other settings {changed} "
                             f"(before, now); use another --out or --overwrite")
    device = "cuda" if cfg.device == "cuda" or (
        cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    teacher_model, folder = load_teacher(teacher, device)
    if teacher_model.cfg.layout != cfg.model.layout:
        raise ValueError(f"teacher and student vocabularies differ ({teacher_model.cfg.layout} "
                         f"vs {cfg.model.layout}): the KL needs one token space")
    if teacher_model.cfg.context_length < cfg.model.context_length:
        raise ValueError(f"the teacher's context ({teacher_model.cfg.context_length}) is "
                         f"shorter than the student's ({cfg.model.context_length})")

    def sequences():
        return _sequences(cfg, data, load_sequences, device)

    def initialise(model: torch.nn.Module) -> None:
        if init == "none":
            return
        copy_shared_weights(model, teacher_model)
        if init == "copy":
            return
        if init == "copy+fit":
            left = fit_experts(model, teacher_model, sequences())
            print("copy+fit: output variance unexplained per layer: "
                  + ", ".join(f"{v:.3f}" for v in left), flush=True)
            return
        load = measure_load(teacher_model, sequences()) if init == "copy+load" else None
        gather_experts(model, teacher_model, load)

    trainer = Trainer(cfg, out, data_dir=data, overwrite=overwrite,
                      objective=DistillationLoss(teacher_model, alpha=alpha,
                                                 temperature=temperature),
                      init_model=initialise)
    out.mkdir(parents=True, exist_ok=True)
    if trainer.dist.main:
        saved.write_text(json.dumps({**record, "teacher_checkpoint": str(folder)}, indent=1)
                         + "\n")
    last = trainer.fit()
    if last and trainer.dist.main:
        print(f"step {last['step']}: loss {last['loss']:.4f} (ce {last['objective/ce']:.4f}, "
              f"kl {last['objective/kl']:.4f})" + (f", eval/loss {last['eval/loss']:.4f}"
                                                  if "eval/loss" in last else ""))
    return last


def student_config(config: str | Path, student: str | Path, overrides=()):
    """The training config at ``config`` with its model replaced by the ``student`` preset;
    the recipe's model options (context, value embedding, past actions) stay on top."""
    from moe_gato.config import load_yaml
    from moe_gato.train.config import train_config_from_dict

    if not Path(student).is_file():
        raise ValueError(f"--student: no model preset at {student}")
    data = load_yaml(config)
    model = data.get("model")
    options = {k: v for k, v in model.items() if k != "preset"} if isinstance(model, dict) else {}
    options.pop("moe", None)
    data["model"] = {"preset": str(Path(student).resolve()), **options}
    return train_config_from_dict(data, Path(config).parent, list(overrides))


def _sequences(cfg, data, count: int, device):
    from moe_gato.data.loader import SequenceLoader

    loader = SequenceLoader(cfg.data, split="train", seed=cfg.seed + 1,
                            data_dir=data or cfg.data.data_dir)
    b = cfg.micro_batch_size
    for start in range(0, count, b):
        yield {k: v.to(device) for k, v in loader.batch(start, b).items()}
