"""The MoE inference fast path (no gradients, few tokens) equals the training path: outputs,
routing records, group isolation; and ``expert_ffn_few`` equals a per-slot reference."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from moe_gato.model import ModelConfig, MoEConfig, build_model
from moe_gato.model import moe as moe_module
from moe_gato.model.dispatch import expert_ffn_few
from moe_gato.model.moe import DeferredRouting, ModalityRoutedMoE, init_moe_
from moe_gato.tokenizer.layout import Kind

D, FF = 24, 48
CONFIGS = {
    "top1_g2": dict(top_k=1, granularity=2),
    "top2_g2_shared": dict(top_k=2, granularity=2, shared_expert=True),
    "top2_g1_irregular": dict(top_k=2, granularity=1, num_experts=5,
                              experts_per_group={"image": 2, "action": 3}),
    "bias_no_renorm": dict(top_k=1, granularity=2, bias_balancing=True, renormalize=False),
    "one_group": dict(top_k=1, granularity=2, groups={"all": [k.name.lower() for k in Kind]}),
}


def make_moe(name: str, seed: int) -> ModalityRoutedMoE:
    kw = dict(CONFIGS[name])
    kw.setdefault("num_experts", 4)
    cfg = ModelConfig(d_model=D, num_heads=1, ffn_hidden=FF, ffn="moe", text_vocab_size=8192,
                      moe=MoEConfig(**kw))
    torch.manual_seed(seed)
    moe = ModalityRoutedMoE(cfg)
    init_moe_(moe, 0.3, 0.3)  # large enough that routing is far from ties
    for group in moe.groups.values():
        group.expert_bias_E.normal_(std=0.1)
        if group.shared is not None:
            torch.nn.init.normal_(group.shared.fc1.weight, std=0.3)
            torch.nn.init.normal_(group.shared.fc2.weight, std=0.3)
    return moe


def tokens(T: int, seed: int, kinds: list[Kind] | None = None):
    g = torch.Generator().manual_seed(seed)
    x_TD = torch.randn(T, D, generator=g)
    if kinds is None:
        kinds_T = torch.randint(0, len(Kind), (T,), generator=g)
    else:
        kinds_T = torch.tensor([int(kinds[i % len(kinds)]) for i in range(T)])
    return x_TD, kinds_T


def forward_both(moe, x_TD, kinds_T):
    """(training path: gradients recorded, every group runs; inference path: no_grad)."""
    with torch.enable_grad():
        y_train, r_train = moe(x_TD, kinds_T)
    with torch.no_grad():
        y_fast, r_fast = moe(x_TD, kinds_T)
    return (y_train.detach(), r_train), (y_fast, r_fast)


def assert_same_routing(r_train, r_fast):
    assert set(r_fast) == set(r_train)
    for name, a in r_train.items():
        b = r_fast[name]
        assert torch.equal(a.token_index_t, b.token_index_t)
        assert torch.equal(a.expert_ids_tK, b.expert_ids_tK)
        assert torch.equal(a.load_E, b.load_E)
        assert int(b.dropped) == 0
        torch.testing.assert_close(b.aux_loss, a.aux_loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.z_loss, a.z_loss.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("T", [1, 2, 5, 37, 300])
def test_fast_path_equals_training_path(name, T):
    moe = make_moe(name, seed=T)
    x_TD, kinds_T = tokens(T, seed=1000 + T)
    (y_train, r_train), (y_fast, r_fast) = forward_both(moe, x_TD, kinds_T)
    assert torch.allclose(y_fast, y_train, rtol=1e-5, atol=1e-6)
    assert_same_routing(r_train, r_fast)


@pytest.mark.parametrize("kinds", [[Kind.CONTINUOUS_ACTION], [Kind.SEPARATOR],
                                   [Kind.CONTINUOUS_OBS] * 39 + [Kind.SEPARATOR],
                                   [Kind.IMAGE, Kind.TEXT, Kind.DISCRETE_OBS]])
def test_fast_path_control_step_shapes(kinds):
    """A decode token, a lone separator, Meta-World's observation chunk, three groups."""
    moe = make_moe("top2_g2_shared", seed=len(kinds))
    x_TD, kinds_T = tokens(len(kinds), seed=7, kinds=kinds)
    (y_train, r_train), (y_fast, r_fast) = forward_both(moe, x_TD, kinds_T)
    assert torch.allclose(y_fast, y_train, rtol=1e-5, atol=1e-6)
    assert_same_routing(r_train, r_fast)


def test_fast_path_is_taken_for_few_tokens_only(monkeypatch):
    moe = make_moe("top1_g2", seed=0)

    def fail(*args, **kwargs):
        raise AssertionError("wrong path")

    x_TD, kinds_T = tokens(moe_module.FEW_TOKENS, seed=0)
    monkeypatch.setattr(moe_module, "expert_ffn", fail)
    with torch.no_grad():
        moe(x_TD, kinds_T)  # few tokens: the fast path, never the per-group dispatch
    monkeypatch.undo()
    monkeypatch.setattr(moe_module, "expert_ffn_few", fail)
    x_TD, kinds_T = tokens(moe_module.FEW_TOKENS + 1, seed=0)
    with torch.no_grad():
        moe(x_TD, kinds_T)  # many tokens: the per-group path
    with pytest.raises(AssertionError, match="wrong path"):
        with torch.no_grad():
            moe(x_TD[:3], kinds_T[:3])
    with torch.enable_grad():  # training never takes the fast path
        moe(x_TD[:3], kinds_T[:3])
    capacity = make_moe("top1_g2", seed=0)
    capacity.moe = dataclasses.replace(capacity.moe, capacity_factor=1.0)
    with torch.no_grad():  # capacity (drops) stays on the per-group path
        capacity(x_TD[:3], kinds_T[:3])


