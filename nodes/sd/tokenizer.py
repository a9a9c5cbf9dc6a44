"""CLIP BPE tokenizers, built offline.

The standard 49,408-token CLIP vocabulary ships as ``configs/bpe_simple_vocab_16e6.txt.gz`` (MIT, OpenAI;
licence beside it). The vocabulary is derived from the merge list: 256 byte symbols, the same with the
end-of-word marker, one entry per merge, then the two special tokens.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"
BPE_FILE = CONFIG_DIR / "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49408 - 256 * 2 - 2


def byte_symbols() -> list[str]:
    """The printable stand-in character of each byte, in vocabulary order.

    Printable bytes stand for themselves and come first (in byte order); the other bytes are mapped to
    code points from 256 upwards and follow.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    rest = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(rest))]


@functools.lru_cache(maxsize=1)
def standard_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.open(BPE_FILE).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + N_MERGES]]
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def make_tokenizer(vocab: dict[str, int] | None = None, merges: list | None = None, pad_token: str | None = None):
    """A transformers CLIPTokenizer from a vocabulary and merge list (the standard one by default)."""
    from transformers import CLIPTokenizer

    if vocab is None:
        vocab, merges = standard_vocab()
    merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in merges]
    kw = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77, **kw)


def parse_merges_text(text: str) -> list[tuple[str, str]]:
    out = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#version"):
            continue
        a, b = line.split()
        out.append((a, b))
    return out


def tokenizer_from_text(vocab_json: str, merges_txt: str):
    return make_tokenizer(json.loads(vocab_json), parse_merges_text(merges_txt))


def tokenizer_to_text(tokenizer) -> tuple[str, str]:
    """(vocab.json text, merges.txt text) of a fast BPE tokenizer, for checkpoint metadata."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return json.dumps(model["vocab"], ensure_ascii=False), "#version: 0.2\n" + "\n".join(merges) + "\n"
