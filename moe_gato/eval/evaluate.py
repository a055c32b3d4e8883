"""Evaluation of a checkpoint in the real environments, and on held-out captions and text.

    result = evaluate("runs/demo/teacher", data_dir="data", out="runs/demo/eval",
                      cfg=EvalConfig(episodes=20))

Control tasks: ``episodes`` rollouts per task (``batch_size`` environments stepped together,
one forward pass per token for all of them), seeds ``seed + i`` — disjoint from the
collection's seeds, which is checked — scored against the expert and random returns the
collection measured (``moe_gato.eval.scores``). Held-out tasks are evaluated and reported
apart. Caption tasks: token accuracy (teacher-forced next-token argmax over the text ids)
and exact match (the greedy caption of the true length equals it) on the validation
split's images. Text: perplexity on the validation split's documents (first window of
each).

Each task's result is written to ``out/tasks/<domain>__<env>.json`` as it finishes;
rerunning the same command keeps the finished ones (same checkpoint and settings) and
redoes the rest. ``eval.json``, ``eval.md`` and ``eval.png`` are written at the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from moe_gato.config import write_json
from moe_gato.data import storage
from moe_gato.data.loader import split_rows
from moe_gato.envs import TASKS, SUITES, TaskSpec, make_control_task, run_episodes

#: collection seeds are collect_seed * 1_000_000 + i (i < 1_000_000): evaluation starts far above
COLLECT_SEED_STRIDE = 1_000_000


@dataclasses.dataclass(kw_only=True)
class EvalConfig:
    episodes: int = 20                # rollouts per control task (Gato: 50)
    batch_size: int = 20              # environments of one task stepped together
    temperature: float = 0.0          # 0: greedy actions
    prompt: bool = False              # prefix a successful stored expert demonstration
    #: demonstrations in the prompt (with ``prompt``): the best-returning ones of the
    #: training split, sharing ``prompt_share`` of the context (``Policy.reset``)
    prompt_demos: int = 1
    prompt_share: float = 0.25        # of the context, at most
    max_steps: int | None = None      # cap on an episode's steps (None: the task's own)
    seed: int = 900_000_000           # first rollout seed
    caption_rows: int = 200           # held-out images per caption task (at most)
    text_documents: int = 50          # held-out documents for perplexity (at most)
    validation_fraction: float = 0.1  # the data's validation split (as in the mixture)
    device: str = "cpu"
    #: CUDA-graphed control steps (``Policy(graphs=True)``; on a CPU the same static step,
    #: eagerly): the same actions up to float noise, so not part of ``settings``
    graphs: bool = False
    #: torch CPU threads. 1 by default: the environments step in the same process, the
    #: per-token matmuls are small, and under load OpenMP's spin-waiting made two threads
    #: on this 2-core machine ~25x slower than one (measured on a BabyAI rollout)
    threads: int = 1

    def __post_init__(self) -> None:
        for field in ("episodes", "batch_size", "caption_rows", "text_documents", "threads",
                      "prompt_demos"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 <= self.prompt_share < 1:
            raise ValueError(f"prompt_share must lie in [0, 1), got {self.prompt_share}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.prompt_demos > 1 and not self.prompt:
            raise ValueError(f"prompt_demos ({self.prompt_demos}) counts the demonstrations of "
                             f"a prompt; set prompt (--prompt) as well")

    def settings(self) -> dict:
        """What makes a stored task result reusable (device and batching change no result
        beyond float noise, so they are not part of it)."""
        d = dataclasses.asdict(self)
        for k in ("device", "batch_size", "threads", "graphs"):
            d.pop(k)
        return d


def resolve_eval_tasks(tasks: str | list[str]) -> list[TaskSpec]:
    """A suite name ("default") or task names; unknown names list the known ones."""
    if isinstance(tasks, str):
        if tasks in SUITES:
            return [TASKS[n] for n in SUITES[tasks]]
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError(f"tasks: name a suite ({sorted(SUITES)}) or at least one task")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known tasks:\n  " + "\n  ".join(TASKS))
    return [TASKS[t] for t in tasks]


def evaluate(checkpoint: str | Path, *, data_dir: str | Path, out: str | Path,
             tasks: str | list[str] = "default", cfg: EvalConfig | None = None,
             progress: bool = True) -> dict:
    """Evaluates ``checkpoint`` (a checkpoint folder or a run directory) on ``tasks``;
    returns and writes ``eval.json`` (see the module docstring)."""
    from tqdm import tqdm

    from moe_gato.eval import report
    from moe_gato.inference import Policy

    cfg = cfg or EvalConfig()
    torch.set_num_threads(cfg.threads)
    specs = resolve_eval_tasks(tasks)
    manifest = storage.read_manifest(data_dir)
    missing = [s.name for s in specs if s.name not in manifest.get("tasks", {})]
    if missing:
        raise storage.DataError(f"task(s) {missing} are not in {data_dir}/manifest.json "
                                f"(their expert and random returns are needed); run "
                                f"`moe-gato collect --out {data_dir}` first")
    policy = Policy.from_checkpoint(checkpoint, device=cfg.device, temperature=cfg.temperature,
                                    prompt_share=cfg.prompt_share, seed=cfg.seed,
                                    graphs=cfg.graphs)
    out = Path(out)
    (out / "tasks").mkdir(parents=True, exist_ok=True)
    settings = dict(cfg.settings(), checkpoint=str(Path(policy.checkpoint).resolve()))
    results, pending = {}, []
    for spec in specs:
        done = _load_result(out, spec, settings)
        if done is not None:
            results[spec.name] = done
        else:
            pending.append(spec)
    control = [s for s in pending if s.kind == "control"]
    bar = tqdm(total=cfg.episodes * len(control), unit="ep", disable=not progress,
               desc=f"eval {len(pending)} tasks")
    try:
        for spec in pending:
            bar.set_postfix_str(spec.name)
            start = time.perf_counter()
            data = storage.TaskData(storage.task_dir(data_dir, spec.name))
            if spec.kind == "control":
                result = evaluate_control(policy, spec, data, cfg, on_episode=lambda: bar.update(1))
            elif spec.kind == "caption":
                result = evaluate_captions(policy, data, cfg)
            else:
                result = evaluate_text(policy, data, cfg)
            result.update(kind=spec.kind, domain=spec.domain, held_out=spec.held_out,
                          seconds=round(time.perf_counter() - start, 1), settings=settings)
            _save_result(out, spec, result)
            results[spec.name] = result
    finally:
        bar.close()
    return report.write_report(results, out, checkpoint=settings["checkpoint"])


# ----------------------------------------------------------------------- control
def evaluate_control(policy, spec: TaskSpec, data: storage.TaskData, cfg: EvalConfig,
                     on_episode=None) -> dict:
    from moe_gato.eval.scores import task_result
    from moe_gato.inference import PolicyActor

    meta = data.meta
    seeds = [cfg.seed + i for i in range(cfg.episodes)]
    _check_disjoint(seeds, meta, spec.name)
    envs = [make_control_task(spec) for _ in range(min(cfg.batch_size, cfg.episodes))]
    if cfg.max_steps is not None:
        for env in envs:
            env.max_steps = min(env.max_steps, cfg.max_steps)
    prompt = _prompt_episodes(data, cfg) if cfg.prompt else None
    actor = PolicyActor(policy, prompt=prompt)
    episodes = []
    try:
        for i in range(0, len(seeds), len(envs)):
            chunk = seeds[i:i + len(envs)]
            episodes += run_episodes(envs[:len(chunk)], actor, chunk,
                                     on_episode_end=lambda *_: on_episode and on_episode())
    finally:
        for env in envs:
            env.close()
    result = task_result([e.episode_return for e in episodes],
                         [e.success for e in episodes] if envs[0].has_success else None,
                         expert=meta["expert_return"], random=meta["random_return"],
                         held_out=spec.held_out, domain=spec.domain,
                         lengths=[len(e) for e in episodes])
    # a prompt of which not even one timestep fits the context is left out by the policy
    used = policy.prompt if prompt is not None else None
    result.update(seeds=[seeds[0], seeds[-1]], prompted=prompt is not None,
                  prompt_demos=len(prompt) if prompt else 0,
                  prompt_tokens=0 if used is None else len(used), max_steps=envs[0].max_steps)
    return result


def _check_disjoint(seeds: list[int], meta: dict, name: str) -> None:
    base = int(meta.get("collect", {}).get("seed", 0)) * COLLECT_SEED_STRIDE
    clash = [s for s in seeds if base <= s < base + COLLECT_SEED_STRIDE]
    if clash:
        raise ValueError(f"{name}: evaluation seeds {clash[0]}..{clash[-1]} overlap the "
                         f"collection's seeds [{base}, {base + COLLECT_SEED_STRIDE}); choose "
                         f"another --seed")


def _prompt_episodes(data: storage.TaskData, cfg: EvalConfig) -> list:
    """The ``prompt_demos`` best-returning expert episodes of the training split, the
    successful ones first, the best last (nearest the episode it prompts)."""
    rows = split_rows(len(data), cfg.validation_fraction, "train")
    if len(rows) < cfg.prompt_demos:
        raise ValueError(f"{data.name}: {cfg.prompt_demos} prompt demonstrations asked for, "
                         f"the training split holds {len(rows)} episodes")
    returns = np.asarray(data.ds.select(rows)["return"], np.float64)
    success = np.asarray(data.ds.select(rows)["success"], bool)
    order = np.argsort(-(returns + np.where(success, 1e12, 0.0)), kind="stable")
    return [data.episode(rows[int(i)]) for i in order[:cfg.prompt_demos][::-1]]


# ----------------------------------------------------------------- captions, text
@torch.no_grad()
def evaluate_captions(policy, data: storage.TaskData, cfg: EvalConfig) -> dict:
    from moe_gato.tokenizer import Kind, collate

    model, tok, device = policy.model, policy.tok, policy.device
    rows = list(split_rows(len(data), cfg.validation_fraction, "validation"))[:cfg.caption_rows]
    lo, hi = model.cfg.layout.id_range(Kind.TEXT)
    correct = total = exact = 0
    for i in range(0, len(rows), 32):
        seqs = [tok.tokenize_caption(*data.caption(r)) for r in rows[i:i + 32]]
        width = max(len(s) for s in seqs)
        batch = {k: v.to(device) for k, v in
                 collate([s.pad_to(width, tok.layout) for s in seqs]).items()}
        logits_BLV = model(batch, compute_loss=False).logits[:, :-1, lo:hi]
        target_BL, mask_BL = batch["tokens"][:, 1:], batch["loss_mask"][:, 1:]
        hit_BL = (logits_BLV.argmax(-1) + lo == target_BL) & mask_BL
        correct += int(hit_BL.sum())
        total += int(mask_BL.sum())
        # free-running greedy captions of the true length (the prefixes are the images)
        first = [int(np.flatnonzero(s.kinds == Kind.TEXT)[0]) for s in seqs]
        if len(set(first)) != 1:
            raise ValueError(f"{data.name}: images of one caption task differ in size")
        prefix = {k: v[:, :first[0]] for k, v in batch.items() if k != "patches"}
        prefix["patches"] = batch["patches"]
        n_text = [int((s.kinds == Kind.TEXT).sum()) for s in seqs]
        ids_Bn = model.generate(prefix, max(n_text), kind=Kind.TEXT, temperature=0)
        for b, (s, n) in enumerate(zip(seqs, n_text, strict=True)):
            truth = torch.as_tensor(s.tokens[first[0]:first[0] + n], device=device)
            exact += int(torch.equal(ids_Bn[b, :n], truth))
    return {"caption_token_accuracy": correct / max(total, 1),
            "caption_exact_match": exact / max(len(rows), 1), "examples": len(rows)}


@torch.no_grad()
def evaluate_text(policy, data: storage.TaskData, cfg: EvalConfig) -> dict:
    from moe_gato.tokenizer import collate

    model, tok, device = policy.model, policy.tok, policy.device
    rows = list(split_rows(len(data), cfg.validation_fraction, "validation"))[:cfg.text_documents]
    L = model.cfg.context_length
    nll = count = 0.0
    for i in range(0, len(rows), 8):
        seqs = [tok.tokenize_text(data.text(r)) for r in rows[i:i + 8]]
        seqs = [s.slice(0, min(len(s), L)).pad_to(L, tok.layout) for s in seqs]
        batch = {k: v.to(device) for k, v in collate(seqs).items()}
        out = model(batch)
        n = float(batch["loss_mask"][:, 1:].sum())
        nll += float(out.lm_loss) * n
        count += n
    mean = nll / max(count, 1)
    return {"text_nll": mean, "text_perplexity": math.exp(mean), "documents": len(rows),
            "tokens": int(count)}


# ------------------------------------------------------------------- task results
def _result_path(out: Path, spec: TaskSpec) -> Path:
    return out / "tasks" / (spec.name.replace("/", "__") + ".json")


def _load_result(out: Path, spec: TaskSpec, settings: dict) -> dict | None:
    path = _result_path(out, spec)
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # cut short by a kill: redo the task
    return result if isinstance(result, dict) and result.get("settings") == settings else None


def _save_result(out: Path, spec: TaskSpec, result: dict) -> None:
    write_json(_result_path(out, spec), result)
