"""Model invariants (issue 3): MoE == dense at one expert, group isolation, KV cache,
masked loss, router gradients, dropless / capacity accounting, counts, configs, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_gato.model import (ModelConfig, MoEConfig, build_model, load_checkpoint, load_config,
                            save_checkpoint)
from moe_gato.model import accounting
from moe_gato.model.dispatch import expert_capacity, expert_ffn
from moe_gato.tokenizer.layout import ACTION_LOCAL_POS, Kind, TokenSequence, VocabLayout, collate

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "model"


def tiny(name="tiny-moe", *overrides):
    return load_config(PRESETS / f"{name}.yaml", overrides)


def episode(layout: VocabLayout, rng: np.random.Generator, length: int) -> TokenSequence:
    """Text, then timesteps of (2 image patches, 2 discrete obs, 2 continuous obs, '|',
    2 continuous actions, 1 discrete action), padded to ``length``."""
    tok, kinds, lp, mask, rc = [], [], [], [], []

    def add(t, k, p, m, r=(0, 0, 0, 0)):
        tok.append(t); kinds.append(k); lp.append(p); mask.append(m); rc.append(r)

    for i in range(int(rng.integers(3, 6))):
        add(int(rng.integers(0, layout.text_vocab_size)), Kind.TEXT, i, True)
    while len(tok) < length - 14:
        add(0, Kind.IMAGE, 0, False, (0, .5, 0, 1)); add(0, Kind.IMAGE, 1, False, (.5, 1, 0, 1))
        for p, kind in ((2, Kind.DISCRETE_OBS), (3, Kind.DISCRETE_OBS),
                        (4, Kind.CONTINUOUS_OBS), (5, Kind.CONTINUOUS_OBS)):
            add(int(rng.integers(*layout.id_range(kind))), kind, p, False)
        add(layout.separator_id, Kind.SEPARATOR, ACTION_LOCAL_POS, False)
        for kind in (Kind.CONTINUOUS_ACTION, Kind.CONTINUOUS_ACTION, Kind.DISCRETE_ACTION):
            add(int(rng.integers(*layout.id_range(kind))), kind, ACTION_LOCAL_POS, True)
    n_img = kinds.count(Kind.IMAGE)
    seq = TokenSequence(tokens=np.array(tok, np.int64), kinds=np.array(kinds, np.int8),
                        local_pos=np.array(lp, np.int16), loss_mask=np.array(mask, bool),
                        timestep=np.zeros(len(tok), np.int32),
                        image_rc=np.array(rc, np.float32),
                        patches=rng.uniform(-.25, .25, (n_img, 3, 16, 16)).astype(np.float32))
    return seq.pad_to(length, layout)


def make_batch(cfg: ModelConfig, batch=2, length=40, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return collate([episode(cfg.layout, rng, length) for _ in range(batch)])


def test_tiny_presets_small_and_twins():
    dense, moe = build_model(tiny("tiny-dense")), build_model(tiny("tiny-moe"))
    assert dense.num_params() < 10e6 and moe.num_params() < 10e6
    assert moe.num_active_params() == dense.num_params() == dense.num_active_params()
    for g in moe.cfg.moe.groups:
        assert moe.num_active_params(group=g) == dense.num_params()
    assert moe.flops_per_token() == dense.flops_per_token()


@pytest.mark.parametrize("path", sorted(PRESETS.glob("*.yaml")), ids=lambda p: p.stem)
def test_presets_load(path):
    cfg = load_config(path)
    assert accounting.num_params(cfg) > 0 and accounting.activation_bytes(cfg) > 0


@pytest.mark.parametrize("overrides", [(), ("tie_embeddings=false", "moe.shared_expert=true",
                                            "moe.moe_every=2", "moe.experts_per_group={image: 2}"),
                                       ("value_embedding=smooth",),
                                       ("value_embedding=scalar", "positions=timestep_bias"),
                                       ("positions=rope",)])
def test_param_breakdown_matches_module(overrides):
    cfg = tiny("tiny-moe", *overrides)
    model = build_model(cfg)
    assert model.num_params() == accounting.num_params(cfg)
    moe_params = sum(p.numel() for n, p in model.named_parameters() if ".groups." in n)
    b = accounting.param_breakdown(cfg)
    assert moe_params == sum(v for k, v in b.items() if k.startswith("moe."))


def test_hand_count_tiny():
    cfg = ModelConfig(text_vocab_size=32, num_bins=16, num_layers=2, d_model=8, num_heads=2,
                      ffn_hidden=16, context_length=10, max_local_positions=10,
                      position_bins=4, patch_channels=4, patch_norm_groups=2, ffn="moe",
                      moe=MoEConfig(num_experts=4, top_k=1, granularity=2, moe_every=2,
                                    groups={"a": ["text", "image", "pad", "separator"],
                                            "b": ["discrete_obs", "continuous_obs",
                                                  "discrete_action", "continuous_action"]}))
    V = 32 + 16 + 2
    embed = V * 8 + (3 * 4 * 16 + 16 + 2 * 9 * 16 + 64 * 8) + (10 + 8 + 1) * 8
    layers = 2 * (4 * 64 + 2 * 8) + 8  # attention, two norms per layer, final norm
    dense_ffn = 2 * 8 * 16  # layer 0
    moe = 2 * (4 * 8 + 4 * 2 * 8 * 8)  # layer 1: per group router + 4 experts of hidden 8
    assert accounting.num_params(cfg) == build_model(cfg).num_params() == embed + layers + dense_ffn + moe
    assert accounting.num_non_embedding_params(cfg) == layers + dense_ffn + moe
    active = embed + layers + dense_ffn + (4 * 8 + 2 * 2 * 8 * 8)
    assert accounting.num_active_params(cfg) == active
    fwd = 2 * (2 * 4 * 64 + dense_ffn + 4 * 8 + 2 * 2 * 8 * 8 + 8 * V) + 2 * 4 * 10 * 8
    assert accounting.flops_per_token(cfg) == fwd
    assert accounting.flops_per_token(cfg, training=True) == 3 * fwd
    kinds = torch.tensor([Kind.IMAGE, Kind.TEXT, Kind.TEXT, Kind.TEXT])
    assert accounting.flops_per_token(cfg, kinds=kinds) == fwd + accounting.patch_flops(cfg) / 4
    assert math.isclose(accounting.mfu(cfg, 1000.0, 1e9), 3 * fwd * 1000 / 1e9)


def test_one_expert_top1_equals_dense_exactly():
    dense_cfg = tiny("tiny-dense", "ffn_hidden=512")
    moe_cfg = tiny("tiny-moe", "moe.num_experts=1", "moe.granularity=1", "moe.top_k=1")
    dense, moe = build_model(dense_cfg), build_model(moe_cfg)
    state = dense.state_dict()
    for i, block in enumerate(moe.blocks):
        for group in block.ffn.groups.values():
            state_fc1, state_fc2 = (state[f"blocks.{i}.ffn.fc1.weight"],
                                    state[f"blocks.{i}.ffn.fc2.weight"])
            group.w1_EDF.data.copy_(state_fc1.t().unsqueeze(0))
            group.w2_EFD.data.copy_(state_fc2.t().unsqueeze(0))
    moe.load_state_dict({k: v for k, v in state.items() if ".ffn." not in k}, strict=False)
    batch = make_batch(dense_cfg)
    dense.eval(), moe.eval()
    out_d, out_m = dense(batch), moe(batch)
    assert torch.equal(out_d.logits, out_m.logits)
    assert torch.equal(out_d.lm_loss, out_m.lm_loss)


def test_fine_grained_experts_sum_like_their_dense_ffn():
    """G = 2 experts of hidden F/2, both chosen with equal gates: the default gate scale
    (= G) makes them one dense FFN of hidden F split in halves; plain renormalized gates
    (routed_scale 1) gave half of it, the defect found in issue 10's MoE study."""
    dense_cfg = tiny("tiny-dense", "ffn_hidden=512")
    dense = build_model(dense_cfg).eval()
    batch = make_batch(dense_cfg)
    out = {}
    for scale in ("null", "1.0"):
        moe = build_model(tiny("tiny-moe", "moe.num_experts=2", "moe.granularity=2",
                               "moe.top_k=1", f"moe.routed_scale={scale}",
                               "moe.aux_loss_coef=0", "moe.z_loss_coef=0")).eval()
        state = dense.state_dict()
        for i, block in enumerate(moe.blocks):
            w1, w2 = state[f"blocks.{i}.ffn.fc1.weight"], state[f"blocks.{i}.ffn.fc2.weight"]
            for group in block.ffn.groups.values():
                group.router_ED.data.zero_()  # equal router probabilities: gates 1/2 each
                group.w1_EDF.data.copy_(w1.t().reshape(128, 2, 256).permute(1, 0, 2))
                group.w2_EFD.data.copy_(w2.t().reshape(2, 256, 128))
        moe.load_state_dict({k: v for k, v in state.items() if ".ffn." not in k}, strict=False)
        with torch.no_grad():
            out[scale] = moe(batch).logits
    with torch.no_grad():
        ref = dense(batch).logits
    torch.testing.assert_close(out["null"], ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out["1.0"], ref, rtol=1e-3, atol=1e-3)


