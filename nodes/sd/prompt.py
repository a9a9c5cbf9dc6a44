"""ComfyUI prompt syntax and CLIP text encoding.

Syntax: ``(text)`` multiplies the weight of its tokens by 1.1, ``(text:1.5)`` by 1.5, ``[text]`` divides
by 1.1; groups nest and multiply. ``\\(`` ``\\)`` ``\\[`` ``\\]`` are literal brackets. ``embedding:name``
inserts the vectors of a textual-inversion file from ``models/embeddings/``.

Encoding: tokens are cut into chunks of 75 (plus start/end tokens, padded to 77; shorter for text encoders
with fewer positions, such as the project's own small model); the chunks are encoded
in one batch and concatenated along the sequence, so long prompts keep every token. A token of weight
``w`` is moved away from the empty prompt's encoding at its position: ``z = z_empty + w * (z - z_empty)``
(ComfyUI's default weighting).
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.engine import NodeError

CHUNK = 75
_WEIGHT_RE = re.compile(r"^(.*):\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*$", re.S)
EMBEDDING_RE = re.compile(r"embedding:([^\s,()\[\]]+)")


class PromptError(NodeError, ValueError):
    """The prompt cannot be encoded (a missing or mismatched embedding); it names the ``text`` input by
    default, as CLIPTextEncode calls it."""

    def __init__(self, message: str, hint: str | None = None, *, input_name: str | None = "text"):
        super().__init__(message, input_name=input_name, hint=hint)


@dataclass
class _Group:
    kind: str  # "(" or "["
    items: list


def _tree(text: str, i: int, close: str | None) -> tuple[list, int]:
    items: list = []
    buf: list[str] = []

    def flush() -> None:
        if buf:
            items.append("".join(buf))
            buf.clear()

    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            buf.append(text[i + 1])
            i += 2
            continue
        if c in "([":
            flush()
            sub, i = _tree(text, i + 1, ")" if c == "(" else "]")
            items.append(_Group(c, sub))
            continue
        if close is not None and c == close:
            flush()
            return items, i + 1
        buf.append(c)
        i += 1
    flush()
    return items, i


def parse_weights(text: str) -> list[tuple[str, float]]:
    """``"a (b:1.5) [c]"`` -> ``[("a ", 1.0), ("b", 1.5), (" ", 1.0), ("c", 1/1.1)]`` (empty parts dropped)."""
    items, _ = _tree(text, 0, None)
    out: list[tuple[str, float]] = []

    def walk(nodes: list, weight: float) -> None:
        for n in nodes:
            if isinstance(n, str):
                if n:
                    out.append((n, weight))
                continue
            inner, w = list(n.items), 1.1
            if n.kind == "[":
                w = 1 / 1.1
            elif inner and isinstance(inner[-1], str):
                m = _WEIGHT_RE.match(inner[-1])
                if m:
                    w = float(m.group(2))
                    inner[-1] = m.group(1)
            walk(inner, weight * w)

    walk(items, 1.0)
    return out


# -- textual inversion ---------------------------------------------------------------------------------------


def load_embedding(path: Path, dim: int, key_hint: str | None = None) -> torch.Tensor:
    """The vectors ``[n, dim]`` of a textual-inversion file (A1111 .pt/.safetensors, ``emb_params``, SDXL keys)."""
    if path.suffix.lower() in (".safetensors", ".sft"):
        from safetensors.torch import load_file

        data = load_file(str(path))
    else:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    candidates: list[torch.Tensor] = []
    if isinstance(data, dict):
        if key_hint and key_hint in data:
            candidates.append(data[key_hint])
        if "string_to_param" in data and isinstance(data["string_to_param"], dict):
            candidates.extend(data["string_to_param"].values())
        candidates.extend(v for v in data.values() if isinstance(v, torch.Tensor))
    elif isinstance(data, torch.Tensor):
        candidates.append(data)
    for t in candidates:
        t = t.reshape(-1, t.shape[-1]) if t.ndim >= 1 else t
        if t.ndim == 2 and t.shape[-1] == dim:
            return t.float()
    shapes = [tuple(t.shape) for t in candidates]
    raise PromptError(
        f"embedding {path.name} has no vectors of size {dim} (found {shapes})",
        hint="the embedding was trained for another model family; use one made for this checkpoint",
    )


# -- tokenising ---------------------------------------------------------------------------------------------


@dataclass
class Token:
    id: int
    weight: float
    vector: torch.Tensor | None = None  # textual inversion


def tokenize(text: str, tokenizer, find_embedding: Callable[[str], torch.Tensor] | None) -> list[Token]:
    tokens: list[Token] = []
    for segment, weight in parse_weights(text):
        pos = 0
        for m in EMBEDDING_RE.finditer(segment):
            tokens += _plain(segment[pos : m.start()], weight, tokenizer)
            if find_embedding is None:
                raise PromptError("textual inversion is not available here")
            vecs = find_embedding(m.group(1))
            filler = tokenizer.eos_token_id
            tokens += [Token(filler, weight, v) for v in vecs]
            pos = m.end()
        tokens += _plain(segment[pos:], weight, tokenizer)
    return tokens


def _plain(text: str, weight: float, tokenizer) -> list[Token]:
    if not text.strip():
        return []
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [Token(i, weight) for i in ids]


def chunk(tokens: list[Token], bos: int, eos: int, pad: int, length: int = CHUNK + 2) -> list[list[Token]]:
    """Chunks of ``length`` tokens: start, up to 75 prompt tokens, end, padding; at least one chunk."""
    body = length - 2
    groups = [tokens[i : i + body] for i in range(0, len(tokens), body)] or [[]]
    out = []
    for g in groups:
        row = [Token(bos, 1.0)] + g + [Token(eos, 1.0)]
        row += [Token(pad, 1.0)] * (length - len(row))
        out.append(row)
    return out


# -- encoding ---------------------------------------------------------------------------------------------


def _eos_positions(rows: list[list[Token]], eos: int) -> list[int]:
    pos = []
    for row in rows:
        ids = [t.id for t in row]
        # the end token that closes the prompt: after the start token, the first eos without a vector
        idx = next(i for i in range(1, len(row)) if ids[i] == eos and row[i].vector is None)
        pos.append(idx)
    return pos


def encode_rows(
    text_encoder, rows: list[list[Token]], layer: int, final_norm: bool, eos: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states ``[chunks, 77, D]`` of the chosen layer and the pooled (projected if available) output."""
    device = next(text_encoder.parameters()).device
    ids = torch.tensor([[t.id for t in row] for row in rows], device=device)
    overrides = [(r, c, t.vector) for r, row in enumerate(rows) for c, t in enumerate(row) if t.vector is not None]
    hook = None
    if overrides:

        def replace(module, args, output):
            output = output.clone()
            for r, c, v in overrides:
                output[r, c] = v.to(output.dtype)
            return output

        hook = text_encoder.get_input_embeddings().register_forward_hook(replace)
    try:
        out = text_encoder(input_ids=ids, output_hidden_states=True)
    finally:
        if hook is not None:
            hook.remove()
    tm = text_encoder.text_model if hasattr(text_encoder, "text_model") else text_encoder
    if layer == -1:
        hidden = out.hidden_states[-1]
        hidden = tm.final_layer_norm(hidden) if final_norm else hidden
    else:
        hidden = out.hidden_states[layer]
        if final_norm:
            hidden = tm.final_layer_norm(hidden)
    # pooled output: the final-layer state at the end token (projected when the model has a projection)
    last = tm.final_layer_norm(out.hidden_states[-1])
    eos_pos = _eos_positions(rows, eos)
    pooled = last[torch.arange(len(rows), device=device), torch.tensor(eos_pos, device=device)]
    if hasattr(text_encoder, "text_projection"):
        pooled = text_encoder.text_projection(pooled)
    return hidden.float(), pooled.float()


