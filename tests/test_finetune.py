"""Fine-tuning (moe_gato/train/finetune.py, finetune_modes.py): new-expert mode's bit-exact
start and its frozen weights, experts mode's frozen shared weights, exact resume, the
fine-tuned checkpoint in Policy / eval / bench-latency / distill, refused inputs,
DeepSpeed ZeRO-1 over two processes; prompting with several demonstrations; the study
script end to end on a micro configuration."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from moe_gato.model import build_model, load_checkpoint, save_checkpoint
from moe_gato.model import accounting
from moe_gato.model.checkpoint import write_checksums
from moe_gato.train import Trainer, load_train_config
from moe_gato.train.checkpoint import list_checkpoints, model_folder
from moe_gato.train.finetune import finetune
from moe_gato.train.finetune_modes import mode_model_config, start_model
from test_train import cli, read_metrics, torchrun, write_config

REPO = Path(__file__).resolve().parents[1]
HELD_OUT = "babyai/BabyAI-GoToObj-v0"
GROUPS = ("text", "image", "observation", "action")


@pytest.fixture(scope="module")
def ft_suite(tiny_suite, tmp_path_factory):
    """The tiny suite plus a held-out task (6 episodes: 5 train, 1 validation), in a copy."""
    from moe_gato.data.collect import collect

    out = tmp_path_factory.mktemp("ft_suite") / "data"
    shutil.copytree(tiny_suite, out)
    collect("default", out, tasks=[HELD_OUT], episodes=6, return_episodes=2, workers=1,
            progress=False)
    return out


@pytest.fixture(scope="module")
def pretrained(ft_suite, tmp_path_factory):
    """A tiny MoE (2 layers, context 256) trained 2 steps on the suite's training tasks."""
    tmp = tmp_path_factory.mktemp("pretrained")
    cfg = load_train_config(write_config(tmp, ft_suite, steps=2, eval_every=100,
                                         checkpoint_every=2))
    Trainer(cfg, tmp / "run").fit()
    return tmp / "run"


def _run(pretrained, suite, out, **kw) -> dict:
    kw = {"tasks": [HELD_OUT], "episodes": 2, "steps": 2, **kw}
    return finetune(checkpoint=pretrained, out=out, data=suite, **kw)


def _demo_batches(suite, count=2, size=4):
    from moe_gato.data.loader import SequenceLoader
    from moe_gato.data.mixture import MixtureConfig

    mixture = MixtureConfig(data_dir=str(suite), context_len=256, tasks={HELD_OUT: 1.0},
                            allow_held_out=True)
    loader = SequenceLoader(mixture, split="train", seed=1, data_dir=suite)
    return [loader.batch(i * size, size) for i in range(count)]


