"""Position signals in attention (``ModelConfig.positions``): a synthetic task that needs the
present, coordinates that separate a prompt from its episode, the rolling KV cache after
eviction, numerics over very long episodes, old checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from moe_gato.envs import TASKS, make_control_task, run_episode
from moe_gato.inference import Policy, PolicyActor
from moe_gato.model import ModelConfig, build_model, load_checkpoint, load_config, save_checkpoint
from moe_gato.model.positions import Rotary, coordinates, rotate, step_slopes, timestep_starts
from moe_gato.tokenizer import GatoTokenizer, TokenSequence, collate
from moe_gato.tokenizer.layout import ACTION_LOCAL_POS, Kind

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "model"
POSITIONS = ("none", "rope", "timestep_bias")


# ---------------------------------------------------------- a task that needs the present
def _present_batch(rng: np.random.Generator, B: int, T: int, layout) -> dict:
    """T timesteps of (one discrete observation in [0, 8), '|', action): the action is a
    fixed function of the current observation only, observations are drawn afresh."""
    obs_BT = rng.integers(0, 8, (B, T))
    cols = {"tokens": [obs_BT, np.full((B, T), layout.separator_id), (obs_BT * 3 + 1) % 4],
            "kinds": [Kind.DISCRETE_OBS, Kind.SEPARATOR, Kind.DISCRETE_ACTION],
            "local_pos": [0, ACTION_LOCAL_POS, ACTION_LOCAL_POS]}
    out = {}
    for name, parts in cols.items():
        parts = [np.broadcast_to(np.asarray(p), (B, T)) for p in parts]
        out[name] = torch.from_numpy(np.stack(parts, 2).reshape(B, 3 * T).astype(np.int64))
    out["loss_mask"] = out["kinds"] == Kind.DISCRETE_ACTION
    out["timestep"] = torch.arange(T).repeat_interleave(3)[None].expand(B, -1).clone()
    out["image_rc"], out["patches"] = torch.zeros(B, 3 * T, 4), torch.zeros(0, 3, 16, 16)
    return out


@pytest.mark.parametrize("positions", POSITIONS)
def test_synthetic_task_needs_the_present(positions):
    """32 timesteps in context, the action a function of the current observation: without a
    position signal attention can only average over the past (accuracy far from 1); rotary
    positions or the timestep bias fit it in 150 small steps."""
    torch.manual_seed(0)
    cfg = ModelConfig(text_vocab_size=1024, num_layers=2, d_model=64, num_heads=4,
                      ffn_hidden=128, context_length=96, max_local_positions=8,
                      patch_channels=8, positions=positions, past_actions="hide")
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    rng = np.random.default_rng(0)
    for _ in range(150):
        loss = model(_present_batch(rng, 8, 32, cfg.layout)).lm_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    batch = _present_batch(np.random.default_rng(99), 32, 32, cfg.layout)
    with torch.no_grad():
        logits_BTA = model.eval()(batch).logits[:, 1::3, :4]  # at each '|', the 4 actions
    accuracy = float((logits_BTA.argmax(-1) == batch["tokens"][:, 2::3]).float().mean())
    if positions == "none":
        assert accuracy < 0.75
    else:
        assert accuracy > 0.99


# ------------------------------------------------------------------------ coordinates
def test_coordinates_count_valid_positions_and_timesteps():
    kinds = torch.tensor([[Kind.PAD, Kind.DISCRETE_OBS, Kind.DISCRETE_OBS, Kind.SEPARATOR,
                           Kind.DISCRETE_ACTION, Kind.CONTINUOUS_OBS, Kind.SEPARATOR]])
    local = torch.tensor([[0, 0, 1, -1, -1, 0, -1]])
    valid = torch.tensor([[False, True, True, True, True, True, True]])
    starts = timestep_starts(kinds, local)
    assert starts.tolist() == [[False, True, False, False, False, True, False]]
    pos, step = coordinates(starts, valid)
    assert pos[0, 1:].tolist() == [0, 1, 2, 3, 4, 5] and step[0, 1:].tolist() == [0, 0, 0, 0, 1, 1]
    pos, step = coordinates(starts, valid, torch.tensor([9]), torch.tensor([4]))
    assert pos[0, 1:].tolist() == list(range(10, 16)) and step[0, -1] == 6


@pytest.mark.parametrize("positions", POSITIONS)
def test_prompt_end_and_episode_start_with_one_label_stay_two_timesteps(positions):
    """A prompt ending at stored timestep 5 before a window starting at stored timestep 5:
    with past actions hidden, the prompt's last action must stay hidden from the window's
    first timestep (a label change alone merged the two)."""
    cfg = load_config(PRESETS / "tiny-dense.yaml", ["past_actions=hide",
                                                    f"positions={positions}"])
    tok = GatoTokenizer()
    rng = np.random.default_rng(0)
    ep = tok.tokenize_episode({"s": rng.uniform(-1, 1, (8, 3))}, rng.integers(0, 2, 8),
                              action_kind="discrete")
    starts = np.flatnonzero(np.diff(ep.timestep, prepend=-1))
    prompt, window = ep.slice(0, int(starts[6])), ep.slice(int(starts[5]), len(ep))
    assert prompt.timestep[-1] == window.timestep[0] == 5
    batch = collate([TokenSequence.concat([prompt, window])])
    last_prompt_action = len(prompt) - 1
    first_step = slice(len(prompt), len(prompt) + 5)  # the window's observation and '|'
    edited = {k: v.clone() for k, v in batch.items()}
    edited["tokens"][0, last_prompt_action] = 1 - edited["tokens"][0, last_prompt_action]
    model = build_model(cfg).eval()
    with torch.no_grad():
        base, moved = model(batch).logits, model(edited).logits
    torch.testing.assert_close(base[:, first_step], moved[:, first_step], atol=0, rtol=0)


def test_step_slopes():
    s = step_slopes(4)
    assert s[0] == 0 and s[1] == 8 and torch.all(s[1:-1] > s[2:]) and s[-1] == pytest.approx(1 / 32)
    assert step_slopes(1).tolist() == [0.0]


# --------------------------------------------------------------------------- numerics
def test_rotary_scores_depend_on_distance_only_at_a_million_positions():
    """An Atari game of 27,000 steps of ~40 tokens reaches position ~1.08M: float64 angles
    keep the score of a query and key 7 apart what it is at the start; float32 angles
    would not (the check below shows the difference it guards against)."""
    rope = Rotary(32, 10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 32, generator=g), torch.randn(1, 1, 1, 32, generator=g)

    def score(p_q: int, p_k: int, theta_dtype=torch.float64) -> float:
        if theta_dtype == torch.float64:
            cq, sq = rope.cos_sin(torch.tensor([[p_q]]))
            ck, sk = rope.cos_sin(torch.tensor([[p_k]]))
        else:
            inv = (10000.0 ** (-torch.arange(16, dtype=torch.float32) / 16))
            cq, sq = ((torch.tensor([[p_q]], dtype=torch.float32)[..., None] * inv).cos()[:, None],
                      (torch.tensor([[p_q]], dtype=torch.float32)[..., None] * inv).sin()[:, None])
            ck, sk = ((torch.tensor([[p_k]], dtype=torch.float32)[..., None] * inv).cos()[:, None],
                      (torch.tensor([[p_k]], dtype=torch.float32)[..., None] * inv).sin()[:, None])
        return float((rotate(q, cq, sq) * rotate(k, ck, sk)).sum())

    near = score(7, 0)
    far = 1_080_000
    assert score(far + 7, far) == pytest.approx(near, rel=1e-5, abs=1e-5)
    assert abs(score(far + 7, far, torch.float32) - near) > 1e-3


# ----------------------------------------------------------------- the rolling cache
def _one_layer(positions: str, past_actions: str = "hide"):
    """A one-layer model: the keys and values of a position depend on that token alone,
    so a rolling cache after eviction must give exactly the recomputed window's outputs
    when it numbers the kept positions as the window does."""
    torch.manual_seed(0)
    cfg = load_config(PRESETS / "tiny-moe.yaml", ["num_layers=1", f"positions={positions}",
                                                  f"past_actions={past_actions}",
                                                  "context_length=64", "init_std=0.2"])
    return build_model(cfg).eval()


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("prompted", [False, True])
def test_cache_after_eviction_equals_recompute(positions, prompted):
    """60 CartPole steps in a context of 40 (6 tokens a step, a prompt of one step): the
    cache evicts ~50 timesteps; its greedy actions equal the recomputed window's, and
    the coordinates of its live slots are those of that window."""
    from moe_gato.envs import ExpertActor

    model = _one_layer(positions)
    env = make_control_task(TASKS["classic/CartPole-v1"])
    env.max_steps = 60
    demo = run_episode(env, ExpertActor(), 5) if prompted else None
    actions = {}
    for use_cache in (True, False):
        policy = Policy(model, use_cache=use_cache, context_length=40, prompt_share=0.2)
        policy.reset(env, prompt=demo)
        raw, acts = env.reset(1), []
        for t in range(60):
            acts.append(policy.act(env.observe(raw)))
            raw = env.step(env.expert_action(raw))[0]  # expert drives: 60 steps, same states
            if use_cache and t > 10:
                valid, pos, step = (x[0] for x in policy.cache.live_coordinates())
                n = int(valid.sum())
                live_pos, live_step = pos[valid], step[valid]
                # contiguous numbers: as a window of n positions numbers them
                assert torch.equal(live_pos - live_pos[0], torch.arange(n))
                assert int(live_step[-1] - live_step[0]) + 1 == n // 6 + 1  # whole steps
        actions[use_cache] = acts
    np.testing.assert_array_equal(actions[True], actions[False])


@pytest.mark.parametrize("positions", ["rope", "timestep_bias"])
def test_cache_far_into_an_episode_acts_as_at_its_start(positions):
    """Shifting every coordinate of a live cache by 1,080,000 (where a 27,000-step Atari
    game ends) changes no action: only distances reach attention."""
    model = build_model(load_config(PRESETS / "tiny-moe.yaml", [
        f"positions={positions}", "past_actions=hide", "context_length=64"])).eval()
    env = make_control_task(TASKS["classic/CartPole-v1"])
    env.max_steps = 40
    runs = []
    for shift in (0, 1_080_000):
        policy = Policy(model, context_length=64)
        policy.reset(env)
        raw, acts = env.reset(2), []
        for t in range(40):
            if t == 3 and shift:
                c = policy.cache
                c.slot_pos_BC += shift
                c.slot_step_BC += shift
                c.pos_B += shift
                c.step_B += shift
                if c.rotary is not None:
                    cos, sin = c.rotary.cos_sin(torch.full_like(c.slot_pos_BC, shift))
                    for i, k in enumerate(c.k):
                        c.k[i] = rotate(k, cos[..., :k.shape[2], :], sin[..., :k.shape[2], :])
            acts.append(policy.act(env.observe(raw)))
            raw = env.step(env.expert_action(raw))[0]
        runs.append(acts)
    assert int(policy.cache.pos_B) > 1_080_000
    np.testing.assert_array_equal(runs[0], runs[1])


# ------------------------------------------------------------------ configs, checkpoints
def test_checkpoint_saved_before_positions_loads_as_none(tmp_path):
    model = build_model(load_config(PRESETS / "tiny-dense.yaml"))
    save_checkpoint(model, tmp_path / "ck")
    config = tmp_path / "ck" / "config.yaml"
    saved = yaml.safe_load(config.read_text())
    saved.pop("positions")
    saved.pop("rope_base")
    config.write_text(yaml.safe_dump(saved))
    (tmp_path / "ck" / "checksums.json").unlink(missing_ok=True)
    with pytest.warns(UserWarning):
        loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.cfg.positions == "none"


def test_position_config_errors():
    with pytest.raises(ValueError, match="positions must be"):
        ModelConfig(positions="alibi")
    with pytest.raises(ValueError, match="even head width"):
        ModelConfig(d_model=60, num_heads=4, positions="rope")
    with pytest.raises(ValueError, match="rope_base"):
        ModelConfig(positions="rope", rope_base=0.5)
