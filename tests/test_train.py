"""The trainer: schedule, logs, checkpoints, exact resume after SIGKILL, NaN stop, corrupt
checkpoints, and two real processes on gloo (DeepSpeed data parallel, expert parallel)."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from moe_gato.model import build_model
from moe_gato.train import TrainingError, Trainer, load_train_config, lr_at
from moe_gato.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
TASKS = {"babyai/BabyAI-GoToLocal-v0": 2.0, "classic/Pendulum-v1": 1.0, "vl/digits": 1.0,
         "text/shakespeare": 1.0}


def write_config(tmp_path: Path, suite: Path, **top) -> Path:
    cfg = {
        "model": {"preset": "configs/model/tiny-moe.yaml", "context_length": 256, "num_layers": 2},
        "data": {"data_dir": str(suite), "tasks": TASKS},
        "batch_size": 4, "micro_batch_size": 2, "steps": 6,
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "log_every": 1, "eval_every": 3, "eval_sequences": 2, "checkpoint_every": 2,
        "keep_last": 2, "peak_flops": 1e11,
    }
    cfg.update(top)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_metrics(run: Path) -> list[dict]:
    """Complete lines only (a running trainer may be half-way through writing the last)."""
    text = (run / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]


def cli(*args, env_extra=None):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return [sys.executable, "-m", "moe_gato.cli", *args], env


# --------------------------------------------------------------------- schedule, config
def test_lr_warmup_then_cosine_to_a_tenth(tmp_path, tiny_suite):
    cfg = load_train_config(write_config(tmp_path, tiny_suite), ["steps=100", "optim.warmup_steps=10",
                                                                 "optim.lr=1e-3"])
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(99, cfg) == pytest.approx(1e-4)            # 10% of peak at the end
    mid = 10 + (99 - 10) / 2
    assert lr_at(int(mid), cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 44 / 89)))


def test_token_budget_sets_steps_and_bad_keys_are_named(tmp_path, tiny_suite):
    path = write_config(tmp_path, tiny_suite)
    cfg = load_train_config(path, ["tokens=5000"])
    assert cfg.num_steps == math.ceil(5000 / (4 * 256))
    # the context is set once, by the model; the mixture follows it
    assert cfg.data.context_len == cfg.model.context_length == 256
    assert load_train_config(path, ["model.context_length=128"]).data.context_len == 128
    assert load_train_config(path, ["data.context_len=256"]).data.context_len == 256
    with pytest.raises(ValueError, match=r"data.context_len \(512\) differs from "
                                         r"model.context_length \(256\)"):
        load_train_config(path, ["data.context_len=512"])
    with pytest.raises(ValueError, match="unknown config key optim.learning_rate"):
        load_train_config(path, ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="batch_size: expected an integer"):
        load_train_config(path, ["batch_size=big"])
    with pytest.raises(ValueError, match="model.moe.top_k"):
        load_train_config(path, ["model.moe.top_k=9"])
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        load_train_config(path, ["batch_size=5"])
    with pytest.raises(ValueError, match="zero_stage must be 0, 1 or 2"):
        load_train_config(path, ["deepspeed.enabled=true", "deepspeed.zero_stage=3"])
    with pytest.raises(ValueError, match="expert_parallel_size"):
        load_train_config(path, ["deepspeed.enabled=true", "expert_parallel_size=2"])


def test_weight_decay_on_matrices_only(tmp_path, tiny_suite):
    trainer = Trainer(load_train_config(write_config(tmp_path, tiny_suite)), tmp_path / "run")
    decay, no_decay = trainer.optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert trainer.optimizer.defaults["betas"] == (0.9, 0.95)


# --------------------------------------------------------------------------- a real run
def test_training_logs_metrics_tensorboard_and_checkpoints(tmp_path, tiny_suite):
    run = tmp_path / "run"
    last = Trainer(load_train_config(write_config(tmp_path, tiny_suite)), run).fit()
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert {"step", "tokens", "time", "loss", "lr", "tokens_per_s", "grad_norm", "mfu"} <= set(r)
        assert any(k.startswith("loss/") for k in r)
        assert any(k.startswith("moe/") and k.endswith("/entropy") for k in r)
    assert rows[-1]["tokens"] == 6 * 4 * 256
    assert all(a["time"] <= b["time"] for a, b in zip(rows, rows[1:]))
    assert {"loss/text", "loss/discrete_action", "loss/continuous_action"} <= set().union(*rows)
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(f"eval/loss/{t}" in evals[-1] for t in TASKS)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert last["step"] == 6
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert yaml.safe_load((run / "config.yaml").read_text())["batch_size"] == 4
    names = [p.name for p in ckpt.list_checkpoints(run)]
    assert names == ["step_00000004", "step_00000006"]  # keep_last: 2
    assert ckpt.verify_checkpoint(run / "checkpoints" / "step_00000006") is None


def test_data_workers_train_on_the_same_batches_and_resume(tmp_path, tiny_suite):
    """Two worker processes build the micro-batches ahead: the losses equal the in-process
    run's step for step, also when a run is stopped and resumed mid-way (the plan restarts
    at the resumed step)."""
    plain = Trainer(load_train_config(write_config(tmp_path, tiny_suite)), tmp_path / "plain")
    plain.fit()
    cfg = load_train_config(write_config(tmp_path, tiny_suite), ["data_workers=2"])
    Trainer(cfg, tmp_path / "workers").fit()
    first = [r["loss"] for r in read_metrics(tmp_path / "workers")]
    import shutil

    shutil.rmtree(tmp_path / "workers" / "checkpoints" / "step_00000006")  # back to step 4
    resumed = Trainer(cfg, tmp_path / "workers")
    resumed.fit()
    assert resumed._prefetch is None  # the worker processes were stopped
    want = [r["loss"] for r in read_metrics(tmp_path / "plain")]
    got = [r["loss"] for r in read_metrics(tmp_path / "workers")]
    assert len(got) == 6 and first == got
    assert got == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match=r"data_workers must be >= 0 \(0: no worker processes\), got -1"):
        load_train_config(write_config(tmp_path, tiny_suite), ["data_workers=-1"])
    with pytest.raises(RuntimeError, match="begins at sequence 0, the trainer asked for 4"):
        from moe_gato.data.prefetch import Prefetcher

        Prefetcher(cfg.data, seed=0, data_dir=tiny_suite, size=2, starts=[0, 2],
                   workers=1).take(4)


def test_planned_batches_train_like_the_loaders(tmp_path, tiny_suite):
    """``batches: planner`` (the device data path) trains on the loader's batches: the
    same losses step for step; a bad value is named."""
    Trainer(load_train_config(write_config(tmp_path, tiny_suite), ["steps=3"]),
            tmp_path / "loader").fit()
    planned = Trainer(load_train_config(write_config(tmp_path, tiny_suite),
                                        ["steps=3", "batches=planner"]), tmp_path / "planner")
    planned.fit()
    assert planned._planner is not None
    want = [r["loss"] for r in read_metrics(tmp_path / "loader")]
    assert [r["loss"] for r in read_metrics(tmp_path / "planner")] == want
    with pytest.raises(ValueError, match=r"batches: 'gpu' is not allowed; allowed: \['auto', 'loader'"):
        load_train_config(write_config(tmp_path, tiny_suite), ["batches=gpu"])


def test_records_and_checkpoints_are_also_due_by_time(tmp_path, tiny_suite):
    """``*_every_s``: with step cadences past the budget, 0 seconds makes every step log and
    checkpoint; null keeps the step cadence; a negative or infinite value is named."""
    base = write_config(tmp_path, tiny_suite)
    Trainer(load_train_config(base, ["steps=3", "log_every=100", "checkpoint_every=100",
                                     "eval_every=100", "log_every_s=0", "checkpoint_every_s=0",
                                     "keep_last=5"]), tmp_path / "timed").fit()
    assert [r["step"] for r in read_metrics(tmp_path / "timed")] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "timed" / "checkpoints").iterdir()) == [
        "step_00000001", "step_00000002", "step_00000003"]
    Trainer(load_train_config(base, ["steps=3", "log_every=2", "checkpoint_every=100",
                                     "eval_every=100"]), tmp_path / "steps").fit()
    assert [r["step"] for r in read_metrics(tmp_path / "steps")] == [2, 3]  # 3: the eval
    assert [p.name for p in (tmp_path / "steps" / "checkpoints").iterdir()] == ["step_00000003"]
    with pytest.raises(ValueError, match="log_every_s must be a finite number of seconds >= 0"):
        load_train_config(base, ["log_every_s=-1"])
    with pytest.raises(ValueError, match="checkpoint_every_s: expected a finite number, got inf"):
        load_train_config(base, ["checkpoint_every_s=inf"])


def test_sigkill_at_a_random_step_then_resume_continues_exactly(tmp_path, tiny_suite):
    config = write_config(tmp_path, tiny_suite, steps=10, checkpoint_every=2, eval_every=5)
    ref, run = tmp_path / "ref", tmp_path / "killed"
    args, env = cli("train", "--config", str(config), "--out", str(ref))
    subprocess.run(args, env=env, check=True, capture_output=True, timeout=600)
    kill_after = random.Random().randint(3, 8)
    args, env = cli("train", "--config", str(config), "--out", str(run))
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and len(read_metrics(run)) >= kill_after:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(read_metrics(run)) < 10, "the run finished before it could be killed"
    with open(run / "metrics.jsonl", "a") as f:  # as if the kill had cut a line short
        f.write('{"step": 99, "loss": 1.')
    subprocess.run(args, env=env, check=True, capture_output=True, timeout=600)
    a, b = read_metrics(ref), read_metrics(run)
    assert [r["step"] for r in b] == list(range(1, 11))
    for x, y in zip(a, b):
        assert x["loss"] == y["loss"], (kill_after, x["step"])
        assert x["lr"] == y["lr"] and x["tokens"] == y["tokens"]
    assert a[-1]["eval/loss"] == b[-1]["eval/loss"]


def test_nan_loss_stops_with_step_and_last_checkpoint(tmp_path, tiny_suite):
    run = tmp_path / "run"
    trainer = Trainer(load_train_config(write_config(tmp_path, tiny_suite, checkpoint_every=1)), run)
    trainer.train_step()
    trainer.save()
    with torch.no_grad():
        trainer.model.embed.tokens.weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"at step 1.*step_00000001"):
        trainer.train_step()


def test_corrupt_checkpoint_is_skipped_with_a_warning(tmp_path, tiny_suite):
    config = load_train_config(write_config(tmp_path, tiny_suite, steps=4, eval_every=100))
    run = tmp_path / "run"
    Trainer(config, run).fit()
    newest = run / "checkpoints" / "step_00000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    with pytest.warns(UserWarning, match="step_00000004.*checksum"):
        assert ckpt.latest_valid_checkpoint(run).name == "step_00000002"
    trainer = Trainer(config, run)
    with pytest.warns(UserWarning):
        assert trainer.maybe_resume() == 2
    assert trainer.loader.position == 0  # the loader is addressed by step, its state restored
    assert trainer.tokens == 2 * 4 * 256


# --------------------------------------------------------------- two processes on gloo
def torchrun(*args, timeout=600):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(29500 + random.Random().randint(0, 500)), *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_deepspeed_data_parallel_matches_one_process(tmp_path, tiny_suite, zero_stage):
    """ZeRO-2 buckets gradients in the order they become ready: this also checks that every
    rank builds the same backward graph although their micro-batches hold other modalities."""
    config = write_config(tmp_path, tiny_suite, steps=10, eval_every=100, checkpoint_every=5)
    one, two = tmp_path / "one", tmp_path / "two"
    args, env = cli("train", "--config", str(config), "--out", str(one))
    subprocess.run(args, env=env, check=True, capture_output=True, timeout=600)
    torchrun("-m", "moe_gato.cli", "train", "--config", str(config), "--out", str(two),
             "deepspeed.enabled=true", f"deepspeed.zero_stage={zero_stage}")
    a, b = read_metrics(one), read_metrics(two)
    assert len(a) == len(b) == 10
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5, x["step"]
    assert (two / "checkpoints" / "step_00000010" / "deepspeed").is_dir()
    assert ckpt.verify_checkpoint(two / "checkpoints" / "step_00000010") is None


def test_expert_parallel_gives_the_loss_and_gradients_of_one_rank(tmp_path, tiny_suite):
    torchrun("tests/dist/expert_parallel_check.py", str(tiny_suite), str(tmp_path))
    for rank in (0, 1):
        v = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert v["ep_loss"] == pytest.approx(v["ref_loss"], abs=1e-6)
        assert v["max_rel_grad_err"] < 1e-5
        assert v["num_expert_params"] == 2 * 4 * 2  # 2 layers x 4 groups x (w1, w2)
        assert v["same_weights"]


def test_expert_parallel_training_matches_one_process(tmp_path, tiny_suite):
    config = write_config(tmp_path, tiny_suite, steps=4, eval_every=100, checkpoint_every=4)
    one, two = tmp_path / "one", tmp_path / "two"
    args, env = cli("train", "--config", str(config), "--out", str(one))
    subprocess.run(args, env=env, check=True, capture_output=True, timeout=600)
    torchrun("-m", "moe_gato.cli", "train", "--config", str(config), "--out", str(two),
             "expert_parallel_size=2")
    a, b = read_metrics(one), read_metrics(two)
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 and abs(x["grad_norm"] - y["grad_norm"]) <= 1e-5
    # the expert-parallel checkpoint holds the gathered, unsharded model
    from safetensors.torch import load_file

    w1 = load_file(str(one / "checkpoints" / "step_00000004" / "model.safetensors"))
    w2 = load_file(str(two / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)  # 4 AdamW steps


def test_a_model_vocabulary_that_does_not_fit_the_data_is_refused(tmp_path, tiny_suite):
    """Issue #10, item 3: a gato-* vocabulary (32000 text pieces) on data tokenized with the
    shipped 8192-piece model would put actions and '|' on rows that never see data."""
    path = write_config(tmp_path, tiny_suite)
    with pytest.raises(ValueError, match="model.text_vocab_size is 32000 but the data's text "
                                         "tokenizer .* has 8192 pieces"):
        Trainer(load_train_config(path, ["model.text_vocab_size=32000"]), tmp_path / "run")
    with pytest.raises(ValueError, match="discrete_offset"):
        Trainer(load_train_config(path, ["model.discrete_offset=separate"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_head_at_the_targets_trains_like_the_full_head(tmp_path, tiny_suite):
    """head_logits=targets (the head only where the loss is taken) and fused (the head and
    the cross-entropy in chunks) follow the full head's losses over a few steps to float
    rounding; auto picks targets on the CPU; a bad value is refused with what is allowed."""
    path = write_config(tmp_path, tiny_suite)
    runs = {h: Trainer(load_train_config(path, ["steps=3", f"head_logits={h}"]),
                       tmp_path / h).fit() for h in ("all", "targets", "fused")}
    for head in ("targets", "fused"):
        for key in ("loss", "eval/loss", "grad_norm"):
            assert runs[head][key] == pytest.approx(runs["all"][key], rel=1e-4), (head, key)
    auto = Trainer(load_train_config(path, ["steps=1", "head_logits=auto"]), tmp_path / "auto")
    assert auto.objective.logits == "targets"
    with pytest.raises(ValueError, match=r"head_logits: 'some' is not allowed; allowed: \['auto'"):
        load_train_config(path, ["head_logits=some"])


def test_compiled_blocks_train_like_eager_ones(tmp_path, tiny_suite):
    """compile: blocks (torch.compile of each block, in place) gives the eager run's losses
    and gradient norms over a few steps to float rounding, and checkpoints with the same
    parameter names; with expert parallelism it is refused with what to do instead."""
    from safetensors import safe_open

    path = write_config(tmp_path, tiny_suite)
    extra = ["steps=3", "eval_every=3", "checkpoint_every=3"]
    runs = {c: Trainer(load_train_config(path, [*extra, f"compile={c}"]), tmp_path / c).fit()
            for c in ("none", "blocks")}
    for key in ("loss", "eval/loss", "grad_norm"):
        assert runs["blocks"][key] == pytest.approx(runs["none"][key], rel=1e-4), key
    names = {}
    for c in ("none", "blocks"):
        with safe_open(str(tmp_path / c / "checkpoints" / "step_00000003" / "model.safetensors"),
                       "pt") as f:
            names[c] = set(f.keys())
    assert names["blocks"] == names["none"] and not any("_orig_mod" in n for n in names["none"])
    with pytest.raises(ValueError, match="compile: blocks is not supported with "
                                         "expert_parallel_size > 1"):
        load_train_config(path, ["compile=blocks", "expert_parallel_size=2"])


# ------------------------------------------------------------- the loop's parts
def test_the_objective_is_a_part_the_loop_takes(tmp_path, tiny_suite):
    """A step minimises whatever objective the trainer is given; its named parts are
    logged as objective/<name>."""
    from moe_gato.train.objective import LanguageModelLoss, ObjectivePart

    class Doubled(LanguageModelLoss):
        def __call__(self, model, batch):
            part = super().__call__(model, batch)
            return ObjectivePart(loss=2.0 * part.loss, aux=part.aux, out=part.out,
                                 parts={"half": part.loss / 2})

    cfg = load_train_config(write_config(tmp_path, tiny_suite), ["steps=1"])
    base = Trainer(cfg, tmp_path / "lm").fit()
    doubled = Trainer(cfg, tmp_path / "doubled", objective=Doubled()).fit()
    assert doubled["loss"] == pytest.approx(2 * base["loss"], rel=1e-6)
    assert doubled["objective/half"] == pytest.approx(base["loss"] / 2, rel=1e-6)
    assert "objective/half" not in base


def test_a_uniform_backward_graph_is_asked_for_not_inferred(tmp_path, tiny_suite):
    """One process skips the patch block and the expert groups a batch does not use, with
    gradients recorded or not; parallelize asks for every part when ranks must agree."""
    from moe_gato.model import build_model, load_config
    from moe_gato.tokenizer import GatoTokenizer, collate, pack_sequences

    trainer = Trainer(load_train_config(write_config(tmp_path, tiny_suite)), tmp_path / "run")
    assert trainer.model.embed.uniform_graph is False  # one process
    tok = GatoTokenizer()
    batch = collate(pack_sequences([tok.tokenize_text("To be, or not to be.")], context_len=32,
                                   layout=tok.layout))  # text only: no image, no action
    model = build_model(load_config("configs/model/tiny-moe.yaml", ["num_layers=1"]))
    model(batch).loss.backward()
    patch = [p for n, p in model.named_parameters() if n.startswith("embed.patches.")]
    action = [p for n, p in model.named_parameters() if ".groups.action." in n]
    assert all(p.grad is None for p in patch + action)
    model.zero_grad(set_to_none=True)
    model.set_uniform_graph(True)
    model(batch).loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in patch + action)


def test_sequence_weighting_is_split_invariant_and_a_mean_of_sequence_means(tmp_path, tiny_suite):
    """``data.loss_weighting=sequence``: the step's loss is the mean over sequences of each
    sequence's mean target loss, and its gradient is the same whether a step is one
    micro-batch of 4 or two of 2 (the loop weighs micro-batches by their target weight,
    not their target count)."""
    # dense and without images (BabyAI has its 56x56 view): the MoE balancing loss and the
    # patch positions' draws are per micro-batch by design, the loss weighting must not be
    dense = {"preset": "configs/model/tiny-dense.yaml", "context_length": 256, "num_layers": 2}
    tasks = {"classic/Pendulum-v1": 1.0, "text/shakespeare": 1.0}
    path = write_config(tmp_path, tiny_suite, model=dense,
                        data={"data_dir": str(tiny_suite), "tasks": tasks})
    grads, losses = {}, {}
    for micro in (4, 2):
        cfg = load_train_config(path, ["data.loss_weighting=sequence",
                                       f"micro_batch_size={micro}"])
        trainer = Trainer(cfg, tmp_path / f"micro{micro}")
        trainer.optimizer.step = lambda m=trainer.model, k=micro: grads.__setitem__(
            k, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        losses[micro] = trainer.train_step()["loss"]
    assert losses[4] == pytest.approx(losses[2], rel=2e-5)
    assert grads[4].keys() == grads[2].keys()
    for name, g in grads[4].items():  # float32 sums in another order
        torch.testing.assert_close(g, grads[2][name], rtol=0, atol=1e-3 * float(g.abs().max()))
    # by hand, on the first batch
    batch = trainer.loader.batch(0, 4)
    with torch.no_grad():
        out = build_model(cfg.model)(batch)
    nll_BL = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1),
                                               batch["tokens"][:, 1:].flatten(),
                                               reduction="none").view(4, -1)
    mask_BL = batch["loss_mask"][:, 1:]
    per_sequence = [(nll_BL[b][mask_BL[b]]).mean() for b in range(4)]
    assert len({int(m.sum()) for m in mask_BL}) > 1   # sequences of different target counts
    torch.testing.assert_close(out.lm_loss, torch.stack(per_sequence).mean())
