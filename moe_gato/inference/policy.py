"""``Policy``: a trained MoE-Gato acting in a control loop, one forward pass per token.

    policy = Policy.from_checkpoint("runs/demo/teacher", device="cpu")
    policy.reset(task.info, prompt=demo_episode)       # per episode (prompt optional)
    action = policy.act(task.observe(raw_obs))          # per step: an env action

Per step the observation is tokenized exactly as the collectors stored it (the task's
``obs_spec``), appended with the separator '|' to the KV cache, and the action tokens are
decoded one by one with top-k routing, restricted to the task's action ids (its first
``action_dim`` discrete values, or the 1024 continuous bins), greedy (temperature 0) or
sampled. The last action token is fed together with the next observation, so a step with
A action tokens costs A forward passes.

Shape letters: B environments (rows), L positions of one call, A action tokens.

Context. The model was trained on windows of ``context_length`` tokens that start on a
timestep boundary. When the cache would exceed that, the oldest whole timesteps are
evicted (a prompt stays). Gato has no global positions, so the cache can roll: the kept
keys and values are reused as they are. That differs from recomputing the truncated
window (``use_cache=False``): there every kept token's keys and values are computed again
from the window alone, as in training; in the rolling cache the deeper layers' keys and
values of kept tokens were computed while the evicted steps were still visible, so they
still carry information from them. The two agree exactly until the first eviction (a test
checks that greedy actions are identical); recomputing costs a full window per token.

Batches. ``reset(task, batch_size=N)`` then ``act_batch`` steps N environments of one task
with one forward pass per token for all of them. Rows whose observation has fewer tokens
(a shorter BabyAI mission) are left-padded, and padding is invisible to every other
position; rows whose episode ended are dropped from the batch and the cache.

CUDA graphs. ``Policy(graphs=True)`` keeps the cache in fixed buffers (``StaticKVCache``) and
runs each forward call shape of the loop (a task's observation chunk, one action token) as a
captured CUDA graph (``moe_gato.inference.graphs``); on a CPU the same static-shape step runs
eagerly. The actions are those of the dynamic cache (tests/test_graphs.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from moe_gato.envs.episode import Episode, TaskInfo
from moe_gato.tokenizer import GatoTokenizer, Kind, TokenSequence, collate
from moe_gato.tokenizer.layout import ACTION_LOCAL_POS, PATCH_CHANNELS, PATCH_SIZE
from moe_gato.tokenizer.pack import timestep_starts

#: prompt slots are tagged with this; they are never evicted
PROMPT_TAG = -2


class PromptTooLong(ValueError):
    """Several demonstrations asked of a prompt whose share of the context cannot hold a
    timestep of each."""


class Policy:
    """A trained model as a controller for the environments of ``moe_gato.envs``."""

    def __init__(self, model, *, device: str | torch.device | None = None,
                 temperature: float = 0.0, prompt_share: float = 0.25, use_cache: bool = True,
                 seed: int = 0, tokenizer: GatoTokenizer | None = None,
                 context_length: int | None = None, graphs: bool = False) -> None:
        """``context_length``: positions the policy keeps (default: the model's, what it was
        trained on; a longer one runs the model on windows it never saw). ``graphs``: each
        forward call shape of the loop is captured in a CUDA graph and replayed
        (``moe_gato.inference.graphs``; on a CPU the same static-shape step runs eagerly);
        needs the cache and a MoE without capacity drops or added experts."""
        if temperature < 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        if not 0 <= prompt_share < 1:
            raise ValueError(f"prompt_share must lie in [0, 1), got {prompt_share}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        cfg = model.cfg
        try:
            self.tok = tokenizer or GatoTokenizer(layout=cfg.layout)
        except ValueError as exc:
            raise ValueError(f"the model's vocabulary does not match the text tokenizer: "
                             f"{exc}") from None
        if self.tok.layout != cfg.layout:
            raise ValueError(f"tokenizer layout {self.tok.layout} differs from the model's "
                             f"{cfg.layout}")
        self.context_length = int(context_length or cfg.context_length)
        if self.context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {self.context_length}")
        self.temperature = float(temperature)
        self.prompt_share = float(prompt_share)
        self.use_cache = use_cache
        if graphs:
            from moe_gato.inference.graphs import check_graphs
            if not use_cache:
                raise ValueError("graphs=True needs use_cache=True (graphs replay cached steps)")
            check_graphs(model)
        self.graphs = bool(graphs)
        self.steps = None  # StepGraphs of the static cache (graphs=True)
        self.seed = int(seed)
        self.task: TaskInfo | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str | torch.device = "cpu",
                        **kwargs) -> "Policy":
        """``path`` is a model checkpoint folder (``model.safetensors`` + ``config.yaml``)
        or a training run directory, whose newest checkpoint that verifies is used. Files
        are checked against ``checksums.json`` where there is one; nothing is unpickled."""
        from moe_gato.model import load_checkpoint
        from moe_gato.train.checkpoint import model_folder

        folder = model_folder(path)
        policy = cls(load_checkpoint(folder, map_location=device), device=device, **kwargs)
        policy.checkpoint = folder
        return policy

    # ------------------------------------------------------------------ episodes
    def reset(self, task: TaskInfo | Any, *, batch_size: int = 1,
              prompt: Episode | Sequence[Episode] | None = None, seed: int | None = None) -> None:
        """Starts new episodes of ``task`` (a ``TaskInfo``, or a ``ControlTask``) in
        ``batch_size`` environments. ``prompt``: a demonstration of the task (e.g. a
        successful stored expert episode); its last whole timesteps that fit in
        ``prompt_share`` of the context go first, as in Gato's evaluation. Several
        demonstrations share that part of the context equally, each its last whole
        timesteps, in the order given (see ``_prompt``)."""
        info = task if isinstance(task, TaskInfo) else getattr(task, "info", None)
        if not isinstance(info, TaskInfo):
            raise ValueError(f"task must be a TaskInfo or a ControlTask, got {type(task).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.task = info
        self.spec = {k: v.modality for k, v in info.obs_spec.items()}
        self.action_kind = Kind.DISCRETE_ACTION if info.action_kind == "discrete" \
            else Kind.CONTINUOUS_ACTION
        self.num_action_tokens = 1 if info.action_kind == "discrete" else info.action_dim
        self.num_choices = info.action_dim if info.action_kind == "discrete" else None
        self.rows = list(range(batch_size))
        self.t = 0
        self.pending: torch.Tensor | None = None  # (B,) last action token, not yet fed
        self.generator = torch.Generator(device=self.device).manual_seed(
            self.seed if seed is None else int(seed))
        if isinstance(prompt, Episode):
            prompt = [prompt]
        self.prompt = self._prompt(list(prompt)) if prompt else None
        # recompute mode: each row's token history; cache mode: the KV cache
        self.history = [[] for _ in self.rows]
        # evicted slots stay (masked) until the buffer fills and the live ones are compacted:
        # a quarter of a context of slack bounds both the copies and the masked attention
        capacity = self.context_length * 5 // 4 + 64
        if self.graphs:
            self._static_cache(batch_size, capacity)
        else:
            self.cache = self.model.new_cache(capacity=capacity)
        if self.prompt is not None and self.use_cache:
            self.cache.reserve(len(self.prompt))
            self._forward([self.prompt] * batch_size, tag=PROMPT_TAG)

    def act(self, observation: dict[str, Any]) -> Any:
        """One environment (``batch_size=1``): its stored fields of this step -> env action."""
        if self.task is None:
            raise ValueError("call reset(task) before act()")
        if len(self.rows) != 1:
            raise ValueError(f"act() steps one environment; this episode has {len(self.rows)} "
                             f"(use act_batch)")
        return self.act_batch([observation], rows=self.rows)[0]

    @torch.no_grad()
    def act_batch(self, observations: Sequence[dict[str, Any]],
                  rows: Sequence[int] | None = None) -> list[Any]:
        """Actions for the environments ``rows`` (indices given at ``reset``, default all
        still running), from their stored fields of this step. Rows missing from an earlier
        call's set must not come back (their episode ended)."""
        if self.task is None:
            raise ValueError("call reset(task) before act_batch()")
        rows = list(self.rows if rows is None else rows)
        if len(observations) != len(rows):
            raise ValueError(f"got {len(observations)} observations for {len(rows)} rows")
        if rows != self.rows:
            self._keep_rows(rows)
        steps = [self._tokenize_step(obs) for obs in observations]
        if self.use_cache:
            ids_BA = self._act_cached(steps)
        else:
            ids_BA = self._act_recompute(steps)
        self.t += 1
        values = self.tok.detokenize_actions(ids_BA.cpu().numpy(), self.task.action_kind)
        return [self.task.to_env_action(v[0] if self.task.action_kind == "discrete" else v)
                for v in values]

    # ------------------------------------------------------------------ internals
    def _tokenize_step(self, observation: dict[str, Any]) -> TokenSequence:
        fields = self.task.check_observation(observation)
        obs = {k: [v] if isinstance(v, str) else np.asarray(v)[None] for k, v in fields.items()}
        dummy = np.zeros((1, self.task.action_dim) if self.task.action_kind == "continuous"
                         else (1,), np.float32 if self.task.action_kind == "continuous" else np.int64)
        seq = self.tok.tokenize_episode(obs, dummy, action_kind=self.task.action_kind,
                                        spec=self.spec)
        seq = seq.slice(0, len(seq) - self.num_action_tokens)  # observation and '|'
        seq.timestep[:] = self.t
        return seq

    def _prompt(self, episodes: list[Episode]) -> TokenSequence | None:
        """The demonstrations' last whole timesteps, each within an equal part of
        ``prompt_share`` of the context, one after the other; each one's timesteps are
        numbered on from the previous one's. One demonstration of which not even a timestep
        fits gives no prompt (Gato's evaluation prompts where it can); of several, it is an
        error that says how many fit."""
        budget = int(self.prompt_share * self.context_length)
        parts, next_step = [], None
        for episode in episodes:
            seq = self.tok.tokenize_episode(episode.observations, episode.actions,
                                            action_kind=self.task.action_kind, spec=self.spec)
            part = _newest_timesteps(seq, budget // len(episodes))
            if part is None:
                if len(episodes) == 1:
                    return None
                step = int(np.diff(np.append(timestep_starts(seq), len(seq))).max())
                raise PromptTooLong(
                    f"{self.task.name}: {len(episodes)} demonstrations do not fit the prompt: "
                    f"each gets {budget // len(episodes)} positions ({self.prompt_share} of the "
                    f"context of {self.context_length}, shared), a timestep takes up to {step}; "
                    f"at most {max(budget // step, 0)} fit (or raise the prompt share)")
            if next_step is not None:  # number on, so that demonstrations never merge
                part.timestep = part.timestep - part.timestep[0] + next_step
            next_step = int(part.timestep[-1]) + 1
            parts.append(part)
        return TokenSequence.concat(parts)

    def _static_cache(self, batch_size: int, capacity: int) -> None:
        """The static cache and its graphs: kept from the last episode when its buffers
        still fit (then the captured graphs replay on), else made anew."""
        from moe_gato.inference.graphs import StepGraphs

        cache = self.steps.cache if self.steps is not None else None
        if (cache is not None and cache.valid_BC.shape == (batch_size, capacity)
                and cache.generation == 0):
            cache.clear()
            self.cache = cache
            return
        self.cache = self.model.new_static_cache(rows=batch_size, capacity=capacity,
                                                 device=self.device)
        self.steps = StepGraphs(self.model, self.cache, capture=self.device.type == "cuda")

    def _keep_rows(self, rows: list[int]) -> None:
        index = {r: i for i, r in enumerate(self.rows)}
        missing = [r for r in rows if r not in index]
        if missing:
            raise ValueError(f"rows {missing} are not running (running: {self.rows})")
        keep = torch.tensor([index[r] for r in rows], device=self.device)
        if self.cache.valid_BC is not None:
            self.cache.select_rows(keep)
        if self.pending is not None:
            self.pending = self.pending.index_select(0, keep)
        self.history = [self.history[index[r]] for r in rows]
        self.rows = rows

    def _act_cached(self, steps: list[TokenSequence]) -> torch.Tensor:
        A = self.num_action_tokens
        # the previous step's last action token leads every row (then the row's padding),
        # so it sits in one slot for all rows and whole timesteps can be evicted by slot
        lead = None if self.pending is None else [
            _action_tokens([tok], self.action_kind, self.t - 1) for tok in self.pending.tolist()]
        width = max(len(s) for s in steps) + (lead is not None)
        self._evict(width + A - 1)
        self.cache.reserve(width + A - 1)
        start = self.cache.length
        ids_BA = self._forward(steps, lead=lead, decode=A)
        self.cache.tag(start, self.cache.length, self.t)
        if lead is not None:
            self.cache.tag(start, start + 1, self.t - 1)
        self.pending = ids_BA[:, -1]
        return ids_BA

    def _evict(self, need: int) -> None:
        """Evicts the oldest whole timesteps until ``need`` more slots fit in the context."""
        live_C, tags_C = self.cache.live_tags()  # on the host
        live = int(live_C.sum())
        if live + need <= self.context_length:
            return
        evict_C = np.zeros_like(live_C)
        for t in sorted(set(tags_C[live_C & (tags_C >= 0)].tolist())):
            sel_C = live_C & (tags_C == t)
            evict_C |= sel_C
            live -= int(sel_C.sum())
            if live + need <= self.context_length:
                break
        if live + need > self.context_length:
            self._too_long(need)
        self.cache.evict(evict_C)

    def _too_long(self, need: int) -> None:
        raise ValueError(f"{self.task.name}: one timestep needs {need} positions (and the "
                         f"prompt {self._prompt_len()}), more than the model's context_length "
                         f"{self.context_length}")

    def _prompt_len(self) -> int:
        return 0 if self.prompt is None else len(self.prompt)

    def _act_recompute(self, steps: list[TokenSequence]) -> torch.Tensor:
        """No cache: every token is decoded by a forward pass over the whole window (the
        prompt and the newest whole timesteps that fit with this step's action tokens)."""
        A = self.num_action_tokens
        budget = self.context_length - self._prompt_len() - (A - 1)
        windows = []
        for hist, seq in zip(self.history, steps, strict=True):
            window = _newest_timesteps(TokenSequence.concat([*hist, seq]), budget)
            if window is None:
                self._too_long(len(seq) + A - 1)
            windows.append(window)
        lo, hi = self.model.cfg.layout.id_range(self.action_kind)
        hi = lo + self.num_choices if self.num_choices else hi
        out = []
        for _ in range(A):
            seqs = windows if self.prompt is None else [
                TokenSequence.concat([self.prompt, w]) for w in windows]
            logits_BN = self._run(seqs, last_only=True, id_range=(lo, hi)).logits[:, -1]
            ids_B = self._pick(logits_BN) + lo
            out.append(ids_B)
            windows = [TokenSequence.concat([w, _action_tokens([tok], self.action_kind, self.t)])
                       for w, tok in zip(windows, ids_B.tolist(), strict=True)]
        self.history = [[w] for w in windows]
        return torch.stack(out, 1)

    def _pick(self, logits_BN: torch.Tensor) -> torch.Tensor:
        if self.temperature == 0:
            return logits_BN.float().argmax(-1)
        probs_BN = (logits_BN.float() / self.temperature).softmax(-1)
        return torch.multinomial(probs_BN, 1, generator=self.generator).squeeze(1)

    def _forward(self, seqs: list[TokenSequence], *, lead: list[TokenSequence] | None = None,
                 decode: int = 0, tag: int = 0) -> torch.Tensor | None:
        """Feeds ``seqs`` (one per row, after ``lead``) into the cache; with ``decode`` > 0
        generates that many action tokens (all but the last fed back), else tags the slots."""
        batch = self._batch(seqs, lead)
        with self._autocast():
            if decode:
                return self.model.generate(
                    batch, decode, kind=self.action_kind, num_choices=self.num_choices,
                    temperature=self.temperature, cache=self.cache, generator=self.generator,
                    feed_last=False, step_logits=self.steps.logits if self.graphs else None)
            start = self.cache.length
            if self.graphs:  # once an episode: not worth a graph
                self.steps.logits(batch, (0, 1), graph=False)
            else:
                self.model(batch, cache=self.cache, compute_loss=False, last_only=True,
                           id_range=(0, 1))
        self.cache.tag(start, self.cache.length, tag)
        return None

    def _run(self, seqs: list[TokenSequence], **kw):
        with self._autocast():
            return self.model(self._batch(seqs), compute_loss=False, **kw)

    def _autocast(self):
        if self.device.type == "cuda":  # a graph must not keep autocast's cached casts
            return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not self.graphs)
        return torch.autocast("cpu", enabled=False)

    def _batch(self, seqs: list[TokenSequence], lead: list[TokenSequence] | None = None) -> dict:
        """Rows padded to one length after their ``lead`` (``valid`` marks the padding), so
        that every row ends on its own last token."""
        width = max(len(s) for s in seqs)
        n_lead = 0 if lead is None else len(lead[0])
        padded, valid = [], np.ones((len(seqs), n_lead + width), bool)
        for i, s in enumerate(seqs):
            k = width - len(s)
            valid[i, n_lead:n_lead + k] = False
            pad = TokenSequence.empty().pad_to(k, self.tok.layout)
            parts = ([] if lead is None else [lead[i]]) + ([pad] if k else [])
            padded.append(TokenSequence.concat(parts + [s]) if parts else s)
        batch = collate(padded)
        if not valid.all():
            batch["valid"] = torch.from_numpy(valid)
        return {k: v.to(self.device) for k, v in batch.items()}


def _newest_timesteps(seq: TokenSequence, budget: int) -> TokenSequence | None:
    """The newest whole timesteps of ``seq`` that fit in ``budget`` positions (None if not
    even the last one fits)."""
    if len(seq) <= budget:
        return seq
    starts = timestep_starts(seq)
    fits = starts[len(seq) - starts <= budget]
    return seq.slice(int(fits[0]), len(seq)) if len(fits) else None


def _action_tokens(tokens: list[int], kind: Kind, timestep: int) -> TokenSequence:
    n = len(tokens)
    return TokenSequence(tokens=np.asarray(tokens, np.int64), kinds=np.full(n, kind, np.int8),
                         local_pos=np.full(n, ACTION_LOCAL_POS, np.int32),
                         loss_mask=np.ones(n, bool), timestep=np.full(n, timestep, np.int32),
                         image_rc=np.zeros((n, 4), np.float32),
                         patches=np.zeros((0, PATCH_CHANNELS, PATCH_SIZE, PATCH_SIZE), np.float32))
