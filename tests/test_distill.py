"""Distillation (moe_gato/train/distill.py): the loss against a hand computation, the
student initialisations, and `moe-gato distill` end to end (resume, settings, DeepSpeed
ZeRO-1/2 over two processes)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from moe_gato.model import build_model, load_config
from moe_gato.model.moe import ModalityRoutedMoE
from moe_gato.train.distill import (DistillationLoss, copy_shared_weights, gather_experts,
                                    soft_target_kl)
from test_train import cli, read_metrics, torchrun, write_config

REPO = Path(__file__).resolve().parents[1]


def test_soft_target_kl_and_the_loss_match_a_hand_computation():
    """Two sequences of 4 positions over 3 ids; targets at positions 1, 2 of the first and
    3 of the second, so the logits at 0, 1 and (1, 2) are compared."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 4, 3, generator=g)
    t = torch.randn(2, 4, 3, generator=g)
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    T = 2.0

    def softmax(v):
        e = np.exp(v - v.max())
        return e / e.sum()

    want = []
    for b, l in ((0, 0), (0, 1), (1, 2)):
        p = softmax(t[b, l].numpy() / T)
        q = softmax(s[b, l].numpy() / T)
        want.append(float((p * np.log(p / q)).sum()))
    kl = soft_target_kl(s, t, mask, T)
    assert float(kl) == pytest.approx(np.mean(want), rel=1e-5)

    class Fixed(torch.nn.Module):  # a "model" returning given logits, with its hard loss
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, batch, compute_loss=True):
            out = type("Out", (), {})()
            out.logits = self.logits
            tgt = batch["tokens"][:, 1:]
            nll = torch.nn.functional.cross_entropy(self.logits[:, :-1].flatten(0, 1),
                                                    tgt.flatten(), reduction="none")
            m = batch["loss_mask"][:, 1:].flatten().float()
            out.lm_loss = (nll * m).sum() / m.sum()
            out.aux_loss = out.z_loss = torch.zeros(())
            return out

    tokens = torch.tensor([[0, 2, 1, 0], [1, 1, 0, 2]])
    batch = {"tokens": tokens, "loss_mask": mask}
    part = DistillationLoss(Fixed(t), alpha=0.75, temperature=T)(Fixed(s), batch)
    ce = np.mean([-math.log(softmax(s[b, l].numpy())[int(tokens[b, l + 1])])
                  for b, l in ((0, 0), (0, 1), (1, 2))])
    assert float(part.parts["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(part.loss) == pytest.approx(0.75 * ce + 0.25 * T**2 * np.mean(want), rel=1e-5)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
        DistillationLoss(Fixed(t), alpha=1.5)


def test_gathered_experts_reproduce_a_teacher_whose_experts_agree():
    """When every expert of every group holds the same weights, the MoE layer is G times one
    expert for any routing, and the student FFN built from the experts equals it."""
    teacher = build_model(load_config("configs/model/tiny-moe.yaml", ["num_layers=2"])).eval()
    student = build_model(load_config("configs/model/tiny-dense.yaml", ["num_layers=2"])).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in teacher.blocks:
            first = None
            for group in block.ffn.groups.values():
                if first is None:
                    first = (torch.randn(group.w1_EDF.shape[1:], generator=g) * 0.1,
                             torch.randn(group.w2_EFD.shape[1:], generator=g) * 0.1)
                group.w1_EDF.copy_(first[0].expand_as(group.w1_EDF))
                group.w2_EFD.copy_(first[1].expand_as(group.w2_EFD))
    copied = copy_shared_weights(student, teacher)
    assert "embed.tokens.weight" in copied and "blocks.1.attn.qkv.weight" in copied
    assert not any(".ffn." in n for n in copied)
    assert torch.equal(student.embed.tokens.weight, teacher.embed.tokens.weight)
    for load in (None, [{"text": torch.tensor([5.0, 0, 1, 2]),
                         "observation": torch.tensor([1.0, 1, 1, 9])}] * 2):
        gather_experts(student, teacher, load)
        x = torch.randn(7, 128, generator=g)
        kinds = torch.full((7,), 3)
        for s_block, t_block in zip(student.blocks, teacher.blocks, strict=True):
            assert isinstance(t_block.ffn, ModalityRoutedMoE)
            with torch.no_grad():
                want, _ = t_block.ffn(x, kinds)
                got = s_block.ffn(x)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # fp32 sums
        assert not student.blocks[0].ffn.fc2.weight[:, 512:].any()  # extra units start inert
    # fitted on the teacher's own inputs, the student's FFNs reproduce the layers' outputs
    from moe_gato.tokenizer import GatoTokenizer, collate, pack_sequences
    from moe_gato.train.distill import fit_experts

    tok = GatoTokenizer()
    batch = collate(pack_sequences([tok.tokenize_text("To be, or not to be, that is the "
                                                      "question. " * 8)], context_len=64,
                                   layout=tok.layout))
    left = fit_experts(student, teacher, [batch])
    assert len(left) == 2 and max(left) < 1e-3, left
    with pytest.raises(ValueError, match="needs at least one batch"):
        fit_experts(student, teacher, [])


def _teacher(tmp_path: Path, suite: Path) -> Path:
    run = tmp_path / "teacher"
    args, env = cli("train", "--config", str(write_config(tmp_path, suite, steps=2)),
                    "--out", str(run))
    subprocess.run(args, env=env, check=True, capture_output=True, timeout=600)
    return run


def _student_config(tmp_path: Path, suite: Path, **top) -> Path:
    path = write_config(tmp_path, suite, steps=4, eval_every=4, checkpoint_every=2, **top)
    data = yaml.safe_load(path.read_text())
    data["model"]["preset"] = "configs/model/tiny-dense.yaml"
    out = tmp_path / "student.yaml"
    out.write_text(yaml.safe_dump(data))
    return out


def test_distill_end_to_end_resumes_exactly_and_refuses_other_settings(tmp_path, tiny_suite):
    teacher = _teacher(tmp_path, tiny_suite)
    config = _student_config(tmp_path, tiny_suite)
    student = tmp_path / "student"
    base = ["distill", "--teacher", str(teacher), "--student", "configs/model/tiny-dense.yaml",
            "--config", str(config), "--out", str(student), "--load-sequences", "4",
            "model.num_layers=2"]
    args, env = cli(*base)
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_metrics(student)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["objective/kl"] >= 0 and r["objective/ce"] > 0 for r in rows)
    for r in rows:  # loss = 0.75 ce + 0.25 kl at T = 1
        assert r["loss"] == pytest.approx(0.75 * r["objective/ce"] + 0.25 * r["objective/kl"],
                                          rel=1e-5)
    assert "eval/loss" in rows[-1]
    saved = json.loads((student / "distill.json").read_text())
    assert saved["init"] == "copy+fit" and saved["alpha"] == 0.75
    assert yaml.safe_load((student / "config.yaml").read_text())["model"]["ffn"] == "dense"
    # resume: back to step 2, the rerun gives the same steps 3 and 4 exactly
    shutil.rmtree(student / "checkpoints" / "step_00000004")
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r["loss"] for r in read_metrics(student)] == [r["loss"] for r in rows]
    # other settings on the same run are refused
    args, env = cli(*base, "--alpha", "0.5")
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "distilled with other settings" in out.stderr
    args, env = cli("distill", "--teacher", str(teacher), "--student",
                    "configs/model/tiny-moe.yaml", "--config", str(config), "--out",
                    str(tmp_path / "other"))
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "--student must be a dense model" in out.stderr


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_distill_under_deepspeed_matches_one_process(tmp_path, tiny_suite, zero_stage):
    teacher = _teacher(tmp_path, tiny_suite)
    config = _student_config(tmp_path, tiny_suite)
    common = ["--teacher", str(teacher), "--student", "configs/model/tiny-dense.yaml",
              "--config", str(config), "--init", "copy+mean"]
    args, env = cli("distill", *common, "--out", str(tmp_path / "one"), "model.num_layers=2")
    subprocess.run(args, env=env, check=True, capture_output=True, timeout=600)
    torchrun("-m", "moe_gato.cli", "distill", *common, "--out", str(tmp_path / "two"),
             "model.num_layers=2", "deepspeed.enabled=true",
             f"deepspeed.zero_stage={zero_stage}")
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-5, x["step"]