def test_tokens_stay_in_their_group():
    cfg = tiny("tiny-moe", "moe.experts_per_group={image: 2, observation: 3}")
    model = build_model(cfg)
    batch = make_batch(cfg)
    out = model(batch)
    kinds_T = batch["kinds"].reshape(-1)
    assert len(out.routing) == cfg.num_layers
    for layer in out.routing:
        seen = torch.zeros_like(kinds_T, dtype=torch.bool)
        for name, r in layer.items():
            allowed = {Kind[k.upper()] for k in cfg.moe.groups[name]}
            assert set(kinds_T[r.token_index_t].tolist()) <= allowed
            assert r.expert_ids_tK.max() < cfg.moe.num_experts_of(name)
            assert r.expert_ids_tK.shape == (len(r.token_index_t), 2)
            assert not seen[r.token_index_t].any()
            seen[r.token_index_t] = True
        assert seen.all()  # every position routed, in exactly one group


@pytest.mark.parametrize("positions", ["none", "rope", "timestep_bias"])
@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe"])
def test_kv_cache_matches_full_forward(name, positions):
    cfg = tiny(name, f"positions={positions}")
    model = build_model(cfg).eval()
    batch = make_batch(cfg, batch=2, length=36)
    with torch.no_grad():
        full = model(batch).logits
        cache = model.new_cache()
        cuts = [0, 14, 15, 16, 23, 36]  # prefill, two single steps, chunks
        pieces = []
        for a, b in zip(cuts[:-1], cuts[1:]):
            # patches are in row-major (b, l) order: take the chunk's patches per row
            is_img = batch["kinds"] == Kind.IMAGE
            order = torch.cumsum(is_img.reshape(-1), 0).view_as(is_img) - 1
            idx = order[:, a:b][is_img[:, a:b]]
            chunk = {k: v[:, a:b] for k, v in batch.items() if k != "patches"}
            chunk["patches"] = batch["patches"][idx]
            pieces.append(model(chunk, cache=cache).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


def _control_batch(cfg, T=8, seed=0):
    """A prompt episode then an episode (3 continuous obs, 2 continuous actions a step)."""
    from moe_gato.tokenizer import GatoTokenizer

    tok = GatoTokenizer()
    rng = np.random.default_rng(seed)
    eps = [tok.tokenize_episode({"s": rng.uniform(-1, 1, (n, 3))}, rng.uniform(-1, 1, (n, 2)),
                                action_kind="continuous") for n in (3, T)]
    return collate([TokenSequence.concat(eps).pad_to(6 * (T + 3) + 4, cfg.layout)] * 2)


@pytest.mark.parametrize("positions", ["none", "rope", "timestep_bias"])
@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe"])
def test_hidden_past_actions_mask_and_cache(name, positions):
    """``past_actions="hide"``: later timesteps never see earlier actions (editing them
    changes nothing after), an action's next dimension still sees the first, the KV cache
    fed in chunks gives the full forward's logits, and Gato's "attend" does see them."""
    cfg = tiny(name, "past_actions=hide", f"positions={positions}")
    model = build_model(cfg).eval()
    batch = _control_batch(cfg)
    ts, kinds = batch["timestep"][0], batch["kinds"][0]
    is_act = (kinds == Kind.CONTINUOUS_ACTION)
    # positions of the episode's timestep 2 actions, and of everything from timestep 3 on
    ep_start = 3 * 6
    act2 = torch.nonzero(is_act & (ts == 2) & (torch.arange(len(ts)) >= ep_start)).squeeze(1)
    later = (torch.arange(len(ts)) >= int(act2[-1]) + 1) & (kinds != Kind.PAD)
    edited = {k: v.clone() for k, v in batch.items()}
    edited["tokens"][:, act2] = cfg.layout.continuous_start + 7
    with torch.no_grad():
        base, moved = model(batch).logits, model(edited).logits
        torch.testing.assert_close(base[:, later], moved[:, later], atol=1e-6, rtol=1e-6)
        assert not torch.allclose(base[:, act2[0]], moved[:, act2[0]])  # dim 1 sees dim 0
        cache, pieces = model.new_cache(), []
        cuts = [0, 11, 12, 13, 25, 26, 40, batch["tokens"].shape[1]]
        for a, b in zip(cuts[:-1], cuts[1:]):
            chunk = {k: v[:, a:b] for k, v in batch.items() if k != "patches"}
            chunk["patches"] = batch["patches"]
            pieces.append(model(chunk, cache=cache).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), base, atol=1e-5, rtol=1e-5)
    attend = build_model(tiny(name, f"positions={positions}")).eval()
    attend.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(attend(batch).logits[:, later], attend(edited).logits[:, later])


