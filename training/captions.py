"""Partial captions: the caption grammar with any attribute left out, a parser, and scenes that fit a prompt.

The full caption (:func:`training.scenes.caption`) states everything: ``a small green square at the top left
on a white background``. A newcomer types less: ``a red circle``, ``red circle on black``, ``a small square at
the bottom``. This module words a scene with any subset of its attributes in the phrasings the grammar
allows, and reads such a prompt back:

* an object phrase is ``[a] [small|large] [colour] <shape> [at the <position> | in the center | at the
  center]``; the shape is the phrase's noun and always said (the tokenizer knows no word like "object");
* objects are joined by ``and``: the number of phrases is the object count (the vocabulary has no numerals
  or plurals, so a count is said only this way, and one phrase means exactly one object);
* the background is an optional tail: ``on a <bg> background``, ``on <bg>`` or ``on a <bg>``.

Every word used is one the shipped tokenizer already has as a whole word, so the v2 fine-tune keeps the v1
tokenizer and text encoder shape. :func:`parse` returns a :class:`Prompt` (what is stated; ``None`` for
what is left open) or ``None`` when the text is outside the grammar. :func:`partial_caption` draws a random
wording of a scene (what the v2 fine-tune trains on); :func:`scene_for` draws a scene that satisfies a
prompt, with every open attribute sampled (the "real" reference for the evaluator's partial checks and its
diversity figure).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from kiln.training import scenes as sc

OBJECT_ATTRIBUTES = ("color", "shape", "size", "position")


@dataclass(frozen=True)
class ObjSpec:
    """What a prompt says about one object; ``None``: left open."""

    shape: str
    color: str | None = None
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class Prompt:
    """What a prompt states: its objects (their number is the count) and the background (or ``None``)."""

    objects: tuple[ObjSpec, ...]
    background: str | None = None

    @property
    def count(self) -> int:
        return len(self.objects)

    def stated(self) -> set[str]:
        """The attribute names stated for any object, plus ``background`` when it is said."""
        out = {a for o in self.objects for a in OBJECT_ATTRIBUTES if getattr(o, a) is not None}
        if self.background is not None:
            out.add("background")
        return out

    def is_full(self) -> bool:
        return self.background is not None and all(
            getattr(o, a) is not None for o in self.objects for a in OBJECT_ATTRIBUTES
        )


# ---------------------------------------------------------------- wording


def where_phrase(position: str, variant: int = 0) -> str:
    """``at the top left``; the centre as ``in the center`` (variant 0) or ``at the center``."""
    if position == "center":
        return "in the center" if variant == 0 else "at the center"
    return f"at the {position}"


def background_phrase(background: str, variant: int = 0) -> str:
    """``on a white background`` (0), ``on white`` (1), ``on a white`` (2)."""
    return (f"on a {background} background", f"on {background}", f"on a {background}")[variant]


def object_words(spec: ObjSpec, article: bool = True, where_variant: int = 0) -> str:
    words = ["a"] if article else []
    words += [w for w in (spec.size, spec.color) if w is not None]
    words.append(spec.shape)
    if spec.position is not None:
        words.append(where_phrase(spec.position, where_variant))
    return " ".join(words)


def render_prompt(p: Prompt, article: bool = True, where_variant: int = 0, background_variant: int = 0) -> str:
    """Words for a :class:`Prompt`; with all the defaults a full prompt reads exactly as ``scenes.caption``."""
    text = " and ".join(object_words(o, article, where_variant) for o in p.objects)
    if p.background is not None:
        text += " " + background_phrase(p.background, background_variant)
    return text


def full_prompt(scene: sc.Scene) -> Prompt:
    objs = tuple(ObjSpec(o.shape, o.color, o.size, o.position) for o in scene.objects)
    return Prompt(objs, scene.background)


# Training mix: a quarter of the captions stay full (the v1 wording), the rest keep each attribute with
# probability KEEP (the shape always), in a random wording and object order.
FULL_FRACTION = 0.25
KEEP = 0.5


def random_prompt(scene: sc.Scene, rng: np.random.Generator, keep: float = KEEP, min_open: int = 0) -> Prompt:
    """A partial :class:`Prompt` of ``scene``: each attribute kept with probability ``keep``, objects in a
    random order; with ``min_open`` > 0 redrawn until at least that many attributes are left open."""
    while True:
        objs = []
        for o in scene.objects:
            k = rng.random(3) < keep
            objs.append(
                ObjSpec(o.shape, o.color if k[0] else None, o.size if k[1] else None, o.position if k[2] else None)
            )
        order = rng.permutation(len(objs))
        bg = scene.background if rng.random() < keep else None
        p = Prompt(tuple(objs[i] for i in order), bg)
        n_open = sum(getattr(o, a) is None for o in p.objects for a in OBJECT_ATTRIBUTES) + (bg is None)
        if n_open >= min_open:
            return p


def random_wording(p: Prompt, rng: np.random.Generator) -> str:
    return render_prompt(
        p,
        article=bool(rng.random() < 0.8),
        where_variant=int(rng.random() < 0.3),
        background_variant=int(rng.choice(3, p=(0.6, 0.25, 0.15))),
    )


def partial_caption(scene: sc.Scene, rng: np.random.Generator) -> str:
    """One training caption: the full v1 caption with probability FULL_FRACTION, else a partial wording."""
    if rng.random() < FULL_FRACTION:
        return sc.caption(scene)
    return random_wording(random_prompt(scene, rng), rng)


# ---------------------------------------------------------------- parsing

_ALT = "|".join
_OBJ_RE = re.compile(
    rf"^(?:an? )?(?:({_ALT(sc.SIZES)}) )?(?:({_ALT(sc.COLORS)}) )?({_ALT(sc.SHAPES)})"
    rf"(?: (?:at|in) the ({_ALT(sorted(sc.POSITIONS, key=len, reverse=True))}))?$"
)
_BG_RE = re.compile(rf"(?:^| )on (?:an? )?({_ALT(sc.BACKGROUNDS)})(?: background)?$")


def normalise(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def parse(text: str) -> Prompt | None:
    """What a prompt in the grammar states, or ``None`` when it is not in the grammar.

    >>> parse("red circle on black")
    Prompt(objects=(ObjSpec(shape='circle', color='red', size=None, position=None),), background='black')
    """
    s = normalise(text)
    background = None
    m = _BG_RE.search(s)
    if m:
        background = m.group(1)
        s = s[: m.start()].strip()
    if not s:
        return None
    objs = []
    for part in s.split(" and "):
        om = _OBJ_RE.match(part.strip())
        if om is None:
            return None
        size, color, shape, position = om.groups()
        objs.append(ObjSpec(shape, color, size, position))
    return Prompt(tuple(objs), background)


# ---------------------------------------------------------------- scenes that fit a prompt


def scene_for(p: Prompt, rng: np.random.Generator, max_tries: int = 500) -> sc.Scene:
    """A scene that satisfies ``p`` exactly (its count, every stated attribute), open attributes drawn
    uniformly, objects placed as :func:`training.scenes.make_scene` places them."""
    background = p.background or str(rng.choice(list(sc.BACKGROUNDS)))
    for _ in range(max_tries):
        objs: list[sc.Obj] = []
        for spec in p.objects:
            size = spec.size or str(rng.choice(list(sc.SIZES)))
            position = spec.position or str(rng.choice(sc.POSITIONS))
            if not all(sc._cells_compatible(position, o.position, size == "large", o.size == "large") for o in objs):
                break
            color = spec.color or str(rng.choice(list(sc.COLORS)))
            x, y = sc.position_xy(position)
            objs.append(
                sc.Obj(
                    spec.shape,
                    color,
                    size,
                    position,
                    float(x + rng.uniform(-sc.JITTER, sc.JITTER)),
                    float(y + rng.uniform(-sc.JITTER, sc.JITTER)),
                    float(sc.SIZES[size] + rng.uniform(-sc.SIZE_JITTER, sc.SIZE_JITTER)),
                )
            )
        if len(objs) == len(p.objects):
            return sc.Scene(tuple(objs), background)
    raise ValueError(f"no scene fits {render_prompt(p)!r} (objects too close together)")


# ---------------------------------------------------------------- held-out partial prompts


def eval_prompts(n: int, two_object_share: float = 0.2, stream: int = sc.EVAL_STREAM, start: int = 0) -> list[Prompt]:
    """The held-out partial prompts: from the evaluation seed stream, one object (``two_object_share`` of
    them two), each leaving at least one attribute open. ``stream`` and ``start`` draw another set the same
    way (the validation set: :data:`VALIDATION_START` on the training stream)."""
    out = []
    for i in range(start, start + n):
        rng = np.random.default_rng([stream, 16, i])
        n_obj = 2 if rng.random() < two_object_share else 1
        scene = sc.make_scene(sc.stream_seed(stream, 500_000 + i), n_objects=n_obj)
        out.append(random_prompt(scene, rng, min_open=1))
    return out


def eval_wordings(prompts: list[Prompt], stream: int = sc.EVAL_STREAM, start: int = 0) -> list[str]:
    """A fixed random wording per held-out prompt (so the benchmark reads the phrasing variants too)."""
    return [random_wording(p, np.random.default_rng([stream, 17, start + i])) for i, p in enumerate(prompts)]


# The validation set the training stages were chosen on (training/README.md): training-stream seeds from here,
# which no latent pool uses, so the benchmark's held-out prompts stay unseen by every choice made.
VALIDATION_START = 40_000_000
