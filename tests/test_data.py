"""Data: collectors run for real (a few episodes per domain), storage round trip, resume
and bad-input errors, and the packed-sequence loader."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MUJOCO_GL", "egl")

from moe_gato.data import DataError, MixtureConfig, SequenceLoader, TaskData, read_manifest  # noqa: E402
from moe_gato.data.collect import collect  # noqa: E402
from moe_gato.envs import ExpertActor, RandomActor, resolve_tasks, run_episode  # noqa: E402
from moe_gato.envs.classic import ClassicTask  # noqa: E402
from moe_gato.data.loader import split_rows  # noqa: E402

SUITE_TASKS = ["classic/CartPole-v1", "classic/Pendulum-v1", "babyai/BabyAI-GoToLocal-v0",
               "babyai/BabyAI-GoToObj-v0", "metaworld/reach-v3", "atari/Breakout", "vl/digits",
               "vl/babyai", "text/shakespeare"]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    manifest = collect("default", out, tasks=SUITE_TASKS, episodes=3, return_episodes=3,
                       workers=2, progress=False)
    return out, manifest


def test_unknown_task_lists_known():
    with pytest.raises(ValueError, match="known tasks:(.|\n)*classic/CartPole-v1"):
        resolve_tasks("default", ["classic/NoSuchEnv-v0"])
    with pytest.raises(ValueError, match="known suites"):
        resolve_tasks("nope")


@pytest.mark.parametrize("env_id,expert_min,random_max", [
    ("CartPole-v1", 475, 100), ("Acrobot-v1", -150, -300), ("MountainCar-v0", -150, -190),
    ("Pendulum-v1", -400, -800), ("MountainCarContinuous-v0", 80, 0),
    ("LunarLander-v3", 200, -100)])
def test_classic_experts_near_maximal(env_id, expert_min, random_max):
    task = ClassicTask(env_id)
    expert = np.mean([run_episode(task, ExpertActor(), s, record=False).episode_return for s in range(5)])
    rand = np.mean([run_episode(task, RandomActor(), 100 + s, record=False).episode_return for s in range(5)])
    assert expert >= expert_min
    assert rand <= random_max


def test_held_out_tasks_one_per_control_domain():
    """BabyAI, Meta-World and classic control each hold one task out of training (the
    fine-tuning study's three); LunarLander's 8-d state and 4 actions are new to the agent."""
    from moe_gato.envs import TASKS

    held = sorted(n for n, s in TASKS.items() if s.held_out)
    assert held == ["babyai/BabyAI-GoToObj-v0", "classic/LunarLander-v3",
                    "metaworld/drawer-close-v3"]
    task = ClassicTask("LunarLander-v3")
    assert (task.action_kind, task.action_dim, task.obs_spec["state"].shape) == ("discrete", 4, (8,))


def test_manifest(suite):
    out, manifest = suite
    assert set(manifest["tasks"]) == set(SUITE_TASKS)
    assert read_manifest(out)["tasks"] == manifest["tasks"]
    for name, e in manifest["tasks"].items():
        assert {"domain", "episodes", "tokens", "expert_return", "random_return", "held_out"} <= set(e)
        assert e["domain"] == name.split("/")[0]
        assert e["tokens"] > 0 and e["episodes"] >= 1
    t = manifest["tasks"]
    assert t["babyai/BabyAI-GoToObj-v0"]["held_out"] and not t["babyai/BabyAI-GoToLocal-v0"]["held_out"]
    for name in ("classic/CartPole-v1", "classic/Pendulum-v1", "metaworld/reach-v3",
                 "atari/Breakout", "babyai/BabyAI-GoToLocal-v0"):
        assert t[name]["expert_return"] > t[name]["random_return"], name
    assert t["classic/CartPole-v1"]["expert_return"] == 500.0
    assert t["metaworld/reach-v3"]["expert_success_rate"] == 1.0
    assert t["vl/digits"]["expert_return"] is None


def test_episode_shapes_and_ranges(suite):
    out, _ = suite
    bab = TaskData(out / "babyai/BabyAI-GoToLocal-v0")
    ep = bab.episode(0)
    T = len(ep)
    assert ep.observations["grid"].shape == (T, 7, 7, 3) and ep.observations["grid"].dtype == np.uint8
    assert ep.observations["grid"].max() <= 10
    assert set(np.unique(ep.observations["direction"])) <= {0, 1, 2, 3}
    assert ep.observations["rgb"].shape == (T, 56, 56, 3)
    assert len(ep.observations["mission"]) == T and ep.observations["mission"][0].startswith("go to")
    assert ep.actions.dtype == np.int64 and ep.actions.max() < 7 and ep.success

    mw = TaskData(out / "metaworld/reach-v3")
    ep = mw.episode(1)
    assert ep.observations["state"].shape == (len(ep), 39) and ep.actions.shape == (len(ep), 4)
    assert np.abs(ep.actions).max() <= 1.0 and len(ep) == mw.meta["max_steps"]

    pend = TaskData(out / "classic/Pendulum-v1")
    ep = pend.episode(0)
    assert ep.actions.shape == (200, 1) and np.abs(ep.actions).max() <= 1.0
    assert pend.meta["action_low"] == [-2.0] and pend.meta["action_high"] == [2.0]

    brk = TaskData(out / "atari/Breakout")
    ep = brk.episode(0)
    assert ep.observations["frame"].shape == (len(ep), 64, 64)
    assert ep.actions.max() < brk.meta["action_dim"] and ep.observations["frame"].max() > 0

    img, cap = TaskData(out / "vl/digits").caption(0)
    assert img.shape == (16, 16) and img.dtype == np.uint8 and "zero" in cap
    img, cap = TaskData(out / "vl/babyai").caption(0)
    assert img.shape == (64, 64, 3) and len(cap) > 5
    assert "ALL'S WELL" in TaskData(out / "text/shakespeare").text(0)


def test_round_trip_returns(suite):
    out, _ = suite
    data = TaskData(out / "classic/CartPole-v1")
    for i in range(len(data)):
        row = data.ds[i]
        ep = data.episode(i)
        assert row["return"] == pytest.approx(ep.episode_return)
        assert row["length"] == len(ep) == len(ep.observations["state"])
        assert row["task"] == "classic/CartPole-v1"
    # the same seeds give the same episodes
    task = ClassicTask("CartPole-v1")
    again = run_episode(task, ExpertActor(), data.ds[0]["seed"])
    np.testing.assert_array_equal(again.actions, data.episode(0).actions)
    np.testing.assert_array_equal(again.observations["state"], data.episode(0).observations["state"])


def test_resume_and_bad_folders(suite, tmp_path):
    out, _ = suite
    work = tmp_path / "s"
    shutil.copytree(out, work)
    before = (work / "classic/CartPole-v1/task.json").stat().st_mtime_ns
    # an interrupted write leaves a .partial folder: removed, finished tasks kept
    (work / "classic/CartPole-v1.partial").mkdir(parents=True)
    m = collect("default", work, tasks=["classic/CartPole-v1"], episodes=3, return_episodes=3,
                progress=False)
    assert (work / "classic/CartPole-v1/task.json").stat().st_mtime_ns == before
    assert not (work / "classic/CartPole-v1.partial").exists()
    assert set(m["tasks"]) == set(SUITE_TASKS)
    # other options: refused without overwrite
    with pytest.raises(DataError, match="--overwrite"):
        collect("default", work, tasks=["classic/CartPole-v1"], episodes=4, return_episodes=3,
                progress=False)
    # truncated (task.json declares more rows) and other version
    meta_path = work / "classic/Pendulum-v1/task.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(dict(meta, rows=99)))
    with pytest.raises(DataError, match="truncated"):
        TaskData(work / "classic/Pendulum-v1")
    meta_path.write_text(json.dumps(dict(meta, format_version=0)))
    with pytest.raises(DataError, match="version"):
        collect("default", work, tasks=["classic/Pendulum-v1"], episodes=3, return_episodes=3,
                progress=False)
    assert json.loads(meta_path.read_text())["format_version"] == 0  # nothing overwritten
    with pytest.raises(DataError, match="missing"):
        TaskData(work / "classic/nothing")
    m = collect("default", work, tasks=["classic/Pendulum-v1"], episodes=2, return_episodes=3,
                overwrite=True, workers=1, progress=False)
    assert m["tasks"]["classic/Pendulum-v1"]["episodes"] == 2
    assert len(TaskData(work / "classic/Pendulum-v1")) == 2


def _mixture(out, **kw):
    tasks = kw.pop("tasks", None) or {
        "babyai/BabyAI-GoToLocal-v0": 2.0, "metaworld/reach-v3": 2.0, "classic/Pendulum-v1": 1.0,
        "atari/Breakout": 1.0, "vl/digits": 1.0, "vl/babyai": 1.0, "text/shakespeare": 1.0}
    return MixtureConfig(data_dir=str(out), context_len=kw.pop("context_len", 256), tasks=tasks, **kw)


def test_episodes_per_task_come_from_a_collection_config(tmp_path):
    from moe_gato.data.collect import load_collect_config
    from moe_gato.envs import TASKS

    shipped = load_collect_config("configs/collect/default.yaml")
    assert shipped["suite"] == "default" and shipped["seed"] == 0
    assert set(shipped["episodes"]) <= set(TASKS)
    assert shipped["episodes"]["babyai/BabyAI-GoToRedBall-v0"] > TASKS[
        "babyai/BabyAI-GoToRedBall-v0"].episodes
    path = tmp_path / "collect.yaml"
    path.write_text("episodes:\n  classic/CartPole-v1: 2\n  classic/MountainCar-v0: 3\n")
    opts = load_collect_config(path)
    assert opts["return_episodes"] == 20 and opts.pop("tasks") is None
    opts["return_episodes"] = 2
    m = collect(opts.pop("suite"), tmp_path / "data", tasks=["classic/CartPole-v1",
                                                              "classic/MountainCar-v0"],
                **opts, workers=1, progress=False)
    assert m["tasks"]["classic/CartPole-v1"]["episodes"] == 2
    assert m["tasks"]["classic/MountainCar-v0"]["episodes"] == 3
    for text, match in [("episodes:\n  classic/CartPol-v1: 2\n", "unknown task.*CartPol-v1"),
                        ("episodes:\n  classic/CartPole-v1: 0\n", "CartPole-v1 must be an integer >= 1"),
                        ("episodes: 5\n", "episodes must map task names"),
                        ("rows: 5\n", r"unknown key\(s\) \['rows'\]"),
                        ("tasks: classic/CartPole-v1\n", "tasks must be a non-empty list"),
                        ("tasks: []\n", "tasks must be a non-empty list"),
                        ("tasks: [classic/CartPol-v1]\n", "unknown task")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=match):
            load_collect_config(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_collect_config(tmp_path / "missing.yaml")


def test_loader_sequences(suite):
    from moe_gato.tokenizer import LOSS_KINDS, Kind

    out, _ = suite
    loader = SequenceLoader(_mixture(out), seed=3)
    seen = set()
    for _ in range(60):
        seq = next(loader)
        assert len(seq) == 256
        kinds = seq.kinds
        seen |= set(np.unique(kinds).tolist())
        assert np.array_equal(seq.loss_mask, np.isin(kinds, LOSS_KINDS))
        assert seq.patches.shape[0] == int((kinds == Kind.IMAGE).sum())
        assert (seq.tokens[kinds == Kind.PAD] == loader.tok.layout.pad_id).all()
    assert {Kind.TEXT, Kind.IMAGE, Kind.DISCRETE_OBS, Kind.CONTINUOUS_OBS, Kind.DISCRETE_ACTION,
            Kind.CONTINUOUS_ACTION, Kind.SEPARATOR} <= seen
    batch = loader.next_batch(4)
    assert tuple(batch["tokens"].shape) == (4, 256)


def test_loader_deterministic_and_resumable(suite):
    out, _ = suite
    a = SequenceLoader(_mixture(out), seed=7)
    first = [next(a) for _ in range(12)]
    state = a.state_dict()
    rest = [next(a) for _ in range(6)]
    b = SequenceLoader(_mixture(out), seed=7)
    for x, y in zip(first, [next(b) for _ in range(12)]):
        np.testing.assert_array_equal(x.tokens, y.tokens)
        np.testing.assert_array_equal(x.patches, y.patches)
    c = SequenceLoader(_mixture(out), seed=7)
    c.load_state_dict(state)
    for x, y in zip(rest, [next(c) for _ in range(6)]):
        np.testing.assert_array_equal(x.tokens, y.tokens)
        np.testing.assert_array_equal(x.image_rc, y.image_rc)
    other = SequenceLoader(_mixture(out), seed=8)
    assert any(not np.array_equal(x.tokens, next(other).tokens) for x in first)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_loader_prompts_are_whole_and_half_show_the_end(suite):
    """Issue-10 audit: the prompt mode is drawn once (so half of the prompts end at the real
    episode end, long episodes cropped included), prompts and windows are whole stored
    timesteps, and a 171-token BabyAI timestep is never prompted at context 256."""
    from moe_gato.data.loader import slice_episode, tokenize_episode
    from moe_gato.tokenizer import Kind

    out, _ = suite
    tasks = {"classic/CartPole-v1": 1.0, "metaworld/reach-v3": 1.0,
             "babyai/BabyAI-GoToLocal-v0": 1.0}
    loader = SequenceLoader(_mixture(out, tasks=tasks, prompt_prob=0.5, validation_fraction=0.0),
                            seed=0)
    prompted, ends = 0, 0
    for i in range(900):
        info = {}
        seq = loader.sequence(i, info)
        assert seq.loss_mask.any()
        data = loader.data[info["task"]]
        if info["task"].startswith("babyai"):
            assert info["prompt_mode"] is None
            continue
        a, b = info["episode_steps"]
        ep = data.episode(info["row"])
        window = tokenize_episode(loader.tok, data, slice_episode(ep, a, b))
        n_prompt = 0
        if info["prompt_mode"] is not None:
            prompted += 1
            pa, pb = info["prompt_steps"]
            prompt_ep = data.episode(info["prompt_row"])
            ends += pb == len(prompt_ep)
            prompt = tokenize_episode(loader.tok, data, slice_episode(prompt_ep, pa, pb))
            n_prompt = len(prompt)
            assert n_prompt <= 128
            np.testing.assert_array_equal(seq.tokens[:n_prompt], prompt.tokens)
        np.testing.assert_array_equal(seq.tokens[n_prompt:n_prompt + len(window)], window.tokens)
        assert (seq.kinds[n_prompt + len(window):] == Kind.PAD).all()
    # ~300 prompted sequences: sd of the share ~0.03; a uniform window reaches the end of
    # an episode with probability < 1/100 here, and the old double draw gave ~0.25
    assert prompted > 200
    assert abs(ends / prompted - 0.5) < 0.1, (ends, prompted)


def test_loader_splits_and_errors(suite):
    out, _ = suite
    assert list(split_rows(10, 0.1, "train")) == list(range(9))
    assert list(split_rows(10, 0.1, "validation")) == [9]
    assert list(split_rows(1, 0.1, "train")) == [0]
    val = SequenceLoader(_mixture(out), split="validation")
    assert all(len(r) >= 1 for r in val.rows.values())
    for name, rows in val.rows.items():
        assert set(rows).isdisjoint(SequenceLoader(_mixture(out)).rows[name])
    with pytest.raises(ValueError, match="held out"):
        SequenceLoader(MixtureConfig(data_dir=str(out), tasks={"babyai/BabyAI-GoToObj-v0": 1.0}))
    with pytest.raises(DataError, match="not in"):
        SequenceLoader(MixtureConfig(data_dir=str(out), tasks={"atari/Pong": 1.0}))
    with pytest.raises(DataError, match="manifest.json is missing"):
        SequenceLoader(MixtureConfig(data_dir=str(out / "nowhere"), tasks={"atari/Pong": 1.0}))


def test_mission_targets_and_sequence_weights(suite):
    """``mission_targets``: BabyAI's mission (text observations) stays a target at every
    timestep (Gato), at the episode's first only, or nowhere; actions are untouched.
    ``loss_weighting: sequence``: every sequence's targets weigh one in all."""
    import dataclasses

    import torch

    from moe_gato.model.model import target_weights
    from moe_gato.tokenizer import Kind

    out, _ = suite
    cfg = _mixture(out, tasks={"babyai/BabyAI-GoToLocal-v0": 1.0}, context_len=600)
    loaders = {m: SequenceLoader(dataclasses.replace(cfg, mission_targets=m), seed=2)
               for m in ("all", "first", "none")}
    saw_later_timestep = False
    for i in range(8):
        seqs = {m: loader.sequence(i) for m, loader in loaders.items()}
        text = seqs["all"].kinds == Kind.TEXT
        action = seqs["all"].kinds == Kind.DISCRETE_ACTION
        assert seqs["all"].loss_mask[text].all() and text.any()
        assert not seqs["none"].loss_mask[text].any()
        first = seqs["first"]
        np.testing.assert_array_equal(first.loss_mask[text], first.timestep[text] == 0)
        saw_later_timestep |= bool((first.timestep[text] > 0).any())
        for seq in seqs.values():
            np.testing.assert_array_equal(seq.loss_mask[action], True)
    assert saw_later_timestep
    mixed = _mixture(out, loss_weighting="sequence")
    batch = SequenceLoader(mixed, seed=4).next_batch(6)
    weights_BL = target_weights(batch)
    torch.testing.assert_close(weights_BL.sum(1), torch.ones(6))
    assert (weights_BL[~batch["loss_mask"][:, 1:]] == 0).all()
    token = SequenceLoader(_mixture(out), seed=4).next_batch(6)
    assert "loss_weight" not in token
    assert torch.equal(token["tokens"], batch["tokens"])  # the same sequences, weighed otherwise
    with pytest.raises(ValueError, match="loss_weighting"):
        _mixture(out, loss_weighting="task")
    with pytest.raises(ValueError, match="mission_targets"):
        _mixture(out, mission_targets="some")


def test_target_shares_count_what_the_loss_weighs(suite, capsys):
    """``moe-gato targets``: per task and kind the share of the loss; with sequence weights a
    task's share of the loss is its share of the draws."""
    from moe_gato.cli import main
    from moe_gato.data.stats import target_shares

    out, _ = suite
    tasks = {"classic/Pendulum-v1": 1.0, "babyai/BabyAI-GoToLocal-v0": 1.0}
    token = target_shares(_mixture(out, tasks=tasks), sequences=200)
    seq = target_shares(_mixture(out, tasks=tasks, loss_weighting="sequence"), sequences=200)
    pend, baby = "classic/Pendulum-v1", "babyai/BabyAI-GoToLocal-v0"
    assert token["tasks"][pend]["loss"] > 0.7             # ~40 actions a sequence vs 1-2
    assert token["tasks"][pend]["loss/discrete_action"] == 0
    for task in tasks:
        assert seq["tasks"][task]["loss"] == pytest.approx(seq["tasks"][task]["draws"])
    assert sum(r["loss"] for r in token["tasks"].values()) == pytest.approx(1.0)
    assert main(["targets", "--config", "configs/data/recipe.yaml", "--data", str(out),
                 "--sequences", "20"]) == 2
    assert "not in" in capsys.readouterr().err            # the recipe's tasks are not collected
    mixture = out / "two.yaml"
    mixture.write_text(f"data_dir: {out}\ntasks: {{{pend}: 1.0, {baby}: 1.0}}\n")
    assert main(["targets", "--config", str(mixture), "--sequences", "50",
                 "--json", str(out / "shares.json"), "loss_weighting=sequence"]) == 0
    printed = capsys.readouterr().out
    assert "loss_weighting=sequence" in printed and f"| {pend} |" in printed
    assert json.loads((out / "shares.json").read_text())["sequences"] == 50


def test_mixture_config_validation():
    from moe_gato.config import load_config
    from moe_gato.data import load_mixture

    with pytest.raises(ValueError, match="prompt_prob"):
        MixtureConfig(tasks={"a/b": 1.0}, prompt_prob=2.0)
    with pytest.raises(ValueError, match="weight"):
        MixtureConfig(tasks={"a/b": 0.0})
    with pytest.raises(ValueError, match="tasks"):
        MixtureConfig()
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(MixtureConfig, "configs/data/default.yaml", ["contxt_len=3"])
    cfg = load_mixture("configs/data/default.yaml", ["context_len=512"])
    assert cfg.context_len == 512 and len(cfg.tasks) >= 25
    assert all(t in resolve_tasks("default", list(cfg.tasks))[i].name
               for i, t in enumerate(cfg.tasks))
    assert not any(s.held_out for s in resolve_tasks("default", list(cfg.tasks)))


def test_pong_player_and_metaworld_pixels():
    from moe_gato.envs.atari import AtariTask
    from moe_gato.envs.meta_world import MetaWorldTask

    pong = AtariTask("Pong")
    pong.max_steps = 300
    ep = run_episode(pong, ExpertActor(), 0)
    assert ep.observations["frame"].shape == (300, 64, 64) and ep.actions.max() < pong.action_dim
    mw = MetaWorldTask("reach-v3", images=True, horizon=5)
    ep = run_episode(mw, ExpertActor(), 0)
    rgb = ep.observations["rgb"]
    assert rgb.shape == (5, 64, 64, 3) and rgb.dtype == np.uint8 and rgb.std() > 10


def test_cli(tmp_path, capsys):
    from moe_gato.data.cli import main

    assert main(["--tasks", "classic/Nope-v0", "--out", str(tmp_path)]) == 2
    assert "known tasks" in capsys.readouterr().err
    assert main(["--list"]) == 0
    assert "atari/Pong" in capsys.readouterr().out
    assert main(["--tasks", "classic/MountainCar-v0", "--episodes", "2", "--out", str(tmp_path),
                 "--no-progress", "--workers", "1"]) == 0
    assert "classic/MountainCar-v0" in capsys.readouterr().out
    assert json.loads((tmp_path / "manifest.json").read_text())["tasks"]["classic/MountainCar-v0"]["episodes"] == 2