def test_loss_masked_as_tokenizer_says_and_router_grads():
    cfg = tiny("tiny-moe")
    model = build_model(cfg)
    batch = make_batch(cfg, batch=3, length=40)
    out = model(batch)
    logits, tokens, mask = out.logits[:, :-1], batch["tokens"][:, 1:], batch["loss_mask"][:, 1:]
    expected = torch.nn.functional.cross_entropy(logits[mask], tokens[mask])
    torch.testing.assert_close(out.lm_loss, expected)
    assert set(out.kind_losses) == {"text", "discrete_action", "continuous_action"}
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss + out.z_loss)
    # targets at unmasked positions do not matter: change them, the loss stays
    changed = dict(batch, tokens=batch["tokens"].clone())
    model.eval()
    ref = model(batch).lm_loss
    changed["tokens"][:, -1] = cfg.layout.pad_id - 3  # a padding position
    assert torch.equal(model(changed).lm_loss, ref)
    model.train()
    out.loss.backward()
    for i, block in enumerate(model.blocks):
        for name, group in block.ffn.groups.items():
            assert group.router_ED.grad is not None and group.router_ED.grad.abs().sum() > 0, (i, name)
            if i < len(model.blocks) - 1:  # last layer: image/obs outputs reach no target
                assert group.w1_EDF.grad.abs().sum() > 0


