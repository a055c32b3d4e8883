"""Gato's tokenization rules, checked against hand-computed values and real episodes."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from moe_gato.tokenizer import (ACTION_LOCAL_POS, GatoTokenizer, Kind, TokenSequence,
                                VocabLayout, bin_centre, bin_index, collate, continuous_to_tokens,
                                discrete_to_tokens, images_to_patches, make_training_sequence,
                                mu_law_decode, mu_law_encode, pack_sequences,
                                tokens_to_continuous)

LOG_MU_M = math.log(256 * 100 + 1)  # log(M mu + 1) = log(25601)


@pytest.fixture(scope="module")
def tok():
    return GatoTokenizer()


# ---------------------------------------------------------------- mu-law and bins
@pytest.mark.parametrize("x, expected", [
    (0.0, 0.0),
    (1.0, math.log(101) / LOG_MU_M),            # 0.45475...
    (-1.0, -math.log(101) / LOG_MU_M),
    (0.5, math.log(51) / LOG_MU_M),
    (10.0, math.log(1001) / LOG_MU_M),
    (256.0, 1.0),                                 # log(25601)/log(25601)
    (1e6, 1.0),                                   # clipped
    (-1e6, -1.0),
])
def test_mu_law_known_values(x, expected):
    assert mu_law_encode(np.array([x], np.float64))[0] == pytest.approx(expected, abs=1e-12)
    assert float(mu_law_encode(torch.tensor([x], dtype=torch.float64))[0]) == pytest.approx(expected, abs=1e-12)


def test_mu_law_hand_number():
    # F(1) = ln(101) / ln(25601) = 4.61512 / 10.15038 = 0.454674
    assert mu_law_encode(np.float64(1.0)) == pytest.approx(0.454674, abs=1e-6)


def test_mu_law_decode_inverts_encode():
    x = np.linspace(-256, 256, 2001)
    np.testing.assert_allclose(mu_law_decode(mu_law_encode(x)), x, rtol=1e-9, atol=1e-9)
    xt = torch.linspace(-256, 256, 2001, dtype=torch.float64)
    torch.testing.assert_close(mu_law_decode(mu_law_encode(xt)), xt, rtol=1e-9, atol=1e-9)


def test_bins_edges_and_centres():
    y = np.array([-1.0, -1.0 + 2 / 1024 - 1e-12, -1.0 + 2 / 1024, 0.0, 1.0 - 1e-12, 1.0])
    np.testing.assert_array_equal(bin_index(y), [0, 0, 1, 512, 1023, 1023])
    np.testing.assert_allclose(bin_centre(np.array([0, 512, 1023])),
                               [-1 + 1 / 1024, 1 / 1024, 1 - 1 / 1024])


def test_continuous_tokens_shift_past_text_vocab():
    layout = VocabLayout(text_vocab_size=32000)
    ids = continuous_to_tokens(np.array([0.0, 1e9, -1e9]), layout)
    np.testing.assert_array_equal(ids, [32000 + 512, 32000 + 1023, 32000])
    # Gato's continuous range is exactly [32000, 33024)
    assert layout.id_range(Kind.CONTINUOUS_OBS) == (32000, 33024)
    # decode: bin centre through the inverse mu-law
    back = tokens_to_continuous(np.array([32000 + 512]), layout)
    assert back[0] == pytest.approx(mu_law_decode(1 / 1024), rel=1e-12)


def test_numpy_and_torch_agree():
    layout = VocabLayout()
    x = np.random.default_rng(0).normal(0, 30, size=1000)
    a = continuous_to_tokens(x, layout)
    b = continuous_to_tokens(torch.from_numpy(x), layout).numpy()
    np.testing.assert_array_equal(a, b)


def test_vocab_layouts():
    shared = VocabLayout(text_vocab_size=8192)
    assert shared.id_range(Kind.DISCRETE_OBS) == (0, 1024)
    assert shared.id_range(Kind.CONTINUOUS_ACTION) == (8192, 9216)
    assert (shared.separator_id, shared.pad_id, shared.vocab_size) == (9216, 9217, 9218)
    sep = VocabLayout(text_vocab_size=8192, discrete_offset="separate")
    assert sep.id_range(Kind.DISCRETE_ACTION) == (8192, 9216)
    assert sep.id_range(Kind.CONTINUOUS_OBS) == (9216, 10240)
    assert sep.vocab_size == 10242
    np.testing.assert_array_equal(discrete_to_tokens(np.array([0, 5, 1023]), sep), [8192, 8197, 9215])
    with pytest.raises(ValueError, match="discrete_offset"):
        VocabLayout(discrete_offset="elsewhere")
    with pytest.raises(ValueError, match="text_vocab_size"):
        VocabLayout(text_vocab_size=100)


# ---------------------------------------------------------------- images
def test_patches_raster_order_scaling_and_intervals():
    # a 32x48 image whose 2x3 patches are filled with their raster index
    img = np.zeros((1, 32, 48, 3), np.uint8)
    for r in range(2):
        for c in range(3):
            img[0, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = r * 3 + c
    patches, rc = images_to_patches(img)
    assert patches.shape == (1, 6, 3, 16, 16)
    expected = (np.arange(6) * 2 / 255 - 1) / 4
    np.testing.assert_allclose(patches[0].reshape(6, -1).mean(1), expected, rtol=1e-6)
    np.testing.assert_allclose(rc[4], [0.5, 1.0, 1 / 3, 2 / 3])
    full = images_to_patches(np.full((1, 16, 16, 1), 255, np.uint8))[0]
    np.testing.assert_allclose(full, 0.25)  # 255 -> 1 -> 1/4, grey copied to 3 channels
    np.testing.assert_allclose(images_to_patches(np.zeros((1, 16, 16), np.uint8))[0], -0.25)


def test_padding_of_odd_sides():
    img = np.full((2, 20, 7, 3), 255, np.uint8)
    patches, rc = images_to_patches(img)
    assert patches.shape == (2, 2, 3, 16, 16)  # 2 rows x 1 column after padding to 32x16
    assert patches[0, 1, :, 4:, :].max() == pytest.approx(-0.25)  # padded rows are black
    assert patches[0, 1, :, :4, :7].min() == pytest.approx(0.25)
    np.testing.assert_allclose(rc, [[0, 16 / 20, 0, 1], [16 / 20, 1, 0, 1]])


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 16), np.uint8), "must be"),
    (np.zeros((1, 16, 16, 2), np.uint8), "1 or 3 channels"),
    (np.full((1, 16, 16, 3), 2.0, np.float32), r"\[0, 1\]"),
    (np.zeros((1, 16, 16, 3), np.int32), "uint8 or float"),
])
def test_bad_images(bad, match):
    with pytest.raises(ValueError, match=match):
        images_to_patches(bad, "cam")


# ---------------------------------------------------------------- episodes
def test_episode_layout_order_and_masks(tok):
    T = 3
    obs = {"z": np.arange(T, dtype=np.int64),                     # discrete, last key
           "a": {"y": np.full((T, 2), 0.0, np.float32),          # nested: a/x then a/y
                 "x": np.ones((T, 1), np.int64)},
           "m": ["go"] * T}
    actions = np.array([[1], [2], [3]])
    seq = tok.tokenize_episode(obs, actions, action_kind="discrete")
    n_go = len(tok.text.encode("go"))
    per_step = 1 + 2 + n_go + 1 + 1 + 1  # a/x, a/y, m, z, separator, action
    assert len(seq) == T * per_step
    step = slice(0, per_step)
    expected_kinds = ([Kind.DISCRETE_OBS] + [Kind.CONTINUOUS_OBS] * 2 + [Kind.TEXT] * n_go
                      + [Kind.DISCRETE_OBS, Kind.SEPARATOR, Kind.DISCRETE_ACTION])
    np.testing.assert_array_equal(seq.kinds[step], expected_kinds)
    L = tok.layout
    np.testing.assert_array_equal(seq.tokens[:3], [1, L.continuous_start + 512, L.continuous_start + 512])
    assert seq.tokens[per_step - 2] == L.separator_id
    np.testing.assert_array_equal(seq.tokens[per_step - 1::per_step], [1, 2, 3])
    np.testing.assert_array_equal(seq.local_pos[step],
                                  list(range(per_step - 2)) + [ACTION_LOCAL_POS] * 2)
    np.testing.assert_array_equal(seq.loss_mask[step], [k in (Kind.TEXT, Kind.DISCRETE_ACTION)
                                                        for k in expected_kinds])
    np.testing.assert_array_equal(seq.timestep, np.repeat(np.arange(T), per_step))
    # the z value (timestep index) sits right before the separator
    np.testing.assert_array_equal(seq.tokens[per_step - 3::per_step], [0, 1, 2])


def test_list_of_dicts_equals_dict_of_arrays(tok):
    rng = np.random.default_rng(0)
    steps = [{"pos": rng.normal(size=3), "flag": np.array([t % 2]), "img": rng.integers(0, 255, (16, 32, 3), dtype=np.uint8)}
             for t in range(4)]
    stacked = {k: np.stack([s[k] for s in steps]) for k in steps[0]}
    act = rng.uniform(-1, 1, (4, 2))
    a = tok.tokenize_episode(steps, act, action_kind="continuous", spec={"img": "image"})
    b = tok.tokenize_episode(stacked, act, action_kind="continuous", spec={"img": "image"})
    for name in ("tokens", "kinds", "local_pos", "loss_mask", "timestep", "image_rc", "patches"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    # flag, img (2 patches), pos (3), sep, 2 actions
    assert len(a) == 4 * (1 + 2 + 3 + 1 + 2)
    assert a.patches.shape == (8, 3, 16, 16)
    img_pos = np.flatnonzero(a.kinds == Kind.IMAGE)
    np.testing.assert_array_equal(a.local_pos[img_pos[:2]], [1, 2])
    np.testing.assert_allclose(a.image_rc[img_pos[1]], [0, 1, 0.5, 1])


def test_ragged_text_observations(tok):
    missions = ["go", "go to the red ball", "pick up a key"]
    seq = tok.tokenize_episode({"mission": missions, "d": np.zeros(3, np.int64)},
                               np.zeros(3, np.int64), action_kind="discrete")
    for t, m in enumerate(missions):
        sel = (seq.timestep == t) & (seq.kinds == Kind.TEXT)
        np.testing.assert_array_equal(seq.tokens[sel], tok.text.encode(m))
        np.testing.assert_array_equal(seq.local_pos[seq.timestep == t][:-2],
                                      np.arange(1 + len(tok.text.encode(m))))


def test_text_document_and_caption(tok):
    doc = tok.tokenize_text("To be, or not to be, that is the question.")
    assert doc.loss_mask.all() and (doc.kinds == Kind.TEXT).all()
    assert tok.text.decode(doc.tokens) == "To be, or not to be, that is the question."
    cap = tok.tokenize_caption(np.zeros((8, 8), np.uint8), "the digit seven")
    assert list(cap.kinds[:1]) == [Kind.IMAGE]
    assert cap.patches.shape == (1, 3, 16, 16)
    assert tok.text.decode(cap.tokens[1:]) == "the digit seven"
    np.testing.assert_array_equal(cap.loss_mask, [False] + [True] * (len(cap) - 1))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("obs, actions, kind, match", [
    ({"pos": np.array([[0.0], [np.nan]])}, [0, 1], "discrete", "'pos'.*finite"),
    ({"pos": np.array([[np.inf], [0.0]])}, [0, 1], "discrete", "'pos'.*finite"),
    ({"grid": np.array([[3], [1024]])}, [0, 1], "discrete", r"'grid'.*\[0, 1024\)"),
    ({"grid": np.array([[-1], [0]])}, [0, 1], "discrete", r"'grid'.*\[0, 1024\)"),
    ({"pos": np.zeros((3, 2))}, [0, 1], "discrete", "'pos'.*leading axis"),
    ({"c": np.array([[1 + 2j], [0]])}, [0, 1], "discrete", "'c'.*dtype"),
    ({"o": np.array([[object()], [object()]])}, [0, 1], "discrete", "'o'.*dtype"),
    ({"pos": np.zeros((2, 1))}, [0.5, 1.0], "discrete", "action.*integers"),
    ({"pos": np.zeros((2, 1))}, [[np.nan], [0.0]], "continuous", "action.*finite"),
    ({"pos": np.zeros((2, 1))}, [7, 2000], "discrete", r"action.*\[0, 1024\)"),
    ({"pos": np.zeros((0, 1))}, np.zeros(0, np.int64), "discrete", "empty"),
    ({"pos": np.zeros((2, 1))}, [0, 1], "joystick", "action_kind"),
    ({"m": ["go", 3]}, [0, 1], "discrete", "'m'.*str"),
])
def test_bad_episodes_name_the_key(tok, obs, actions, kind, match):
    with pytest.raises(ValueError, match=match):
        tok.tokenize_episode(obs, np.asarray(actions), action_kind=kind)


def test_bad_spec_and_image_rank(tok):
    with pytest.raises(ValueError, match="spec"):
        tok.tokenize_episode({"p": np.zeros((2, 1))}, [0, 1], action_kind="discrete",
                             spec={"p": "audio"})
    with pytest.raises(ValueError, match="'cam'.*image stack"):
        tok.tokenize_episode({"cam": np.zeros((2, 4), np.uint8)}, [0, 1], action_kind="discrete",
                             spec={"cam": "image"})
    with pytest.raises(ValueError, match="empty"):
        tok.tokenize_episode([], [], action_kind="discrete")
    with pytest.raises(ValueError, match="timestep 1"):
        tok.tokenize_episode([{"a": 1}, {"b": 1}], [0, 1], action_kind="discrete")


# ---------------------------------------------------------------- properties
_leaf = st.one_of(
    hnp.arrays(np.float32, st.tuples(st.integers(1, 4)),
               elements=st.floats(-1e4, 1e4, width=32)),
    hnp.arrays(np.int64, st.tuples(st.integers(1, 4)), elements=st.integers(0, 1023)),
)
_nested = st.recursive(st.dictionaries(st.text("abcxyz", min_size=1, max_size=3), _leaf,
                                       min_size=1, max_size=3),
                       lambda kids: st.dictionaries(st.text("abcxyz", min_size=1, max_size=3),
                                                    kids, min_size=1, max_size=3),
                       max_leaves=6)


def _repeat_obs(obs, T):
    return {k: _repeat_obs(v, T) if isinstance(v, dict) else np.stack([v] * T) for k, v in obs.items()}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(obs=_nested, T=st.integers(1, 5), A=st.integers(1, 6), data=st.data())
def test_property_ids_in_range_and_actions_round_trip(tok, obs, T, A, data):
    layout = tok.layout
    cont = data.draw(hnp.arrays(np.float64, (T, A), elements=st.floats(-300, 300)))
    seq = tok.tokenize_episode(_repeat_obs(obs, T), cont, action_kind="continuous")
    for kind in Kind:
        sel = seq.kinds == kind
        if sel.any() and kind != Kind.IMAGE:
            lo, hi = layout.id_range(kind)
            assert seq.tokens[sel].min() >= lo and seq.tokens[sel].max() < hi, kind
    ids = seq.tokens[seq.kinds == Kind.CONTINUOUS_ACTION].reshape(T, A)
    back = tok.detokenize_actions(ids, "continuous", A)
    # within one bin in the mu-law domain (half a bin width from the centre)
    err = np.abs(mu_law_encode(back) - mu_law_encode(cont))
    assert err.max() <= 1 / 1024 + 1e-9
    disc = data.draw(hnp.arrays(np.int64, (T, A), elements=st.integers(0, 1023)))
    seq = tok.tokenize_episode(_repeat_obs(obs, T), disc, action_kind="discrete")
    ids = seq.tokens[seq.kinds == Kind.DISCRETE_ACTION].reshape(T, A)
    np.testing.assert_array_equal(tok.detokenize_actions(ids, "discrete", A), disc)


# ---------------------------------------------------------------- prompts and packing
def _episode(tok, value, T=40):
    return tok.tokenize_episode({"v": np.full((T, 10), value, np.int64)}, np.arange(T) % 5,
                                action_kind="discrete")


def test_prompt_fractions_and_modes(tok):
    main, demo = _episode(tok, 3), _episode(tok, 7, T=200)  # demo: 200 * 12 tokens > budget
    rng = np.random.default_rng(0)
    n, prompted, ends = 4000, 0, 0
    last_step = int(demo.timestep.max())
    for _ in range(n):
        s = make_training_sequence(main, [demo], rng, context_len=256, layout=tok.layout)
        assert len(s) == 256
        if s.tokens[0] == 7:
            prompted += 1
            ends += int(s.timestep[s.tokens == 7].max() == last_step)  # window reaches the end
    # binomial(4000, 0.25): sd = 27; half of the prompts come from the episode end
    # (a uniform window reaches the end with probability 1/190, so ~0.5 of prompts)
    assert abs(prompted - 1000) < 4 * 27
    assert abs(ends / prompted - 0.5) < 0.06


def test_windows_start_on_timestep_boundaries_and_pad(tok):
    ep = _episode(tok, 3, T=100)
    rng = np.random.default_rng(1)
    for _ in range(50):
        s = make_training_sequence(ep, [], rng, context_len=128, layout=tok.layout)
        assert s.kinds[0] == Kind.DISCRETE_OBS and s.local_pos[0] == 0
    short = make_training_sequence(_episode(tok, 3, T=2), [], rng, context_len=64, layout=tok.layout)
    assert (short.kinds[24:] == Kind.PAD).all() and not short.loss_mask[24:].any()
    assert (short.tokens[24:] == tok.layout.pad_id).all()


def _whole_timesteps(s) -> bool:
    """Every timestep run of ``s`` (pads aside) starts with an observation at local
    position 0 and ends with an action: no timestep is cut."""
    real = s.kinds != Kind.PAD
    ts, kinds = s.timestep[real], s.kinds[real]
    cuts = np.flatnonzero(np.diff(ts) != 0) + 1
    firsts, lasts = np.concatenate([[0], cuts]), np.concatenate([cuts - 1, [len(ts) - 1]])
    obs = (Kind.DISCRETE_OBS, Kind.CONTINUOUS_OBS, Kind.TEXT, Kind.IMAGE)
    acts = (Kind.DISCRETE_ACTION, Kind.CONTINUOUS_ACTION)
    return bool(np.isin(kinds[firsts], obs).all() and (s.local_pos[real][firsts] == 0).all()
                and np.isin(kinds[lasts], acts).all())


def test_long_timesteps_are_never_cut(tok):
    """A 171-token timestep (BabyAI's size) at context 256: a prompt of half the context
    cannot hold one, so the sequence is not prompted; no sequence is without targets."""
    long_ep = tok.tokenize_episode({"v": np.full((30, 169), 3, np.int64)}, np.arange(30) % 5,
                                   action_kind="discrete")
    assert len(long_ep) == 30 * 171
    rng = np.random.default_rng(0)
    for mode in ("draw", "end", "uniform"):
        for _ in range(100):
            info = {}
            s = make_training_sequence(long_ep, [long_ep], rng, context_len=256, prompt_prob=1.0,
                                       layout=tok.layout, prompt_mode=mode, info=info)
            assert info["prompt_mode"] is None and info["prompt_span"] == (0, 0)
            assert s.loss_mask.sum() == 1 and _whole_timesteps(s)
    # at 512 the prompt holds one whole timestep and the window the next two
    for mode in ("end", "uniform"):
        info = {}
        s = make_training_sequence(long_ep, [long_ep], rng, context_len=512, layout=tok.layout,
                                   prompt_mode=mode, info=info)
        assert info["prompt_mode"] == mode and np.diff(info["prompt_span"])[0] == 171
        assert np.diff(info["episode_span"])[0] == 171 and _whole_timesteps(s)
        if mode == "end":
            assert info["prompt_span"] == (29 * 171, 30 * 171)
    with pytest.raises(ValueError, match="171 tokens does not fit the context of 128"):
        make_training_sequence(long_ep, [], rng, context_len=128, layout=tok.layout)
    with pytest.raises(ValueError, match="prompt_mode"):
        make_training_sequence(long_ep, [], rng, context_len=512, prompt_mode="start")


def test_windows_are_whole_timesteps(tok):
    ep = _episode(tok, 3, T=100)  # 12-token timesteps: windows of 120 out of 128
    rng = np.random.default_rng(2)
    for _ in range(200):
        info = {}
        s = make_training_sequence(ep, [ep], rng, context_len=128, prompt_prob=0.5,
                                   layout=tok.layout, info=info)
        assert _whole_timesteps(s)
        a, b = info["episode_span"]
        assert a % 12 == 0 and b % 12 == 0 and b > a
        assert (s.kinds[-8:] == Kind.PAD).all()  # 120 or 60 + 60 positions of timesteps


def test_pack_sequences_and_collate(tok):
    seqs = [_episode(tok, 1, T=3), _episode(tok, 2, T=5), _episode(tok, 4, T=30)]
    packed = pack_sequences(seqs, context_len=128, layout=tok.layout)
    assert all(len(p) == 128 for p in packed)
    assert sum(int((p.kinds != Kind.PAD).sum()) for p in packed) == sum(len(s) for s in seqs)
    batch = collate(packed)
    assert batch["tokens"].shape == (len(packed), 128) and batch["tokens"].dtype == torch.int64
    assert batch["image_rc"].shape == (len(packed), 128, 4) and batch["patches"].shape[0] == 0
    with pytest.raises(ValueError, match="one length"):
        collate([packed[0], packed[0].slice(0, 5)])


def test_token_sequence_slice_keeps_patches(tok):
    img = np.random.default_rng(0).integers(0, 255, (3, 32, 16, 3), dtype=np.uint8)
    seq = tok.tokenize_episode({"img": img}, [0, 1, 2], action_kind="discrete", spec={"img": "image"})
    part = seq.slice(4, 9)  # timestep 1: 2 patches, sep, action; then timestep 2's first patch
    assert part.patches.shape[0] == 3
    np.testing.assert_array_equal(part.patches[0], seq.patches[2])


# ---------------------------------------------------------------- real environments
def test_real_babyai_timestep(tok):
    from moe_gato.demo import expert_episode

    episode, env = expert_episode("babyai/BabyAI-GoToRedBall-v0", seed=3)
    assert episode.episode_return > 0.5
    obs = {k: v for k, v in episode.observations.items() if env.obs_spec[k].modality != "image"}
    seq = tok.tokenize_episode(obs, episode.actions, action_kind="discrete")
    mission = tok.text.encode(obs["mission"][0])
    per_step = 1 + 147 + len(mission) + 1 + 1  # direction, 7x7x3 grid, mission, '|', action
    assert len(seq) == len(episode) * per_step
    assert seq.tokens[0] == obs["direction"][0]
    np.testing.assert_array_equal(seq.tokens[1:148], np.asarray(obs["grid"][0]).reshape(-1))
    np.testing.assert_array_equal(seq.tokens[per_step - 1::per_step], episode.actions)


def test_real_metaworld_timestep(tok):
    from moe_gato.demo import expert_episode

    episode, env = expert_episode("metaworld/reach-v3", seed=0)
    (key,) = episode.observations
    state = np.asarray(episode.observations[key])
    seq = tok.tokenize_episode(episode.observations, episode.actions, action_kind="continuous")
    assert len(seq) == len(episode) * (39 + 1 + 4)
    np.testing.assert_array_equal(seq.tokens[:39], continuous_to_tokens(state[0], tok.layout))
    back = tok.detokenize_actions(seq.tokens[seq.kinds == Kind.CONTINUOUS_ACTION].reshape(-1, 4),
                                  "continuous", 4)
    err = np.abs(mu_law_encode(back) - mu_law_encode(episode.actions.astype(np.float64)))
    assert err.max() <= 1 / 1024 + 1e-9


def test_shipped_text_model_is_reproducible(tmp_path):
    from moe_gato.tokenizer.text import DEFAULT_MODEL, file_digest, train_text_tokenizer

    out = train_text_tokenizer(tmp_path / "text.model")
    assert file_digest(out) == file_digest(DEFAULT_MODEL)


def test_token_sequence_checks_lengths():
    with pytest.raises(ValueError, match="kinds"):
        TokenSequence(tokens=np.zeros(3, np.int64), kinds=np.zeros(2, np.int8),
                      local_pos=np.zeros(3, np.int32), loss_mask=np.zeros(3, bool),
                      timestep=np.zeros(3, np.int32), image_rc=np.zeros((3, 4), np.float32),
                      patches=np.zeros((0, 3, 16, 16), np.float32))
