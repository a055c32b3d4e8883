"""Runs never lose data (issue #13): checkpoints, resume, collection and configs under bad
input and faults. Each test reproduces one way a run used to be lost, corrupted or
reported with a traceback."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from moe_gato.cli import main
from moe_gato.data import storage
from moe_gato.train import TrainingError, Trainer, load_train_config
from moe_gato.train import checkpoint as ckpt
from moe_gato.train import trainer as trainer_mod
from test_train import read_metrics, write_config

REPO = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def rewrite_checksums(folder: Path) -> None:
    """As if the checkpoint had been written with the bad content (checksums match it)."""
    sums = {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "checksums.json"}
    (folder / "checksums.json").write_text(json.dumps(sums))


def finished_run(tmp_path: Path, suite: Path, steps: int = 4, **top) -> tuple[Path, Path]:
    """A finished 4-step run (checkpoints at 2 and 4); returns (config file, run dir)."""
    config = write_config(tmp_path, suite, steps=steps, eval_every=100, **top)
    run = tmp_path / "run"
    Trainer(load_train_config(config), run).fit()
    return config, run


def all_finite(folder: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for f in folder.glob("*.safetensors")
               for t in load_file(str(f)).values() if t.is_floating_point())


# ------------------------------------------------------------ 1. non-finite updates
def test_a_non_finite_update_is_never_checkpointed(tmp_path, tiny_suite, monkeypatch):
    config = load_train_config(write_config(tmp_path, tiny_suite, steps=3, checkpoint_every=1,
                                            eval_every=100), ["optim.warmup_steps=0"])
    run = tmp_path / "run"
    # step 0 trains normally; the update of step 1 uses lr=inf (what optim.lr=inf did)
    monkeypatch.setattr(trainer_mod, "lr_at", lambda step, cfg: 3e-3 if step < 1 else float("inf"))
    with pytest.raises(TrainingError, match=r"at step 1.*Last good checkpoint: .*step_00000001"):
        Trainer(config, run).fit()
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000001"]
    assert all_finite(run / "checkpoints" / "step_00000001")
    monkeypatch.undo()
    Trainer(config, run).fit()  # a sane rerun resumes from it and finishes
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]


def test_a_checkpoint_with_non_finite_tensors_is_refused(tmp_path, tiny_suite):
    trainer = Trainer(load_train_config(write_config(tmp_path, tiny_suite)), tmp_path / "run")
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        trainer.save()
    assert ckpt.list_checkpoints(tmp_path / "run") == []


@pytest.mark.parametrize("override", ["optim.lr=inf", "optim.lr=nan", "optim.lr=.inf",
                                      "optim.grad_clip=nan", "optim.eps=-1", "optim.eps=nan"])
def test_config_refuses_non_finite_and_bad_numbers_naming_the_key(tmp_path, tiny_suite, override):
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_train_config(write_config(tmp_path, tiny_suite), [override])


# ------------------------------------------------------------ 2. resume=never, overwrite
def test_resume_never_leaves_an_existing_run_alone_and_overwrite_moves_it_aside(tmp_path, tiny_suite):
    config, run = finished_run(tmp_path, tiny_suite)
    before = snapshot(run)
    with pytest.raises(ValueError, match="holds a run.*--overwrite"):
        Trainer(load_train_config(config, ["resume=never", "steps=2"]), run).fit()
    assert snapshot(run) == before
    Trainer(load_train_config(config, ["steps=2"]), run, overwrite=True).fit()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and snapshot(aside[0]) == before  # the old run, untouched
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000002"]


def test_keep_last_prunes_by_step_number_within_this_run(tmp_path, tiny_suite):
    trainer = Trainer(load_train_config(write_config(tmp_path, tiny_suite), ["keep_last=1"]),
                      tmp_path / "run")
    root = tmp_path / "run" / "checkpoints"
    (root / "step_00000006").mkdir(parents=True)  # a later step (a timeline resumed before)
    (root / "step_100000000").mkdir()             # 9 digits: sorts before step_00000006 by name
    trainer.step = 2
    trainer.save()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == [
        "step_00000002", "step_00000006", "step_100000000"]


# ------------------------------------------------------------ 3. no checkpoint loads
def test_when_every_checkpoint_is_broken_resume_stops_and_changes_nothing(tmp_path, tiny_suite):
    config, run = finished_run(tmp_path, tiny_suite)
    for path in ckpt.list_checkpoints(run):
        f = path / "optimizer.safetensors"
        f.write_bytes(f.read_bytes()[:-1])
    before = snapshot(run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="no checkpoint of .* can be resumed") as err:
            Trainer(load_train_config(config), run).fit()
    msg = str(err.value)
    assert "step_00000002: optimizer.safetensors does not match" in msg
    assert "step_00000004: optimizer.safetensors does not match" in msg
    assert snapshot(run) == before


# ------------------------------------------------------------ 4. model checkpoints verify
def test_load_checkpoint_verifies_checksums_and_warns_without_them(tmp_path):
    from moe_gato.model import build_model, load_checkpoint, load_config, save_checkpoint

    model = build_model(load_config(REPO / "configs/model/tiny-moe.yaml", ["num_layers=2"]))
    folder = save_checkpoint(model, tmp_path / "ck")
    rewrite_checksums(folder)  # as a training checkpoint has them
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(folder)  # verified: no warning
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])  # flip the last float's bytes
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors does not match its checksum"):
        load_checkpoint(folder)
    (folder / "checksums.json").unlink()
    with pytest.warns(UserWarning, match="no checksums.json.*unverified"):
        load_checkpoint(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(folder, verify=False)  # the caller says so: silent


# ------------------------------------------------------------ 5. unloadable checkpoints
def _pickle_model(folder: Path) -> None:
    tensors = {k: v.clone() for k, v in load_file(str(folder / "model.safetensors")).items()}
    torch.save(tensors, folder / "model.safetensors")


def _lying_header(folder: Path) -> None:
    f = folder / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 2)
    header[name]["shape"][0] *= 2
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    f.write_bytes(raw[:8] + text.ljust(n) + raw[8 + n:])


def _transposed(folder: Path, file: str) -> None:
    f = folder / file
    tensors = {k: v.clone() for k, v in load_file(str(f)).items()}  # not views of the file
    name = next(k for k, t in tensors.items() if t.dim() == 2 and t.shape[0] != t.shape[1])
    tensors[name] = tensors[name].t().contiguous()
    save_file(tensors, str(f))


@pytest.mark.parametrize("damage", ["pickle", "header", "transposed_weight",
                                    "transposed_optimizer_state"])
def test_a_checkpoint_that_cannot_be_loaded_is_skipped(tmp_path, tiny_suite, damage):
    config, run = finished_run(tmp_path, tiny_suite)
    newest = run / "checkpoints" / "step_00000004"
    {"pickle": _pickle_model, "header": _lying_header,
     "transposed_weight": lambda f: _transposed(f, "model.safetensors"),
     "transposed_optimizer_state": lambda f: _transposed(f, "optimizer.safetensors")}[damage](newest)
    rewrite_checksums(newest)
    assert ckpt.verify_checkpoint(newest) is None  # the checksums match: only loading tells
    trainer = Trainer(load_train_config(config, ["steps=5"]), run)
    with pytest.warns(UserWarning, match="skipping checkpoint .*step_00000004.*cannot be loaded"):
        trainer.fit()
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]


# ------------------------------------------------------------ 6. config changes on resume
def test_resuming_with_another_config_is_refused_naming_the_keys(tmp_path, tiny_suite):
    config, run = finished_run(tmp_path, tiny_suite)
    before = snapshot(run)
    with pytest.raises(ValueError, match=r"optim\.weight_decay: 0\.1 -> 0\.05.*seed: 0 -> 1"):
        Trainer(load_train_config(config, ["optim.weight_decay=0.05", "seed=1"]), run).fit()
    assert snapshot(run) == before
    # a longer budget and a lower peak learning rate are legitimate: applied, warned about
    # and recorded
    with pytest.warns(UserWarning, match="steps: 4 -> 6"):
        Trainer(load_train_config(config, ["steps=6", "optim.lr=0.002"]), run).fit()
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    record = json.loads((run / "config_changes.jsonl").read_text())
    assert record == {"step": 4, "changes": {"optim.lr": [0.003, 0.002], "steps": [4, 6]}}
    assert yaml.safe_load((run / "config.yaml").read_text())["steps"] == 6
    with pytest.raises(ValueError, match="at step 6, beyond this config's budget of 4"):
        Trainer(load_train_config(config, ["steps=4"]), run).fit()


def test_a_run_saved_before_new_options_resumes_as_it_was_trained(tmp_path, tiny_suite):
    """A run whose config.yaml predates ``model.positions``, ``model.rope_base``,
    ``data.loss_weighting`` and ``data.mission_targets`` resumes: a missing key counts as
    its default (the earlier behaviour); one set otherwise is still a refused change."""
    config, run = finished_run(tmp_path, tiny_suite)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    for section, key in (("model", "positions"), ("model", "rope_base"),
                         ("data", "loss_weighting"), ("data", "mission_targets")):
        del saved[section][key]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    Trainer(load_train_config(config, ["steps=5"]), run).fit()
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match=r"model\.positions: 'none' -> 'rope'"):
        Trainer(load_train_config(config, ["steps=6", "model.positions=rope"]), run).fit()


def test_cli_errors_are_one_line_for_a_changed_model_and_a_training_stop(tmp_path, tiny_suite,
                                                                         capsys, monkeypatch):
    config, run = finished_run(tmp_path, tiny_suite)
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--out", str(run), "model.d_model=64"]) == 2
    err = capsys.readouterr().err
    assert "model.d_model" in err and "Traceback" not in err and len(err.splitlines()) == 1
    monkeypatch.setattr(trainer_mod, "lr_at", lambda step, cfg: float("inf"))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "nan")]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("moe-gato train: error: loss is") and "Last good checkpoint: none" in last
    assert "Traceback" not in err


# ------------------------------------------------------------ 7. contexts without targets
def test_a_context_shorter_than_one_timestep_is_refused(tmp_path, tiny_suite):
    path = write_config(tmp_path, tiny_suite)
    cfg = load_train_config(path, ["model.context_length=16"])
    with pytest.raises(ValueError, match=r"the context \(16, model.context_length\) cannot hold "
                                         r"one timestep of "
                                         r"babyai/BabyAI-GoToLocal-v0"):
        Trainer(cfg, tmp_path / "run")


def test_a_batch_without_targets_is_an_error(tmp_path, tiny_suite):
    trainer = Trainer(load_train_config(write_config(tmp_path, tiny_suite)), tmp_path / "run")
    sequence = trainer.loader.sequence

    def no_targets(i):
        seq = sequence(i)
        seq.loss_mask[:] = False
        return seq

    trainer.loader.sequence = no_targets
    with pytest.raises(TrainingError, match="step 0 holds no target"):
        trainer.train_step()


# ------------------------------------------------------------ 8. SIGKILLed collect
COLLECT_SCRIPT = """
import sys
from moe_gato.data.collect import collect
collect("default", sys.argv[1], tasks=["classic/CartPole-v1", "classic/Pendulum-v1"],
        episodes=2, return_episodes=int(sys.argv[2]), workers=2, progress=False)