@pytest.mark.parametrize("name,tie", [("tiny-moe", "false"), ("tiny-dense", "false"),
                                      ("tiny-moe", "true")])
def test_head_at_the_targets_only_gives_the_same_loss_and_gradients(name, tie):
    """forward(logits="targets") runs the head only where a loss is taken, and
    forward(logits="fused") runs it with the cross-entropy in chunks: the losses, the
    per-kind sums and every gradient equal the full head's to float rounding, with a loss
    weighting too, with a tied head too; no logits are returned; a bad value is refused."""
    cfg = tiny(name, f"tie_embeddings={tie}")
    batch = make_batch(cfg, batch=3, length=40)
    g = torch.Generator().manual_seed(0)
    batch["loss_weight"] = torch.rand(batch["tokens"].shape, generator=g)
    outs, grads = {}, {}
    for mode in ("all", "targets", "fused"):
        torch.manual_seed(0)
        model = build_model(cfg)
        torch.manual_seed(1)  # the patch positions' draw
        outs[mode] = out = model(batch, logits=mode)
        out.loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    full = outs["all"]
    assert full.logits is not None
    assert ("head.weight" in grads["all"]) == (tie == "false")
    for mode in ("targets", "fused"):
        part = outs[mode]
        assert part.logits is None
        for field in ("loss", "lm_loss", "aux_loss", "z_loss", "kind_sums_K2"):
            torch.testing.assert_close(getattr(part, field), getattr(full, field), rtol=1e-5,
                                       atol=1e-6, msg=f"{mode} {field}")
        assert grads["all"].keys() == grads[mode].keys()
        for n, g in grads["all"].items():
            torch.testing.assert_close(grads[mode][n], g, rtol=1e-4, atol=1e-6, msg=f"{mode} {n}")
    with pytest.raises(ValueError, match="logits must be 'all', 'targets' or 'fused', got 'some'"):
        build_model(cfg)(batch, logits="some")


