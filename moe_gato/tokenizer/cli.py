"""``moe-gato build-text-tokenizer``: trains the project's SentencePiece model.

    moe-gato build-text-tokenizer --vocab-size 8192 --out moe_gato/assets/text_8192.model
"""

from __future__ import annotations

import argparse

from moe_gato.tokenizer.text import DEFAULT_MODEL, DEFAULT_VOCAB_SIZE, file_digest, train_text_tokenizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                   help=f"number of SentencePiece pieces (default {DEFAULT_VOCAB_SIZE}; Gato: 32000)")
    p.add_argument("--out", default=str(DEFAULT_MODEL), help="where to write the .model file")
    p.add_argument("--resets-per-level", type=int, default=20,
                   help="BabyAI resets per level when sampling missions for the corpus")


def run(args: argparse.Namespace) -> int:
    out = train_text_tokenizer(args.out, args.vocab_size, args.resets_per_level)
    print(f"wrote {out} ({args.vocab_size} pieces, sha256 {file_digest(out)})")
    return 0
