"""Gato's tokenization: text, images, discrete and continuous values, episodes, prompts.

See README.md ("Token layout") for the id ranges and a worked example.
"""

from moe_gato.tokenizer.episode import GatoTokenizer, flatten_observation
from moe_gato.tokenizer.images import images_to_patches
from moe_gato.tokenizer.layout import (ACTION_LOCAL_POS, KIND_NAMES, LOSS_KINDS, NUM_BINS,
                                       Kind, TokenSequence, VocabLayout, collate)
from moe_gato.tokenizer.pack import (draw_prompt_mode, make_training_sequence, pack_sequences,
                                     whole_timesteps)
from moe_gato.tokenizer.text import TextTokenizer, train_text_tokenizer
from moe_gato.tokenizer.values import (bin_centre, bin_index, continuous_to_tokens,
                                       discrete_to_tokens, mu_law_decode, mu_law_encode,
                                       tokens_to_continuous, tokens_to_discrete)

__all__ = [
    "ACTION_LOCAL_POS", "KIND_NAMES", "LOSS_KINDS", "NUM_BINS", "GatoTokenizer", "Kind",
    "TextTokenizer", "TokenSequence", "VocabLayout", "bin_centre", "bin_index", "collate",
    "continuous_to_tokens", "discrete_to_tokens", "draw_prompt_mode", "flatten_observation",
    "images_to_patches", "make_training_sequence", "mu_law_decode", "mu_law_encode",
    "pack_sequences", "tokens_to_continuous", "tokens_to_discrete", "train_text_tokenizer",
    "whole_timesteps",
]