def test_dropless_drops_nothing_capacity_counts_drops():
    cfg = tiny("tiny-moe")
    model = build_model(cfg)
    out = model(make_batch(cfg, batch=2, length=40))
    for layer in out.routing:
        for r in layer.values():
            assert int(r.dropped) == 0 and int(r.load_E.sum()) == r.expert_ids_tK.numel()
    torch.manual_seed(0)
    T, K, E, D, Fh = 50, 2, 4, 8, 16
    x = torch.randn(T, D)
    ids = torch.stack([torch.zeros(T, dtype=torch.long), torch.randint(1, E, (T,))], 1)
    gates = torch.rand(T, K)
    w1, w2 = torch.randn(E, D, Fh), torch.randn(E, Fh, D)
    C = expert_capacity(T, K, E, 1.0)
    y, kept = expert_ffn(x, ids, gates, w1, w2, capacity=C, impl="torch")
    load = torch.bincount(ids.reshape(-1), minlength=E)
    assert int(ids.numel() - kept.sum()) == int((load - C).clamp(min=0).sum()) > 0
    # reference: an expert keeps its first C slots in (t, k) order
    ref = torch.zeros(T, D)
    used = [0] * E
    for t in range(T):
        for k in range(K):
            e = int(ids[t, k])
            if used[e] < C:
                used[e] += 1
                ref[t] += gates[t, k] * (torch.nn.functional.gelu(x[t] @ w1[e]) @ w2[e])
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    cap = build_model(tiny("tiny-moe", "moe.capacity_factor=0.5"))
    out = cap(make_batch(cfg, batch=2, length=40))
    for layer in out.routing:
        for r in layer.values():
            t = r.expert_ids_tK.shape[0]
            c = expert_capacity(t, 2, 4, 0.5)
            assert int(r.dropped) == int((r.load_E - c).clamp(min=0).sum())


def test_bias_balancing_moves_toward_underloaded():
    cfg = tiny("tiny-moe", "moe.bias_balancing=true", "moe.aux_loss_coef=0")
    model = build_model(cfg)
    out = model(make_batch(cfg))
    model.update_router_biases(out.routing)
    for block, layer in zip(model.blocks, out.routing):
        for name, r in layer.items():
            bias, load = block.ffn.groups[name].expert_bias_E, r.load_E.float()
            assert torch.equal(torch.sign(bias), torch.sign(load.mean() - load))