@pytest.mark.parametrize("T", [1, 6, 40])
def test_fast_path_never_reaches_another_groups_experts(T):
    """Poison every other group's experts (NaN) and favour them in its router: the tokens of
    one group come out finite and unchanged, and the records name only their group."""
    moe = make_moe("top2_g2_shared", seed=3)
    x_TD, kinds_T = tokens(T, seed=11, kinds=[Kind.CONTINUOUS_OBS, Kind.DISCRETE_OBS])
    with torch.no_grad():
        clean, _ = moe(x_TD, kinds_T)
        for name, group in moe.groups.items():
            if name != "observation":
                group.w1_EDF.fill_(float("nan"))
                group.w2_EFD.fill_(float("nan"))
                group.router_ED.copy_(x_TD[0] * 100)  # their logits would win if unmasked
                group.expert_bias_E.fill_(100.0)
                group.shared.fc1.weight.fill_(float("nan"))
        y_TD, routing = moe(x_TD, kinds_T)
    assert torch.isfinite(y_TD).all()
    assert torch.equal(y_TD, clean)
    assert set(routing) == {"observation"}
    r = routing["observation"]
    assert torch.equal(r.token_index_t, torch.arange(T))
    assert int(r.expert_ids_tK.max()) < moe.groups["observation"].num_experts


def test_fast_path_isolates_groups_with_bias_balancing():
    moe = make_moe("bias_no_renorm", seed=5)
    x_TD, kinds_T = tokens(9, seed=5, kinds=[Kind.TEXT, Kind.IMAGE, Kind.CONTINUOUS_ACTION])
    with torch.no_grad():
        for name, group in moe.groups.items():
            group.expert_bias_E.fill_(10.0 if name == "observation" else 0.0)
        _, routing = moe(x_TD, kinds_T)
    for name, r in routing.items():
        allowed = {int(Kind[k.upper()]) for k in moe.moe.groups[name]}
        assert set(kinds_T[r.token_index_t].tolist()) <= allowed
        assert int(r.expert_ids_tK.max()) < moe.groups[name].num_experts


def test_deferred_routing_reads_like_a_record():
    calls = []

    def compute():
        calls.append(1)
        z = torch.zeros(())
        return dict(token_index_t=torch.arange(2), expert_ids_tK=torch.zeros(2, 1),
                    load_E=torch.tensor([2, 0]), dropped=z, aux_loss=z, z_loss=z)

    r = DeferredRouting(compute)
    assert not calls
    assert copy.copy(r) is not None and not calls  # copying does not compute
    assert int(r.load_E.sum()) == 2 and torch.equal(r.token_index_t, torch.arange(2))
    assert "load_E" in repr(r)
    assert len(calls) == 1
    with pytest.raises(AttributeError):
        r.bogus


def reference_ffn(x_TD, cols_TK, gates_TK, w1s, w2s, offsets):
    y = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(cols_TK.shape[1]):
            c = int(cols_TK[t, k])
            g = max(i for i in range(len(w1s)) if offsets[i] <= c)
            e = c - offsets[g]
            y[t] += gates_TK[t, k] * (torch.nn.functional.gelu(x_TD[t] @ w1s[g][e]) @ w2s[g][e])
    return y


@pytest.mark.parametrize("T,K,sizes", [(1, 1, [3]), (1, 3, [4, 2]), (2, 2, [5, 1, 3]),
                                       (13, 2, [2, 6]), (64, 3, [4, 4, 4, 1])])
def test_expert_ffn_few_matches_reference(T, K, sizes):
    g = torch.Generator().manual_seed(T * 10 + K)
    Fh = 10
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    w1s = [torch.randn(E, D, Fh, generator=g) * 0.3 for E in sizes]
    w2s = [torch.randn(E, Fh, D, generator=g) * 0.3 for E in sizes]
    x_TD = torch.randn(D, T, generator=g).t()  # non-contiguous
    cols_TK = torch.stack([torch.randperm(offsets[-1], generator=g)[:K] for _ in range(T)])
    gates_TK = torch.rand(T, K, generator=g)
    y = expert_ffn_few(x_TD, cols_TK, gates_TK, w1s, w2s, offsets)
    ref = reference_ffn(x_TD, cols_TK, gates_TK, w1s, w2s, offsets)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides", [["num_layers=2"],
                                       ["num_layers=2", "moe.top_k=2", "moe.shared_expert=true"]])
def test_cached_decoding_on_fast_path_equals_training_forward(overrides):
    """The whole model: chunked KV-cached forwards (fast path) equal one full forward with
    gradients recorded (training path)."""
    from test_model import make_batch, tiny  # pytest puts tests/ on sys.path

    cfg = tiny("tiny-moe", *overrides)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    batch = make_batch(cfg, batch=1, length=30)
    assert batch["patches"].shape[0] > 0
    with torch.enable_grad():
        full = model(batch).logits.detach()
    cache = model.new_cache()
    pieces = []
    is_img = batch["kinds"] == Kind.IMAGE
    order = torch.cumsum(is_img.reshape(-1), 0).view_as(is_img) - 1
    with torch.no_grad():
        for a, b in zip([0, 12, 13, 14, 25], [12, 13, 14, 25, 30]):
            chunk = {k: v[:, a:b] for k, v in batch.items() if k != "patches"}
            chunk["patches"] = batch["patches"][order[:, a:b][is_img[:, a:b]]]
            pieces.append(model(chunk, cache=cache, compute_loss=False).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)
