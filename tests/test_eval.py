"""The agent acts: Policy (KV cache, eviction, batches, prompts, bad input) and evaluation
(rollouts in the real environments of every domain, score bookkeeping, eval.json)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import yaml

from moe_gato.envs import (TASKS, ExpertActor, RandomActor, make_control_task, run_episode,
                           run_episodes)
from moe_gato.eval.scores import mean_ci95, normalized_score, summarize, task_result
from moe_gato.inference import Policy, PolicyActor

#: one control task per domain (GoToObj and drawer-close are the held-out ones), a caption
#: task and text
EVAL_TASKS = ["classic/CartPole-v1", "babyai/BabyAI-GoToRedBall-v0", "babyai/BabyAI-GoToObj-v0",
              "metaworld/reach-v3", "atari/Breakout", "vl/digits", "text/shakespeare"]
TRAIN_TASKS = [t for t in EVAL_TASKS if t != "babyai/BabyAI-GoToObj-v0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real small suite and a tiny MoE trained on it for a few steps (seconds)."""
    from moe_gato.data.collect import collect
    from moe_gato.train import load_train_config, train

    root = tmp_path_factory.mktemp("eval")
    collect("default", root / "suite", tasks=EVAL_TASKS, episodes=3, return_episodes=2,
            workers=1, progress=False)
    cfg = {"model": {"preset": "configs/model/tiny-moe.yaml", "context_length": 256,
                     "num_layers": 2},
           "data": {"data_dir": str(root / "suite"),
                    "tasks": {t: 1.0 for t in TRAIN_TASKS}},
           "batch_size": 4, "micro_batch_size": 4, "steps": 6, "seed": 3,
           "optim": {"lr": 3e-3, "warmup_steps": 2}, "log_every": 1, "eval_every": 6,
           "eval_sequences": 2, "checkpoint_every": 6, "peak_flops": 1e11}
    (root / "train.yaml").write_text(yaml.safe_dump(cfg))
    train(load_train_config(root / "train.yaml"), root / "run")
    return root


def _env(name: str, max_steps: int | None = None):
    env = make_control_task(TASKS[name])
    if max_steps is not None:
        env.max_steps = max_steps
    return env