@pytest.mark.parametrize("overrides, field", [
    (["moe.top_k=3"], "top_k"),
    (["moe.experts_per_group={video: 2}"], "experts_per_group"),
    (["moe.groups={text: [text, pad]}"], "groups"),
    (["moe.groups={a: [text, bogus]}"], "groups"),
    (["num_heads=5"], "num_heads"),
    (["moe.granularity=3"], "granularity"),
    (["moe.capacity_factor=0"], "capacity_factor"),
    (["moe.impl=cuda"], "impl"),
    (["text_vocab_size=100"], "text_vocab_size"),
    (["d_model=0"], "d_model"),
    (["moe.bogus=1"], "bogus"),
    (["value_embedding=fourier"], "value_embedding"),
    (["moe.routed_scale=0"], "routed_scale"),
    (["past_actions=never"], "past_actions"),
    (["value_features=3"], "value_features"),
])
def test_bad_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny("tiny-moe", *overrides)


def test_smooth_value_embedding_shares_between_neighbouring_bins():
    """``value_embedding=smooth``: continuous bins start as a smooth function of the bin
    index (neighbours alike, far bins not), a gradient on one bin moves every bin through
    the shared basis, the tied head scores with the same rows, and the rest of the table
    is Gato's."""
    cfg = tiny("tiny-dense", "value_embedding=smooth", "num_layers=1")
    model = build_model(cfg)
    lo = cfg.layout.continuous_start
    bins = model.embed.weight()[lo:lo + cfg.num_bins].detach()
    cos = torch.nn.functional.cosine_similarity
    assert cos(bins[:-1], bins[1:]).mean() > 0.9
    assert cos(bins[:256], bins[-256:]).abs().mean() < 0.3
    assert (model.embed.tokens.weight[lo:lo + cfg.num_bins] == 0).all()
    assert torch.equal(model.embed.weight()[:lo], model.embed.tokens.weight[:lo])
    # one continuous observation token: the basis gets a gradient, and through it every bin
    batch = make_batch(cfg, batch=1, length=40)
    model(batch).loss.backward()
    assert model.embed.value_basis.grad.abs().sum() > 0
    table = tiny("tiny-dense", "num_layers=1")
    assert build_model(table).embed.value_basis is None and table.value_embedding == "table"
    # the head scores continuous actions with the smooth rows (tied embeddings)
    out = model(batch, compute_loss=False, last_only=True, id_range=(lo, lo + cfg.num_bins))
    model.embed.value_basis.data.zero_()
    out0 = model(batch, compute_loss=False, last_only=True, id_range=(lo, lo + cfg.num_bins))
    assert not torch.allclose(out.logits, out0.logits)


def test_scalar_value_embedding_adds_the_value_to_the_table():
    """``value_embedding=scalar``: every continuous bin's row is Gato's table row plus a
    learned map of tanh(s * v) of its value v; bins of opposite sign get opposite features,
    bins near 0 are told apart by the finest scale."""
    from moe_gato.model.model import scalar_features

    f = scalar_features(1024)
    assert f.shape == (1024, 5)
    torch.testing.assert_close(f[:512], -f.flip(0)[:512])       # odd in v
    assert f[511, -1] < -0.2 and f[512, -1] > 0.2 and abs(f[511, 0]) < 1e-2
    cfg = tiny("tiny-dense", "value_embedding=scalar", "num_layers=1")
    model = build_model(cfg)
    lo = cfg.layout.continuous_start
    table = model.embed.tokens.weight[lo:lo + cfg.num_bins]
    assert table.abs().sum() > 0                                   # Gato's table kept
    torch.testing.assert_close(model.embed.weight()[lo:lo + cfg.num_bins],
                               table + f @ model.embed.value_basis)