def encode_weighted(
    text_encoder,
    tokenizer,
    text: str,
    layer: int,
    final_norm: bool,
    find_embedding: Callable[[str], torch.Tensor] | None,
    pad_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([1, L * chunks, D], [1, P])`` for one prompt with ComfyUI weighting (L = 77 for CLIP)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = eos if pad_id is None else pad_id
    # chunks as long as the encoder's positions allow: 77 for CLIP, less for small custom encoders
    length = min(CHUNK + 2, int(getattr(text_encoder.config, "max_position_embeddings", CHUNK + 2)))
    rows = chunk(tokenize(text, tokenizer, find_embedding), bos, eos, pad, length)
    weighted = any(t.weight != 1.0 for row in rows for t in row)
    all_rows = rows + (chunk([], bos, eos, pad, length) if weighted else [])
    with torch.inference_mode():
        hidden, pooled = encode_rows(text_encoder, all_rows, layer, final_norm, eos)
    if weighted:
        empty = hidden[-1:]
        hidden = hidden[:-1]
        w = torch.tensor([[t.weight for t in row] for row in rows], dtype=hidden.dtype, device=hidden.device)
        hidden = empty + (hidden - empty) * w[..., None]
    return hidden.reshape(1, -1, hidden.shape[-1]).cpu(), pooled[:1].cpu()


# -- words the tokenizer does not know -------------------------------------------------------------------
# CLIP's real BPE reads any text: its alphabet is all 256 bytes and a rare word is spelled from sub-word
# pieces the encoder was trained on, so nothing is "unknown". A tokenizer trained on a closed vocabulary
# (the shipped kiln-shapes model's caption grammar: a-z and digits only, every grammar word one token) also
# spells any word from letters, but its encoder has never seen those spellings: they are noise to it.
# For such a tokenizer a word is known when it is a whole-word token ("red</w>") that no merge uses as the
# tail of a longer word ("le</w>" is a piece of "circle</w>", not a word of the grammar). Single letters
# are not judged (a closed vocabulary keeps every letter as a token, whether or not it is a word).

_WORD_RE = re.compile(r"[^\W_]+")
_known_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def known_words(tokenizer) -> frozenset[str] | None:
    """The whole words a closed-vocabulary tokenizer knows, or ``None`` for an open (byte-level) BPE, whose
    every word is readable. Cached per tokenizer object."""
    try:
        return _known_cache[tokenizer]
    except (KeyError, TypeError):
        pass
    from kiln.nodes.sd.tokenizer import byte_symbols

    vocab = tokenizer.get_vocab()
    known: frozenset[str] | None = None
    if not all(s in vocab for s in byte_symbols()):
        tails = set()
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            for m in json.loads(backend.to_str())["model"].get("merges", []):
                tails.add((m.split() if isinstance(m, str) else m)[-1])
        known = frozenset(t[:-4] for t in vocab if t.endswith("</w>") and len(t) > 5 and t not in tails)
    try:
        _known_cache[tokenizer] = known
    except TypeError:  # not weakly referenceable: computed again next time
        pass
    return known


def unknown_words(text: str, tokenizer) -> list[str]:
    """Words of a prompt (weights and ``embedding:`` names aside) a closed-vocabulary tokenizer does not know,
    in order, each once; always empty for an open BPE such as CLIP's."""
    known = known_words(tokenizer)
    if known is None:
        return []
    out: list[str] = []
    for segment, _ in parse_weights(text):
        for word in _WORD_RE.findall(EMBEDDING_RE.sub(" ", segment).lower()):
            if len(word) > 1 and word not in known and word not in out:
                out.append(word)
    return out


def unknown_words_warning(tokenizers, text: str) -> str | None:
    """CLIPTextEncode's warning naming the prompt's words that its tokenizers (one per text encoder) do not
    know, with the words they do know when there are few, or ``None``. Only closed-vocabulary tokenizers
    (the shipped kiln-shapes model's) can say so; CLIP's BPE never does. The prompt is still encoded."""
    words: list[str] = []
    vocabulary: set[str] = set()
    for tok in tokenizers:
        words += [w for w in unknown_words(text, tok) if w not in words]
        vocabulary |= known_words(tok) or set()
    if not words:
        return None
    hint = f" It knows: {', '.join(sorted(vocabulary))}." if 0 < len(vocabulary) <= 100 else ""
    return f"words this model's tokenizer does not know, read as noise: {', '.join(words)}.{hint}"
