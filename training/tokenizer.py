"""A CLIP-style BPE tokenizer for the caption grammar.

Trained with the ``tokenizers`` library (BPE with CLIP's ``</w>`` end-of-word suffix) on captions drawn
from :mod:`training.scenes`, with a vocabulary large enough that every grammar word becomes one token.
The output is a ``vocab.json`` + ``merges.txt`` pair that ``transformers.CLIPTokenizer`` loads directly,
with CLIP's ``<|startoftext|>`` / ``<|endoftext|>`` specials (``<|endoftext|>`` also pads). Words outside
the grammar fall back to characters, as in CLIP.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from kiln.training import scenes as sc

MAX_LENGTH = 32  # "<|startoftext|>" + the longest three-object caption (30 words) + "<|endoftext|>"
SPECIALS = ["<|startoftext|>", "<|endoftext|>"]


def corpus(n: int = 4000) -> list[str]:
    lines = [sc.caption(sc.make_scene(sc.stream_seed(sc.TRAIN_STREAM, i))) for i in range(n)]
    # make sure every word of the grammar appears, whatever n is
    lines.append(
        " ".join(
            [
                *sc.SHAPES,
                *sc.COLORS,
                *sc.BACKGROUNDS,
                *sc.SIZES,
                *sc.POSITIONS,
                "a",
                "at",
                "the",
                "in",
                "on",
                "and",
                "background",
            ]
        )
    )
    return lines


def train_tokenizer(out_dir: Path, vocab_size: int = 256) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` into ``out_dir`` and return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = list(string.ascii_lowercase + string.digits)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    bpe = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = bpe["vocab"]
    # every lone character also gets its end-of-word form, so any lowercase word can be spelled
    for ch in alphabet:
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    vocab_path, merges_path = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False, sort_keys=False) + "\n")
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_path, merges_path


def load(tok_dir: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=MAX_LENGTH)