# ------------------------------------------------------------------- new-expert mode
def test_new_expert_starts_with_the_pretrained_outputs_bit_for_bit(pretrained, ft_suite):
    """The added expert adds exactly zero at step 0: logits, loss, routing and greedy
    decoding equal the checkpoint's in the training path (gradients recorded), the
    per-group path without gradients (1024 tokens) and the inference fast path (256
    tokens, one-token decoding); its output weights already get a gradient, nothing
    frozen does."""
    from moe_gato.tokenizer import Kind

    old = load_checkpoint(model_folder(pretrained))
    cfg = mode_model_config(old.cfg, "new-expert")
    assert cfg.moe.added_experts == 1 and old.cfg.moe.added_experts == 0
    torch.manual_seed(0)
    new = build_model(cfg)
    batches = _demo_batches(ft_suite)
    trained = start_model(new, old, "new-expert", batches)
    added = {n: p for n, p in new.named_parameters() if ".added.0." in n}
    assert trained == sum(p.numel() for p in added.values()) == sum(
        p.numel() for p in new.parameters() if p.requires_grad)
    assert accounting.num_params(cfg) == new.num_params() == old.num_params() + trained
    # half of the demonstrations' tokens of each group take the new expert at step 0
    with torch.no_grad():
        routed = new.eval()(batches[0] | {}, compute_loss=False).routing
    shares = [float(r[g].added_load_A[0]) / r[g].token_index_t.numel()
              for r in routed for g in GROUPS if g in r]
    assert len(shares) == 2 * len(GROUPS) and all(0 < s < 1 for s in shares), shares

    batch = batches[0]
    for training in (True, False):
        old.train(training), new.train(training)
        for rows in (batch, {k: v[:1] for k, v in batch.items()}):  # 1024 and 256 tokens
            with torch.set_grad_enabled(training):
                torch.manual_seed(7)  # patch positions are drawn in training mode
                a = old(rows)
                torch.manual_seed(7)
                b = new(rows)
            assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
            for la, lb in zip(a.routing, b.routing, strict=True):
                assert la.keys() == lb.keys()
                for g in la:
                    assert torch.equal(la[g].expert_ids_tK, lb[g].expert_ids_tK)
                    assert torch.equal(la[g].load_E, lb[g].load_E)
    prefix = {k: v[:1, :40] for k, v in batch.items() if k != "patches"}
    prefix["patches"] = batch["patches"][:int((batch["kinds"][:1, :40] == Kind.IMAGE).sum())]
    assert torch.equal(old.generate(prefix, 3, temperature=0),
                       new.generate(prefix, 3, temperature=0))

    new.train()
    new(batch).loss.backward()
    for name, p in new.named_parameters():
        if ".added.0." not in name:
            assert p.grad is None, name
        elif name.endswith("w2_FD"):  # tokens reach it: it learns from step 0
            assert not _reaches_the_loss(name) or p.grad.abs().sum() > 0, name
        else:  # behind the zero output weights: no gradient yet
            assert not p.grad.any(), name


def _reaches_the_loss(name: str) -> bool:
    """Whether an added expert's output surely reaches the loss: any group's in the first
    layer (the next attends to it); in the last one where targets are predicted (text; the
    separator and actions). Last-layer image and observation positions mostly predict no
    target."""
    return name.startswith("blocks.0.") or ".groups.text." in name or ".groups.action." in name


def test_new_expert_mode_trains_the_new_expert_and_nothing_else(pretrained, ft_suite, tmp_path):
    """Every pre-existing weight and buffer stays bit-equal through the optimizer steps
    (weight decay included); the new experts' weights move; the checkpoint's config has one
    more expert per group and its accounting matches."""
    run = tmp_path / "ne"
    _run(pretrained, ft_suite, run, mode="new-expert", steps=3)
    before = load_checkpoint(model_folder(pretrained))
    after = load_checkpoint(model_folder(run))
    assert after.cfg.moe.added_experts == 1 and after.cfg.moe.num_experts == 4
    assert accounting.num_params(after.cfg) == after.num_params()
    assert accounting.num_active_params(after.cfg) > accounting.num_active_params(before.cfg)
    state = after.state_dict()
    for name, tensor in before.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    moved_rows = 0
    for name, p in after.named_parameters():
        if name.endswith(".added.0.w2_FD") and _reaches_the_loss(name):
            assert p.abs().sum() > 0, name  # started at zero
    for block in after.blocks:
        for group in block.ffn.groups.values():
            new = group.added[0]
            moved_rows += not any(torch.equal(new.router_D, r) for r in group.router_ED)
    assert moved_rows > 0  # started as a copy of a routed expert's row
    settings = json.loads((run / "finetune.json").read_text())
    assert settings["mode"] == "new-expert" and settings["trained_params"] == sum(
        v.numel() for k, v in state.items() if ".added.0." in k)
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert any(k.startswith("moe/0/") and "/added/0" in k for k in rows[0])


def test_experts_mode_keeps_every_shared_weight_bit_equal(pretrained, ft_suite, tmp_path):
    run = tmp_path / "experts"
    _run(pretrained, ft_suite, run, mode="experts")
    before = load_checkpoint(model_folder(pretrained)).state_dict()
    after = load_checkpoint(model_folder(run)).state_dict()
    assert before.keys() == after.keys()
    shared = [k for k in before if ".ffn.groups." not in k]
    experts = [k for k in before if ".ffn.groups." in k and "expert_bias" not in k]
    assert shared and experts
    assert all(torch.equal(before[k], after[k]) for k in shared)
    assert not all(torch.equal(before[k], after[k]) for k in experts)
    assert json.loads((run / "finetune.json").read_text())["trained_params"] == sum(
        before[k].numel() for k in experts)