def test_checkpoint_roundtrip_and_bad_files(tmp_path):
    cfg = tiny("tiny-moe", "moe.bias_balancing=true")
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.blocks[0].ffn.groups["text"].expert_bias_E.fill_(0.5)
    save_checkpoint(model, tmp_path / "ck")
    loaded = load_checkpoint(tmp_path / "ck").eval()
    assert loaded.cfg == cfg
    batch = make_batch(cfg)
    assert torch.equal(model(batch).logits, loaded(batch).logits)
    # a checkpoint from before moe.routed_scale existed keeps the gates it was trained with
    config = (tmp_path / "ck" / "config.yaml").read_text()
    assert "routed_scale: null" in config
    (tmp_path / "ck" / "config.yaml").write_text(config.replace("  routed_scale: null\n", ""))
    legacy = load_checkpoint(tmp_path / "ck")
    assert legacy.cfg.moe.routed_scale == 1.0 and cfg.moe.gate_scale == 2.0
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "ck" / "config.yaml").write_text((tmp_path / "ck" / "config.yaml").read_text()
                                                 .replace("d_model: 128", "d_model: 64"))
    with pytest.raises(ValueError, match="shape"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"\x80\x04garbage-not-safetensors")
    with pytest.raises(ValueError, match="safetensors"):
        load_checkpoint(tmp_path / "ck")


def test_generate_restricts_ids_and_matches_greedy_forward():
    cfg = tiny("tiny-moe")
    model = build_model(cfg).eval()
    batch = make_batch(cfg, batch=2, length=30)
    lo, hi = cfg.layout.id_range(Kind.DISCRETE_ACTION)
    ids = model.generate(batch, 5, kind=Kind.DISCRETE_ACTION, num_choices=7,
                         generator=torch.Generator().manual_seed(0))
    assert ids.shape == (2, 5) and ((ids >= lo) & (ids < lo + 7)).all()
    lo, hi = cfg.layout.id_range(Kind.CONTINUOUS_ACTION)
    cache = model.new_cache()
    ids = model.generate(batch, 3, kind=Kind.CONTINUOUS_ACTION, temperature=0, cache=cache)
    assert cache.length == 30 + 3
    full = model(batch).logits[:, -1, lo:hi].argmax(-1) + lo
    assert torch.equal(ids[:, 0], full)
    with pytest.raises(ValueError, match="kind"):
        model.generate(batch, 1, kind=Kind.IMAGE)


@pytest.mark.parametrize("E,K,T,capacity", [(8, 2, 37, None), (4, 1, 16, None), (6, 3, 29, 5),
                                              (64, 4, 50, None)])
def test_fused_torch_expert_ffn_matches_kernel_path(E, K, T, capacity):
    """gemm='auto' (the fused autograd.Function) equals the kernels' grouped path, forward
    and backward, with empty experts, capacity drops and a non-contiguous input."""
    from moe_gato.model.dispatch import expert_ffn

    g = torch.Generator().manual_seed(E * 100 + K)
    D, F_ = 12, 20
    x = torch.randn(D, T, generator=g).t()  # non-contiguous (T, D)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids[ids == E - 1] = 0  # expert E-1 gets no tokens
    gates = torch.rand(T, K, generator=g)
    w1 = torch.randn(E, D, F_, generator=g) * 0.3
    w2 = torch.randn(E, F_, D, generator=g) * 0.3
    outs = []
    for gemm in ("auto", "grouped"):
        leaves = [t.clone().requires_grad_() for t in (x, gates, w1, w2)]
        y, kept = expert_ffn(leaves[0], ids, leaves[1], leaves[2], leaves[3], capacity=capacity,
                             impl="torch", gemm=gemm)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((y.detach(), kept, [t.grad for t in leaves]))
    (ya, ka, ga), (yb, kb, gb) = outs
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    assert torch.equal(ka, kb)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", sorted(PRESETS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_builds_on_the_meta_device(path):
    """A 1.18B MoE must be sizable without allocating it (``torch.device("meta")``): the
    model counts its parameters exactly as the accounting does, with no storage."""
    with torch.device("meta"):
        model = build_model(load_config(path, ["positions=rope"]))
    assert all(p.is_meta for p in model.parameters())
    assert model.num_params() == accounting.num_params(model.cfg)