"""


@pytest.mark.slow
def test_sigkilled_collect_takes_its_workers_along_and_a_rerun_is_consistent(tmp_path):
    psutil = pytest.importorskip("psutil")  # (a dependency of deepspeed)

    out = tmp_path / "data"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1"}
    # long enough (1e5 return episodes) that a surviving worker would be seen
    proc = subprocess.Popen([sys.executable, "-c", COLLECT_SCRIPT, str(out), "100000"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    parent = psutil.Process(proc.pid)
    children: list = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # until both workers run a task
            children = parent.children(recursive=True)
            workers = [c for c in children if "spawn_main" in " ".join(c.cmdline())
                       and c.cpu_times().user > 2.0]
            if len(workers) >= 2:
                break
            time.sleep(0.2)
        assert len(workers) >= 2, "the workers never started"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"orphaned after SIGKILL: {alive}"
    finally:
        for c in children:
            try:
                c.kill()
            except psutil.NoSuchProcess:
                pass
    from moe_gato.data.collect import collect

    manifest = collect("default", out, tasks=["classic/CartPole-v1", "classic/Pendulum-v1"],
                       episodes=2, return_episodes=2, workers=1, progress=False)
    assert sorted(manifest["tasks"]) == ["classic/CartPole-v1", "classic/Pendulum-v1"]
    assert not list(out.rglob("*" + storage.PARTIAL))
    for name in manifest["tasks"]:
        assert len(storage.TaskData(out / name)) == 2


# ------------------------------------------------------------ 9. task.json edits
def _copy_task(tiny_suite: Path, tmp_path: Path, name: str = "classic/Pendulum-v1") -> Path:
    dst = tmp_path / "suite"
    shutil.copytree(tiny_suite, dst)
    return dst / name


@pytest.mark.parametrize("edit,match", [
    (lambda m: m["obs_spec"]["state"].update(dtype="int32"), r"obs_spec .*written as"),
    (lambda m: m["obs_spec"]["state"].update(dtype="float64"), r"obs_spec|bytes"),
    (lambda m: m["obs_spec"]["state"].update(dtype="float77"), r"obs_spec"),
    (lambda m: m.pop("obs_spec"), r"lacks \['obs_spec'\]"),
    (lambda m: m.update(action_dim=2), r"action_dim|actions"),
])
def test_an_edited_task_json_is_a_clear_error(tmp_path, tiny_suite, edit, match):
    task = _copy_task(tiny_suite, tmp_path)
    meta = json.loads((task / "task.json").read_text())
    edit(meta)
    (task / "task.json").write_text(json.dumps(meta))
    with pytest.raises(storage.DataError, match=match) as err:
        storage.TaskData(task)
    assert "task.json" in str(err.value) and "classic/Pendulum-v1" in str(err.value)
    from moe_gato.data.collect import collect

    with pytest.raises(storage.DataError, match="task.json"):  # never reused as finished
        collect("default", task.parents[1], tasks=["classic/Pendulum-v1"], episodes=4,
                return_episodes=2, workers=1, progress=False)


def test_a_task_json_whose_sizes_disagree_with_the_data_is_refused(tmp_path, tiny_suite):
    """Folders without the stored copy of the decoding keys are still checked by size."""
    task = _copy_task(tiny_suite, tmp_path)
    info = json.loads((task / "dataset_info.json").read_text())
    info["description"] = ""
    (task / "dataset_info.json").write_text(json.dumps(info))
    storage.TaskData(task)  # intact
    meta = json.loads((task / "task.json").read_text())
    meta["obs_spec"]["state"]["dtype"] = "float64"
    (task / "task.json").write_text(json.dumps(meta))
    with pytest.raises(storage.DataError, match=r"stored obs/state .*row 0 holds"):
        storage.TaskData(task)


# ------------------------------------------------------------ 10. empty names
def test_collect_refuses_no_tasks_and_an_empty_out(tmp_path, monkeypatch, capsys):
    import moe_gato.data.collect as collect_mod

    monkeypatch.chdir(tmp_path)

    def must_not_run(*a, **k):
        raise AssertionError("collect ran")

    real = collect_mod.collect
    monkeypatch.setattr(collect_mod, "collect", must_not_run)
    assert main(["collect", "--tasks", ",", "--out", str(tmp_path / "d"), "--no-progress"]) == 2
    assert "names no task" in capsys.readouterr().err
    monkeypatch.setattr(collect_mod, "collect", real)
    with pytest.raises(ValueError, match="--out"):
        real("default", "", tasks=["classic/Pendulum-v1"], episodes=1, return_episodes=1,
             workers=1, progress=False)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        real("default", tmp_path / "d", tasks=["classic/Pendulum-v1"], episodes=1,
             return_episodes=1, workers=1, progress=False, seed=-1)
    assert list(tmp_path.iterdir()) == []


def test_train_refuses_an_empty_out_and_a_file(tmp_path, tiny_suite, monkeypatch, capsys):
    config = write_config(tmp_path, tiny_suite, steps=1)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(config), "--out", ""]) == 2
    assert "--out" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "afile")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["collect", "--tasks", "classic/Pendulum-v1", "--out", str(tmp_path / "afile"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "not a folder" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "train.yaml"]


# ------------------------------------------------------------ clear errors
@pytest.mark.parametrize("text", ["[1, 2]", '"tasks"', '{"tasks": [1]}'])
def test_a_manifest_that_is_not_an_object_is_a_clear_error(tmp_path, tiny_suite, text):
    from moe_gato.data.collect import collect

    suite = tmp_path / "suite"
    shutil.copytree(tiny_suite, suite)
    (suite / "manifest.json").write_text(text)
    with pytest.raises(storage.DataError, match="does not hold a manifest"):
        Trainer(load_train_config(write_config(tmp_path, suite)), tmp_path / "run")
    with pytest.raises(storage.DataError, match="does not hold a manifest"):
        collect("default", suite, tasks=["classic/Pendulum-v1"], episodes=1, return_episodes=1,
                workers=1, progress=False)
    # --overwrite recollects the task asked for and keeps every intact one, saying so
    with pytest.warns(UserWarning, match="rebuilt it from the 4 complete task folder"):
        manifest = collect("default", suite, tasks=["classic/Pendulum-v1"], episodes=1,
                           return_episodes=1, workers=1, progress=False, overwrite=True)
    assert sorted(manifest["tasks"]) == sorted(json.loads(
        (tiny_suite / "manifest.json").read_text())["tasks"])
    assert manifest["tasks"]["classic/Pendulum-v1"]["episodes"] == 1


@pytest.mark.parametrize("override,match", [
    ("data.tasks.classic/Pendulum-v1=.inf", r"data\.tasks\.classic/Pendulum-v1"),
    ("seed=-1", "seed must be >= 0"),
    (".lr=3", "empty key name"),
    ("optim..lr=3", "empty key name"),
])
def test_bad_overrides_name_the_key(tmp_path, tiny_suite, override, match):
    with pytest.raises(ValueError, match=match):
        load_train_config(write_config(tmp_path, tiny_suite), [override])


# ------------------------------------------------------------ fault injection
def _train_child(config: str, run: str, resumed_file: str) -> None:
    """A forked training process (no interpreter start-up): records where it resumed."""
    code = 0
    try:
        # one thread: an OpenMP pool the parent started does not survive fork (a child that
        # used it could hang), and the parent's reference run uses one thread too
        torch.set_num_threads(1)
        sys.stdout = sys.stderr = open(os.devnull, "w")
        warnings.simplefilter("ignore")
        trainer = Trainer(load_train_config(config), run)
        resume = trainer.maybe_resume

        def recorded():
            step = resume()
            Path(resumed_file).write_text(str(step))
            return step

        trainer.maybe_resume = recorded
        trainer.fit()
    except BaseException:  # noqa: BLE001 - reported to the parent by the exit code
        import traceback

        Path(resumed_file + ".error").write_text(traceback.format_exc())
        code = 1
    finally:
        os._exit(code)


def _corrupt(path: Path, rng: random.Random) -> str:
    how = rng.choice(["truncate", "flip", "drop_checksums", "pickle"])
    if how == "truncate":
        f = path / rng.choice(["model.safetensors", "optimizer.safetensors", "rng.safetensors"])
        f.write_bytes(f.read_bytes()[:-rng.randint(1, 100)])
    elif how == "flip":
        f = path / "model.safetensors"
        data = bytearray(f.read_bytes())
        i = rng.randrange(len(data) // 2, len(data))
        data[i] ^= 0xFF
        f.write_bytes(bytes(data))
    elif how == "drop_checksums":
        (path / "checksums.json").unlink()
    else:
        _pickle_model(path)
        rewrite_checksums(path)
    return how


@pytest.mark.slow
def test_ten_kills_at_random_steps_with_corrupt_checkpoints_lose_nothing(tmp_path, tiny_suite):
    steps = 22  # 10 kills advance at most 2 steps each: every one lands before the end
    config = write_config(tmp_path, tiny_suite, steps=steps, checkpoint_every=2, eval_every=100,
                          keep_last=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the forked children (see _train_child)
    try:
        _ten_kills(tmp_path, config, steps)
    finally:
        torch.set_num_threads(threads)


def _ten_kills(tmp_path: Path, config: Path, steps: int) -> None:
    ref = tmp_path / "ref"
    Trainer(load_train_config(config), ref).fit()
    expected = read_metrics(ref)
    run = tmp_path / "run"
    rng = random.Random(13)
    ctx = mp.get_context("fork")  # the test process has imported everything: cheap restarts
    corrupted: dict[str, int] = {}  # checkpoint -> inode of the folder this test broke
    log = []

    def good_checkpoints() -> list[Path]:
        # a folder written again (a new inode) after being broken is good again; one that a
        # kill cut short while pruning it fails verification
        return [p for p in ckpt.list_checkpoints(run)
                if corrupted.get(p.name) != p.stat().st_ino and ckpt.verify_checkpoint(p) is None]

    for i in range(10):
        good = good_checkpoints()
        expect_resume = int(good[-1].name[len("step_"):]) if good else None
        rows = read_metrics(run) if (run / "metrics.jsonl").exists() else []
        # past the steps already logged, so that each attempt trains before it is killed
        kill_at = max([expect_resume or 0] + [r["step"] for r in rows]) + rng.randint(1, 2)
        resumed_file = tmp_path / f"resumed_{i}"
        proc = ctx.Process(target=_train_child, args=(str(config), str(run), str(resumed_file)))
        proc.start()
        deadline = time.time() + 240
        while time.time() < deadline and proc.is_alive():
            if resumed_file.exists() and (run / "metrics.jsonl").exists():
                rows = read_metrics(run)
                if rows and rows[-1]["step"] >= kill_at:
                    break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        error = Path(f"{resumed_file}.error")
        assert proc.exitcode == -signal.SIGKILL, (  # killed, not done
            i, proc.exitcode, log, error.read_text() if error.exists() else "")
        resumed = resumed_file.read_text()
        assert resumed == str(expect_resume), (i, resumed, expect_resume, log)
        rows = read_metrics(run) if (run / "metrics.jsonl").exists() else []
        assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)), (i, log)
        for x, y in zip(rows, expected):  # the curve so far is the uninterrupted one
            assert (x["loss"], x["lr"], x["tokens"], x["grad_norm"]) == (
                y["loss"], y["lr"], y["tokens"], y["grad_norm"]), (i, x["step"], log)
        good = good_checkpoints()
        # corrupt the newest good checkpoint on some kills (never the last one left)
        if len(good) >= 2 and rng.random() < 0.5:
            how = _corrupt(good[-1], rng)
            corrupted[good[-1].name] = good[-1].stat().st_ino
            log.append((i, kill_at, len(rows), good[-1].name, how))
        else:
            log.append((i, kill_at, len(rows), None, None))
    assert sum(how is not None for *_, how in log) >= 3, log
    Trainer(load_train_config(config), run).fit()
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for x, y in zip(rows, expected, strict=True):
        assert (x["loss"], x["lr"], x["tokens"], x["grad_norm"]) == (
            y["loss"], y["lr"], y["tokens"], y["grad_norm"]), (x["step"], log)
    assert rows[-1]["eval/loss"] == expected[-1]["eval/loss"]