def test_a_resumed_finetune_continues_exactly(pretrained, ft_suite, tmp_path):
    """new-expert with a replay share: killed after step 2 (its step-4 checkpoint gone),
    rerun, the same losses; the replay mixture is the checkpoint's own."""
    run = tmp_path / "resume"
    kw = dict(mode="new-expert", steps=4, replay=0.25,
              overrides=["checkpoint_every=2", "eval_every=100"])
    _run(pretrained, ft_suite, run, **kw)
    first = read_metrics(run)
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    tasks = yaml.safe_load((run / "config.yaml").read_text())["data"]["tasks"]
    assert tasks[HELD_OUT] == pytest.approx(0.75)
    assert tasks["babyai/BabyAI-GoToLocal-v0"] == pytest.approx(0.25 * 2 / 5)
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    assert _run(pretrained, ft_suite, run, **kw)["step"] == 4
    assert [r["loss"] for r in read_metrics(run)] == [r["loss"] for r in first]
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002", "step_00000004"]


def test_a_run_saved_before_the_new_keys_resumes(pretrained, tmp_path):
    """A run whose saved config predates moe.added_experts, data.train_episodes and
    data.allow_held_out resumes: a missing key means what the run trained with."""
    run = tmp_path / "old"
    shutil.copytree(pretrained, run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["model"]["moe"]["added_experts"]
    del saved["data"]["train_episodes"], saved["data"]["allow_held_out"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    cfg = load_train_config(pretrained / "config.yaml", ["steps=3"])
    with pytest.warns(UserWarning, match=r"resuming at step 2 with changed settings "
                                         r"\(steps: 2 -> 3\)"):
        assert Trainer(cfg, run).fit()["step"] == 3


def test_tasks_the_data_lacks_are_collected_on_the_fly(pretrained, ft_suite, tmp_path):
    """--collect: a task missing from the data folder is collected into it (the episodes
    asked for in its training split, one more to validate), then trained on."""
    from moe_gato.data.storage import read_manifest

    data = tmp_path / "data"
    shutil.copytree(ft_suite, data)
    last = _run(pretrained, data, tmp_path / "cartpole", tasks=["classic/CartPole-v1"],
                collect=True, episodes=3, steps=1)
    assert last["step"] == 1 and "eval/loss/classic/CartPole-v1" in last
    entry = read_manifest(data)["tasks"]["classic/CartPole-v1"]
    assert entry["episodes"] == 4 and entry["expert_return"] > entry["random_return"]


# --------------------------------------------------------- the checkpoint, used elsewhere
def test_the_finetuned_checkpoint_loads_in_policy_eval_latency_and_distill(pretrained, ft_suite,
                                                                           tmp_path):
    from moe_gato.cli import main
    from moe_gato.envs import TASKS, make_control_task, run_episode
    from moe_gato.eval.evaluate import EvalConfig, evaluate
    from moe_gato.inference import Policy, PolicyActor
    from moe_gato.train.distill import distill

    run = tmp_path / "ne"
    _run(pretrained, ft_suite, run, mode="new-expert", steps=1)
    env = make_control_task(TASKS[HELD_OUT])
    env.max_steps = 4
    episode = run_episode(env, PolicyActor(Policy.from_checkpoint(run)), 900_000_000)
    env.close()
    assert 1 <= len(episode) <= 4
    doc = evaluate(run, data_dir=ft_suite, out=tmp_path / "eval", tasks=[HELD_OUT],
                   cfg=EvalConfig(episodes=1, max_steps=3), progress=False)
    assert doc["tasks"][HELD_OUT]["held_out"] and doc["tasks"][HELD_OUT]["episodes"] == 1
    assert main(["bench-latency", "--checkpoint", str(run), "--steps", "2", "--warmup", "0",
                 "--threads", "1", "--json", str(tmp_path / "lat.json")]) == 0
    assert json.loads((tmp_path / "lat.json").read_text())["steps"] == 2
    config = write_config(tmp_path, ft_suite, steps=1, eval_every=100)
    last = distill(teacher=run, student=REPO / "configs/model/tiny-dense.yaml", config=config,
                   out=tmp_path / "student", init="copy+fit", load_sequences=4,
                   overrides=["model.num_layers=2"])
    assert last["step"] == 1 and last["objective/kl"] >= 0


# ------------------------------------------------------------------------- refusals
def test_bad_inputs_are_refused_with_their_message(pretrained, ft_suite, tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['babyai/NoSuchLevel'\]; known "
                                         r"tasks:\n  babyai/BabyAI-GoToRedBall-v0"):
        _run(pretrained, ft_suite, out, tasks=["babyai/NoSuchLevel"])
    with pytest.raises(ValueError, match=r"\['vl/digits'\] hold no demonstrations"):
        _run(pretrained, ft_suite, out, tasks=["vl/digits"])
    with pytest.raises(ValueError, match=r"task\(s\) \['classic/Acrobot-v1'\] are not in .*"
                                         r"manifest.json .* or pass --collect"):
        _run(pretrained, ft_suite, out, tasks=["classic/Acrobot-v1"])
    with pytest.raises(ValueError, match=rf"train_episodes.{HELD_OUT}: 9 episodes asked for, "
                                         r"the training split .* holds 5"):
        _run(pretrained, ft_suite, out, episodes=9)
    with pytest.raises(ValueError, match=r"mode must be one of \['full', 'experts', "
                                         r"'new-expert', 'scratch'\], got 'lora'"):
        _run(pretrained, ft_suite, out, mode="lora")
    with pytest.raises(ValueError, match=r"replay must lie in \[0, 1\), got 1.0"):
        _run(pretrained, ft_suite, out, replay=1.0)
    with pytest.raises(ValueError, match="expert_parallel_size > 1: new-expert runs in one "
                                         "process or under DeepSpeed"):
        _run(pretrained, ft_suite, out, mode="new-expert", overrides=["expert_parallel_size=2"])
    # a checkpoint of another vocabulary than the data's tokenizer
    other = load_train_config(write_config(tmp_path, ft_suite), ["model.text_vocab_size=32000"])
    write_checksums(save_checkpoint(build_model(other.model), tmp_path / "vocab32k"))
    with pytest.raises(ValueError, match=r"has the vocabulary text_vocab_size=32000, .* the "
                                         r"data's tokenizer has text_vocab_size=8192"):
        _run(tmp_path / "vocab32k", ft_suite, out)
    # a dense checkpoint cannot train experts
    dense = load_train_config(write_config(tmp_path, ft_suite, model={
        "preset": "configs/model/tiny-dense.yaml", "context_length": 256, "num_layers": 2}))
    write_checksums(save_checkpoint(build_model(dense.model), tmp_path / "dense"))
    for mode in ("experts", "new-expert"):
        with pytest.raises(ValueError, match=rf"mode {mode} trains experts, and the checkpoint "
                                             r"is dense \(ffn: dense\); use --mode full"):
            _run(tmp_path / "dense", ft_suite, out, mode=mode,
                 config=write_config(tmp_path, ft_suite))
    with pytest.raises(ValueError, match="dense.*train_config.yaml does not exist: a checkpoint "
                                         "folder without its training config needs --config"):
        _run(tmp_path / "dense", ft_suite, out)
    assert not out.exists()  # nothing was written by a refused run
    # a resume with other settings
    _run(pretrained, ft_suite, out, mode="experts", steps=1)
    with pytest.raises(ValueError, match=r"was fine-tuned with other settings \{'mode': "
                                         r"\['experts', 'full'\]\}"):
        _run(pretrained, ft_suite, out, mode="full", steps=1)
    with pytest.raises(ValueError, match=r"other settings \{'episodes': \[2, 3\]\}"):
        _run(pretrained, ft_suite, out, mode="experts", episodes=3, steps=1)
    with pytest.raises(ValueError, match=r"was trained with another config \(batch_size: 4 -> 8"):
        _run(pretrained, ft_suite, out, mode="experts", steps=1, overrides=["batch_size=8"])
    # the command line: exit 2 and the message
    args, env = cli("finetune", "--checkpoint", str(pretrained), "--data", str(ft_suite),
                    "--out", str(tmp_path / "cli"), "--tasks", "classic/NoSuchTask")
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "unknown task(s) ['classic/NoSuchTask']" in done.stderr


# ------------------------------------------------------------- two processes on gloo
@pytest.mark.slow
def test_deepspeed_zero1_on_two_processes_matches_one(pretrained, ft_suite, tmp_path):
    """new-expert under DeepSpeed ZeRO-1 on two CPU processes: the losses of one process,
    and every pre-existing weight bit-equal in its checkpoint."""
    common = ["finetune", "--checkpoint", str(pretrained), "--data", str(ft_suite), "--tasks",
              HELD_OUT, "--episodes", "2", "--mode", "new-expert", "--steps", "3"]
    args, env = cli(*common, "--out", str(tmp_path / "one"))
    subprocess.run(args, env=env, check=True, capture_output=True, timeout=600)
    torchrun("-m", "moe_gato.cli", *common, "--out", str(tmp_path / "two"),
             "deepspeed.enabled=true", "deepspeed.zero_stage=1")
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-5, x["step"]
    assert (tmp_path / "two" / "checkpoints" / "step_00000003" / "deepspeed").is_dir()
    before = load_checkpoint(model_folder(pretrained)).state_dict()
    after = load_checkpoint(model_folder(tmp_path / "two")).state_dict()
    assert all(torch.equal(t, after[k]) for k, t in before.items())


# --------------------------------------------------------------------------- prompting
def test_eval_prompts_with_several_demonstrations(pretrained, ft_suite, tmp_path):
    """K demonstrations share the prompt's part of the context, each its newest whole
    timesteps, numbered on so that they never merge; ``eval --prompt-demos`` rolls out
    with them; a count the context cannot hold is refused with how many fit."""
    from moe_gato.cli import build_parser
    from moe_gato.data.storage import TaskData, task_dir
    from moe_gato.envs import TASKS, make_control_task
    from moe_gato.eval.evaluate import EvalConfig, evaluate
    from moe_gato.inference import Policy
    from moe_gato.inference.policy import PromptTooLong

    task = "classic/Pendulum-v1"  # 5 tokens per timestep: 3 observations, '|', 1 action
    data = TaskData(task_dir(ft_suite, task))
    demos = [data.episode(0), data.episode(1)]
    policy = Policy.from_checkpoint(pretrained, prompt_share=0.25)  # 64 positions, 32 each
    env = make_control_task(TASKS[task])
    policy.reset(env.info, prompt=demos)
    prompt = policy.prompt
    assert len(prompt) == 2 * 30  # six whole timesteps of each
    steps = prompt.timestep.tolist()
    assert steps == sorted(steps) and len(set(steps)) == 12
    one = demos[1].observations
    assert prompt.tokens[30:].tolist() == policy.tok.tokenize_episode(
        one, demos[1].actions, action_kind="continuous",
        spec={k: v.modality for k, v in data.obs_spec.items()}).tokens[-30:].tolist()
    assert policy.cache.live() == 60
    with pytest.raises(PromptTooLong, match=r"13 demonstrations do not fit the prompt: each "
                                            r"gets 4 positions .* at most 12 fit"):
        policy.reset(env.info, prompt=demos * 6 + demos[:1])
    env.close()

    cfg = EvalConfig(episodes=1, max_steps=3, prompt=True, prompt_demos=2)
    doc = evaluate(pretrained, data_dir=ft_suite, out=tmp_path / "p2", tasks=[task], cfg=cfg,
                   progress=False)
    assert doc["tasks"][task]["prompt_demos"] == 2 and doc["tasks"][task]["prompt_tokens"] > 0
    with pytest.raises(ValueError, match="prompt_demos .* set prompt"):
        EvalConfig(prompt_demos=2)
    with pytest.raises(ValueError, match="5 prompt demonstrations asked for, the training "
                                         "split holds 3 episodes"):
        evaluate(pretrained, data_dir=ft_suite, out=tmp_path / "p5", tasks=[task],
                 cfg=EvalConfig(episodes=1, max_steps=3, prompt=True, prompt_demos=5),
                 progress=False)
    args = build_parser().parse_args(["eval", "--checkpoint", "c", "--out", "o", "--prompt",
                                      "--prompt-demos", "4"])
    assert args.prompt and args.prompt_demos == 4


# ------------------------------------------------------------------------------ study
@pytest.mark.slow
def test_finetune_study_runs_end_to_end_on_a_micro_configuration(pretrained, ft_suite, tmp_path):
    """Every mode at 1 and 2 demonstrations, 1 step, 1 rollout, forgetting on one training
    task: results.json, the report and its figure; a rerun redoes nothing."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from finetune_study import study

    doc = tmp_path / "docs" / "finetune.md"
    kw = dict(checkpoint=pretrained, data=ft_suite, tasks=[HELD_OUT], out=tmp_path / "study",
              doc=doc, demos=[1, 2], steps=1, rollouts=1, forget_tasks=["classic/Pendulum-v1"],
              forget_episodes=1, prompt_demos=[1, 2], max_steps=3)
    results = study(**kw)
    runs = results["runs"]
    assert sorted((r["mode"], r["demos"]) for r in runs) == sorted(
        (m, n) for m in ("full", "experts", "new-expert", "scratch") for n in (1, 2))
    trained = {r["mode"]: r["trained_params"] for r in runs}
    assert trained["new-expert"] < trained["experts"] < trained["full"] == trained["scratch"]
    assert all((r["forget_score"] is None) == (r["mode"] == "scratch") for r in runs)
    assert all(list(r["forget_by_task"]) == ["classic/Pendulum-v1"] for r in runs
               if r["mode"] != "scratch")
    assert list(results["pretrained"]["forget_by_task"]) == ["classic/Pendulum-v1"]
    assert all(r["step_ms"] > 0 for r in runs)
    # GoToObj's 171-token timestep leaves no room for a prompt in a context of 256
    assert results["pretrained"]["tasks"][HELD_OUT]["prompted"] == {"1": None, "2": None}
    text = doc.read_text()
    for part in ("![normalized score against demonstrations](finetune.png)",
                 "## Held-out scores", "## Forgetting", "## Targets",
                 "| new-expert | 525,320 |", "| babyai/BabyAI-GoToObj-v0 | scratch | 2 |",
                 "Change of each training task's score after 2 demonstrations",
                 "| task | mode | Pendulum ("):
        assert part in text, part
    assert doc.with_suffix(".png").stat().st_size > 10_000
    assert json.loads((tmp_path / "study" / "results.json").read_text()) == results
    stamp = {p: p.stat().st_mtime for p in (tmp_path / "study").rglob("*.safetensors")}
    assert study(**kw) == results
    assert all(p.stat().st_mtime == t for p, t in stamp.items())


def test_study_targets_count_a_quarter_of_the_scratch_models_demonstrations():
    """Fine-tuning meets the first target on a task when it reaches scratch's best score
    with at most a quarter of scratch's demonstrations; a scratch model best at the grid's
    first count cannot be matched by construction, and the report says so."""
    from moe_gato.report.finetune import targets

    def run(task, mode, n, score, forget=None):
        return {"task": task, "mode": mode, "demos": n, "score": score, "forget_score": forget}

    results = {"modes": ["new-expert", "scratch"], "demos": [1, 4, 16, 64],
               "pretrained": {"forget_score": 0.5, "tasks": {"a": {}, "b": {}}},
               "runs": [run("a", "scratch", 16, 0.1), run("a", "scratch", 64, 0.6),
                        run("a", "new-expert", 16, 0.7, 0.48),
                        run("b", "scratch", 1, 0.2), run("b", "scratch", 64, 0.2),
                        run("b", "new-expert", 1, 0.3, 0.40)]}
    lines = targets(results)
    assert lines[0].endswith("reached it with 16 — met (at most a quarter).")
    assert "took 1 demonstrations; the grid holds no count a quarter of it" in lines[1]
    assert lines[1].endswith("not met (at most a quarter).")
    assert lines[2] == "- Tasks meeting it: 1 of 2 (target: 2 of 3)."
    assert lines[3].startswith("- new-expert: worst training-suite loss +0.100")
    assert "not met" in lines[3]