# ------------------------------------------------------------------------- scores
def test_scores_by_hand():
    assert normalized_score(300.0, expert=500.0, random=20.0) == pytest.approx(280 / 480)
    assert normalized_score(20.0, expert=500.0, random=20.0) == 0.0
    with pytest.raises(ValueError, match="not above the random"):
        normalized_score(1.0, expert=5.0, random=5.0)
    mean, half = mean_ci95([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)
    assert mean_ci95([7.0]) == (7.0, 0.0)
    r = task_result([10.0, 30.0], [True, False], expert=50.0, random=10.0, held_out=False,
                    domain="classic", lengths=[3, 5])
    assert r["normalized_score"] == pytest.approx(0.25) and r["success_rate"] == 0.5
    assert r["normalized_ci95"] == pytest.approx(12.706205 * 10.0 / 40.0, rel=1e-5)
    tasks = {"a/x": {"domain": "a", "held_out": False, "normalized_score": 0.9},
             "a/y": {"domain": "a", "held_out": False, "normalized_score": 0.6},
             "b/z": {"domain": "b", "held_out": False, "normalized_score": 0.1},
             "b/h": {"domain": "b", "held_out": True, "normalized_score": 0.55}}
    s = summarize(tasks)
    assert s["train"]["tasks_at_50pct"] == 2 and s["train"]["tasks_at_80pct"] == 1
    assert s["train"]["domain_mean_normalized_score"] == {"a": pytest.approx(0.75), "b": 0.1}
    assert s["held_out"]["tasks"] == 1 and s["held_out"]["tasks_at_50pct"] == 1


# ------------------------------------------------------------------ episode loop
def test_one_loop_for_expert_random_and_policy(trained):
    env = _env("classic/CartPole-v1")
    expert = run_episode(env, ExpertActor(), 7, record=False)
    rand = run_episode(env, RandomActor(), 7, record=False)
    assert expert.episode_return == 500.0 and rand.episode_return < 100
    policy = Policy.from_checkpoint(trained / "run")
    ep = run_episode(env, PolicyActor(policy), 7)  # records the fields it acted on
    assert len(ep) == len(ep.observations["state"]) == ep.episode_return
    assert set(np.unique(ep.actions)) <= {0, 1}


# ------------------------------------------------------------------------ policy
@pytest.mark.parametrize("name,steps", [("classic/CartPole-v1", 40), ("metaworld/reach-v3", 12),
                                        ("babyai/BabyAI-GoToLocal-v0", 5)])
@pytest.mark.parametrize("past_actions,positions", [("attend", "none"), ("hide", "none"),
                                                     ("hide", "rope"), ("attend", "timestep_bias")])
def test_cached_policy_equals_recompute_before_eviction(trained, name, steps, past_actions,
                                                        positions):
    from moe_gato.model import build_model, load_checkpoint

    trained_model = load_checkpoint(Policy.from_checkpoint(trained / "run").checkpoint)
    cfg = dataclasses.replace(trained_model.cfg, past_actions=past_actions, positions=positions)
    model = build_model(cfg)
    model.load_state_dict(trained_model.state_dict())  # same weights, other attention
    actions = {}
    for use_cache in (True, False):
        # a context that holds every step: no eviction yet
        policy = Policy(model, use_cache=use_cache, context_length=1024)
        ep = run_episode(_env(name, steps), PolicyActor(policy), seed=11, record=False)
        actions[use_cache] = ep.actions
        if use_cache:
            assert 0 < policy.cache.live() <= 1024
            assert bool(policy.cache.valid_BC[:, :policy.cache.length].all())  # nothing evicted
    np.testing.assert_array_equal(actions[True], actions[False])


def test_cache_rolls_whole_timesteps(trained):
    policy = Policy.from_checkpoint(trained / "run", context_length=40)  # 6 tokens a step
    env = _env("classic/CartPole-v1", 30)
    policy.reset(env)
    raw = env.reset(0)
    for t in range(30):
        policy.act(env.observe(raw))
        raw = env.step(env.expert_action(raw))[0]  # keep the pole up: 30 steps
        cache = policy.cache
        live_C = cache.valid_BC[0, :cache.length]
        tags = cache.slot_tag_C[:cache.length][live_C].tolist()
        assert len(tags) <= 40
        kept = sorted(set(tags))
        assert kept == list(range(kept[0], t + 1))  # a contiguous run of the newest steps
        # every kept step is whole: 4 values + '|' + its action (the last one still pending)
        assert all(tags.count(s) == 6 for s in kept[:-1]) and tags.count(t) == 5
    assert kept[0] > 0  # old steps were evicted


def test_batched_rollouts_equal_single_ones(trained):
    """Ragged ends (CartPole episodes end at different steps) and rows of different lengths
    (BabyAI OpenDoor missions differ) give the same greedy actions as one env at a time."""
    policy = Policy.from_checkpoint(trained / "run")
    for name, steps in (("classic/CartPole-v1", 60), ("babyai/BabyAI-OpenDoor-v0", 4)):
        seeds = [3, 4, 5, 6]
        batched = run_episodes([_env(name, steps) for _ in seeds], PolicyActor(policy), seeds)
        mission_tokens = set()
        for seed, ep in zip(seeds, batched, strict=True):
            single = run_episode(_env(name, steps), PolicyActor(policy), seed, record=True)
            np.testing.assert_array_equal(ep.actions, single.actions)
            if "mission" in single.observations:
                mission_tokens.add(len(policy.tok.text.encode(single.observations["mission"][0])))
        if name.startswith("classic"):
            assert len({len(e) for e in batched}) > 1  # the ends really are ragged
        else:
            assert len(mission_tokens) > 1  # rows of different lengths were padded


def test_prompt_and_sampling(trained):
    from moe_gato.data.storage import TaskData

    data = TaskData(trained / "suite" / "classic/CartPole-v1")
    demo = data.episode(0)
    policy = Policy.from_checkpoint(trained / "run", prompt_share=0.25, temperature=1.0, seed=5)
    env = _env("classic/CartPole-v1", 20)
    policy.reset(env, prompt=demo)
    assert len(policy.prompt) <= 0.25 * 256 and len(policy.prompt) % 6 == 0  # whole steps
    assert policy.cache.live() == len(policy.prompt)
    first = [run_episode(env, PolicyActor(policy, prompt=demo), 1, record=False).actions
             for _ in range(2)]
    np.testing.assert_array_equal(first[0], first[1])  # sampling is seeded per episode


def test_bad_observations_name_the_key(trained):
    policy = Policy.from_checkpoint(trained / "run")
    env = _env("babyai/BabyAI-GoToLocal-v0")
    policy.reset(env)
    good = env.observe(env.reset(0))
    bad_cases = [
        ({k: v for k, v in good.items() if k != "grid"}, "missing \\['grid'\\]"),
        (dict(good, extra=1), "unknown \\['extra'\\]"),
        (dict(good, grid=good["grid"][:6]), "'grid' must have shape \\(7, 7, 3\\)"),
        (dict(good, direction=np.int64(1024)), "'direction' is discrete and must lie in"),
        (dict(good, mission=3), "'mission' must be a str"),
    ]
    for obs, match in bad_cases:
        with pytest.raises(ValueError, match=match):
            policy.act(obs)
    cart = _env("classic/CartPole-v1")
    policy.reset(cart)
    with pytest.raises(ValueError, match="'state' holds a non-finite value"):
        policy.act({"state": np.array([0.0, np.nan, 0.0, 0.0], np.float32)})
    with pytest.raises(ValueError, match="call reset"):
        Policy.from_checkpoint(trained / "run").act(good)


def test_checkpoint_errors(trained, tmp_path):
    from moe_gato.model import load_config, save_checkpoint, build_model

    with pytest.raises(ValueError, match="neither a checkpoint folder"):
        Policy.from_checkpoint(tmp_path)
    model = build_model(load_config("configs/model/tiny-moe.yaml", ["num_layers=1"]))
    save_checkpoint(model, tmp_path / "ck")
    cfg = yaml.safe_load((tmp_path / "ck/config.yaml").read_text())
    cfg["d_model"] = 64
    cfg["num_heads"] = 4
    (tmp_path / "ck/config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="has shape \\(.*\\) torch.float32, the config wants"):
        Policy.from_checkpoint(tmp_path / "ck")
    # a training checkpoint whose files no longer match their checksums
    step = next((trained / "run" / "checkpoints").iterdir())
    import shutil
    shutil.copytree(step, tmp_path / "step")
    with open(tmp_path / "step" / "model.safetensors", "r+b") as f:
        f.seek(-16, 2)
        f.write(b"\x00" * 16)
    with pytest.raises(ValueError, match="does not match its checksum"):
        Policy.from_checkpoint(tmp_path / "step")
    # a model whose vocabulary does not fit the shipped 8192-piece text model
    with pytest.raises(ValueError, match="8192"):
        Policy(build_model(load_config("configs/model/tiny-moe.yaml",
                                       ["num_layers=1", "text_vocab_size=32000"])))


# --------------------------------------------------------------------- evaluation
def test_evaluate_every_domain_and_bookkeeping(trained, tmp_path):
    from moe_gato.data.storage import read_manifest
    from moe_gato.eval.evaluate import EvalConfig, evaluate

    cfg = EvalConfig(episodes=3, batch_size=2, max_steps=25, caption_rows=4, text_documents=2)
    doc = evaluate(trained / "run", data_dir=trained / "suite", out=tmp_path / "eval",
                   tasks=",".join(EVAL_TASKS), cfg=cfg, progress=False)
    on_disk = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert on_disk == json.loads(json.dumps(doc))
    assert (tmp_path / "eval" / "eval.md").read_text().count("\n|") >= 5
    assert (tmp_path / "eval" / "eval.png").stat().st_size > 1000
    control = [t for t in EVAL_TASKS if TASKS[t].kind == "control"]
    assert sorted(doc["tasks"]) == sorted(control)
    manifest = read_manifest(trained / "suite")["tasks"]
    policy = Policy.from_checkpoint(trained / "run")
    for name, r in doc["tasks"].items():
        for key in ("normalized_score", "return_mean", "return_ci95", "success_rate",
                    "episodes", "held_out"):
            assert key in r
        assert r["episodes"] == 3 and r["held_out"] == TASKS[name].held_out
        # the returns are those of the same seeds rolled out again, one at a time
        again = [run_episode(_env(name, 25), PolicyActor(policy), 900_000_000 + i,
                             record=False).episode_return for i in range(3)]
        assert r["returns"] == pytest.approx(again)
        expert, random = manifest[name]["expert_return"], manifest[name]["random_return"]
        mean = sum(again) / 3
        assert r["return_mean"] == pytest.approx(mean)
        assert r["normalized_score"] == pytest.approx((mean - random) / (expert - random))
        assert (r["success_rate"] is None) == (TASKS[name].domain in ("classic", "atari"))
    s = doc["summary"]
    assert s["held_out"]["tasks"] == 1 and s["train"]["tasks"] == len(control) - 1
    assert set(s["train"]["domain_mean_normalized_score"]) == {"classic", "babyai", "metaworld",
                                                               "atari"}
    assert 0 <= doc["other"]["vl/digits"]["caption_token_accuracy"] <= 1
    assert doc["other"]["vl/digits"]["examples"] >= 1
    assert doc["other"]["text/shakespeare"]["text_perplexity"] > 1
    # rerunning keeps the finished tasks (their files are not rewritten)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "eval" / "tasks").iterdir()}
    evaluate(trained / "run", data_dir=trained / "suite", out=tmp_path / "eval",
             tasks=",".join(EVAL_TASKS), cfg=cfg, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "eval" / "tasks").iterdir()}
    assert after == before


def test_eval_cli_errors(trained, tmp_path, capsys):
    from moe_gato.cli import main

    assert main(["eval", "--checkpoint", str(trained / "run"), "--data", str(trained / "suite"),
                 "--tasks", "classic/Nope-v0", "--out", str(tmp_path)]) == 2
    assert "known tasks" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(trained / "run"), "--data", str(trained / "suite"),
                 "--tasks", "classic/Acrobot-v1", "--out", str(tmp_path)]) == 2
    assert "not in" in capsys.readouterr().err  # not collected: no expert/random returns
    assert main(["eval", "--checkpoint", str(trained / "run"), "--data", str(trained / "suite"),
                 "--tasks", "classic/CartPole-v1", "--seed", "5", "--out", str(tmp_path)]) == 2
    assert "overlap the collection's seeds" in capsys.readouterr().err


