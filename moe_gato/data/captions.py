"""Non-control data: captioned images (vision-language) and text documents.

``vl/digits``  sklearn ``load_digits`` 8x8 images (0-16) upscaled to 16x16 uint8 (one
               patch), captions from the templates the text model was trained on.
``vl/babyai``  full-view BabyAI frames (64x64 RGB, 8-pixel tiles of an 8x8 room) after
               reset, captioned with their mission (a grounded caption).
``text/shakespeare``  the ``shakespeare`` package's Gutenberg texts, Gutenberg header and
               licence cut off, split into documents of about ``DOC_CHARS`` characters at
               paragraph boundaries; rows are ordered by play, so the validation split
               (the last rows) holds plays never seen in training.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

DOC_CHARS = 4000
BABYAI_CAPTION_LEVELS = ("BabyAI-GoToLocal-v0", "BabyAI-PickupLoc-v0", "BabyAI-PutNextLocal-v0",
                         "BabyAI-GoToRedBall-v0", "BabyAI-GoToObj-v0")


def digits_rows(n: int | None, seed: int) -> tuple[list[np.ndarray], list[str]]:
    from sklearn.datasets import load_digits

    from moe_gato.tokenizer.text import CAPTION_TEMPLATES, DIGIT_NAMES

    digits = load_digits()
    count = len(digits.images) if n is None else min(n, len(digits.images))
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for i in range(count):
        img = np.kron(digits.images[i], np.ones((2, 2)))  # (16, 16)
        images.append(np.round(img * (255.0 / 16.0)).astype(np.uint8))
        template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
        captions.append(template.format(name=DIGIT_NAMES[int(digits.target[i])]))
    return images, captions


def babyai_rows(n: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    import gymnasium as gym
    import minigrid  # noqa: F401
    from minigrid.wrappers import RGBImgObsWrapper

    envs = [RGBImgObsWrapper(gym.make(level), tile_size=8) for level in BABYAI_CAPTION_LEVELS]
    images, captions = [], []
    for i in range(n):
        env = envs[i % len(envs)]
        with contextlib.redirect_stdout(io.StringIO()):
            obs, _ = env.reset(seed=seed * 1_000_003 + i)
        images.append(np.ascontiguousarray(obs["image"], np.uint8))
        captions.append(obs["mission"])
    for env in envs:
        env.close()
    return images, captions


def _strip_gutenberg(text: str) -> str:
    lines = text.splitlines()
    start, end = 0, len(lines)
    for i, line in enumerate(lines):
        if line.startswith("*** START") or line.startswith("***START"):
            start = i + 1
        elif line.startswith("*** END") or line.startswith("***END") or \
                line.startswith("End of the Project Gutenberg") or \
                line.startswith("End of Project Gutenberg"):
            end = i
            break
    return "\n".join(lines[start:end]).strip()


def shakespeare_rows(max_documents: int | None = None) -> tuple[list[str], list[str]]:
    from moe_gato.tokenizer.text import shakespeare_files

    docs, texts = [], []
    for path in shakespeare_files():
        body = _strip_gutenberg(path.read_text(encoding="utf-8", errors="replace"))
        chunk: list[str] = []
        size = 0
        for para in body.split("\n\n"):
            chunk.append(para)
            size += len(para) + 2
            if size >= DOC_CHARS:
                docs.append(path.stem)
                texts.append("\n\n".join(chunk))
                chunk, size = [], 0
        if chunk and "".join(chunk).strip():
            docs.append(path.stem)
            texts.append("\n\n".join(chunk))
    if max_documents is not None:
        docs, texts = docs[:max_documents], texts[:max_documents]
    return docs, texts