def test_training_logs_action_accuracy(trained):
    from moe_gato.tokenizer import Kind, VocabLayout
    from moe_gato.train.metrics import action_hits

    records = [json.loads(ln) for ln in (trained / "run" / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    for task in ("classic/CartPole-v1", "metaworld/reach-v3", "babyai/BabyAI-GoToRedBall-v0"):
        assert 0.0 <= last[f"eval/action_acc/{task}"] <= 1.0
    assert not any(k.startswith("eval/action_acc/vl/") for k in last)
    # by hand: two action targets, the first predicted right within its range
    layout = VocabLayout()
    lo, _ = layout.id_range(Kind.DISCRETE_ACTION)
    batch = {"tokens": torch.tensor([[5, lo + 2, lo + 1]]),
             "kinds": torch.tensor([[Kind.SEPARATOR, Kind.DISCRETE_ACTION, Kind.DISCRETE_ACTION]]),
             "loss_mask": torch.tensor([[False, True, True]])}
    logits = torch.zeros(1, 3, layout.vocab_size)
    logits[0, 0, lo + 2] = 1.0          # predicts the first target right
    logits[0, 1, lo + 3] = 1.0          # predicts lo + 3, the target is lo + 1
    logits[0, 1, layout.pad_id] = 9.0   # outside the action range: ignored
    assert action_hits(logits, batch, layout) == (1, 2)
    # a task with 2 actions: an id past them is never decoded, so never counted (the
    # argmax over all 1024 discrete ids scored CartPole and GoToRedBall at 0.0)
    logits[0, 0, lo + 7] = 5.0
    assert action_hits(logits, batch, layout) == (0, 2)
    assert action_hits(logits, batch, layout, num_choices=4) == (1, 2)


def test_static_step_acts_as_the_dynamic_cache_in_real_envs(trained):
    """The step CUDA graphs replay (``Policy(graphs=True)``; eager on the CPU) takes the
    trained agent's actions in the real environments, batched with ragged ends and padded
    rows."""
    actions = {}
    for graphs in (False, True):
        policy = Policy.from_checkpoint(trained / "run", graphs=graphs)
        for name, steps in (("classic/CartPole-v1", 80), ("babyai/BabyAI-OpenDoor-v0", 4)):
            seeds = [3, 4, 5]
            episodes = run_episodes([_env(name, steps) for _ in seeds], PolicyActor(policy),
                                    seeds)
            actions[graphs, name] = [ep.actions for ep in episodes]
    for name in ("classic/CartPole-v1", "babyai/BabyAI-OpenDoor-v0"):
        for a, b in zip(actions[False, name], actions[True, name], strict=True):
            np.testing.assert_array_equal(a, b)


def test_eval_cli_graphs(trained, tmp_path):
    """``moe-gato eval --graphs`` rolls out the same episodes as the eager policy."""
    from moe_gato.cli import main

    returns = {}
    for flag in ([], ["--graphs"]):
        out = tmp_path / ("graphs" if flag else "eager")
        assert main(["eval", "--checkpoint", str(trained / "run"), "--data",
                     str(trained / "suite"), "--tasks", "classic/CartPole-v1", "--episodes", "2",
                     "--max-steps", "30", "--no-progress", "--out", str(out), *flag]) == 0
        returns[bool(flag)] = json.loads((out / "eval.json").read_text())[
            "tasks"]["classic/CartPole-v1"]["returns"]
    assert returns[True] == returns[False]
