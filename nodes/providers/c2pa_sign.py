"""Signed C2PA manifests in Kiln's outputs, through the official bindings (``c2pa-python``, extra ``c2pa``).

A saver with ``embed_provenance`` on asks :func:`signer_for` once per run for a signing function; with a key
and certificate chain configured, every PNG, JPEG or WebP it writes goes through it and comes out with a
signed manifest store that any C2PA reader (``kiln provenance``, c2patool, contentcredentials.org) verifies.

What the manifest says is read from the graph that ran (the hidden PROMPT), traced upstream of the saver
(:mod:`.c2pa_trace`):

- ``c2pa.created`` with IPTC's ``trainedAlgorithmicMedia`` for generated images; ``c2pa.opened`` plus
  ``c2pa.edited`` with the loaded image as the ``parentOf`` ingredient for img2img, inpaint, outpaint and
  provider edits (``compositeWithTrainedAlgorithmicMedia`` when only part of the image was regenerated);
  ControlNet hint images are ``inputTo`` ingredients;
- ``dev.kiln.generation``: checkpoint (file name and SHA-256), LoRAs, ControlNets, or the provider and model
  id; seeds, samplers, steps, CFG; the SHA-256 of the graph (the graph itself only with
  ``c2pa.include_graph: true``, since it may hold private prompts);
- an image a provider returned with its own C2PA manifest (gpt-image-1, Imagen) and saved unchanged keeps
  that manifest as its parent ingredient (:func:`remember_source`, fed by ``imageio.decode``).

Configuration (Kiln's config file, section ``c2pa``; the environment wins)::

    c2pa:
      key: ~/.config/kiln/c2pa-key.pem      # KILN_C2PA_KEY: PEM private key (EC P-256/384/521, RSA, Ed25519)
      certs: ~/.config/kiln/c2pa-certs.pem  # KILN_C2PA_CERTS: signing certificate first, then its CA chain
      key_password_env: KILN_C2PA_KEY_PASSWORD   # only for an encrypted key
      alg: es256                            # default: from the key type
      tsa_url: http://timestamp.digicert.com     # KILN_C2PA_TSA_URL; optional RFC 3161 time stamps
      include_graph: false
      thumbnail: 256                        # long edge of the embedded thumbnail; 0: none
      trust_anchors: ~/ca.pem               # KILN_C2PA_TRUST_ANCHORS: CAs `kiln provenance` trusts

The key is read from its file at signing time, added to the redaction set, and never enters the graph,
history, events or logs.

One module of ~500 lines: the configuration, the key, the manifest, signing and reading are one path that
changes together (the graph trace it reads is :mod:`.c2pa_trace`).
"""

from __future__ import annotations

import collections
import datetime as _dt
import functools
import io
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiln.engine import NodeError

from . import config
from .c2pa_trace import Trace, file_sha256, graph_sha256, trace  # noqa: F401  (re-exported)

log = logging.getLogger("kiln.provenance")

SOURCE_GENERATED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
SOURCE_COMPOSITE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
SOURCE_EDITED = "http://cv.iptc.org/newscodes/digitalsourcetype/digitalCreation"
LABEL = "dev.kiln.generation"
MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "JPG": "image/jpeg", "WEBP": "image/webp"}
_ALGS = {"es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519"}


def kiln_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kiln")
    except PackageNotFoundError:
        return "0+unknown"


def available() -> bool:
    """True when the ``c2pa`` package (``pip install -e '.[c2pa]'``) imports."""
    try:
        import c2pa  # noqa: F401
    except Exception:  # ImportError, or its native library failing to load
        return False
    return True


# -- configuration --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SigningConfig:
    key_path: Path
    certs_path: Path
    alg: str | None
    tsa_url: str | None
    include_graph: bool
    thumbnail: int
    password_env: str | None = None
    extra: dict = field(default_factory=dict, repr=False)


def settings() -> dict:
    """The ``c2pa`` section of Kiln's config file."""
    return config.section("c2pa")


def _path(v: Any) -> Path | None:
    return Path(os.path.expandvars(str(v))).expanduser() if v else None


def signing_config() -> SigningConfig | None:
    """Where the key and chain are, or None when no key is configured. A NodeError when only half is."""
    s = settings()
    key = _path(os.environ.get("KILN_C2PA_KEY") or s.get("key"))
    certs = _path(os.environ.get("KILN_C2PA_CERTS") or s.get("certs"))
    if key is None and certs is None:
        return None
    where = f"set KILN_C2PA_KEY and KILN_C2PA_CERTS, or c2pa.key and c2pa.certs in {config.config_path()}"
    if key is None or certs is None:
        raise NodeError(
            f"C2PA signing needs a key and a certificate chain; only the {'certs' if key is None else 'key'} is set",
            hint=where,
        )
    for what, p in (("key", key), ("certificate chain", certs)):
        if not p.is_file():
            raise NodeError(f"the C2PA signing {what} file {p} does not exist", hint=where)
    alg = os.environ.get("KILN_C2PA_ALG") or s.get("alg")
    if alg and str(alg).lower() not in _ALGS:
        raise NodeError(f"c2pa.alg {alg!r} is not a C2PA signing algorithm", hint=f"use one of {sorted(_ALGS)}")
    thumb = s.get("thumbnail", 256)
    return SigningConfig(
        key_path=key,
        certs_path=certs,
        alg=str(alg).lower() if alg else None,
        tsa_url=os.environ.get("KILN_C2PA_TSA_URL") or s.get("tsa_url") or None,
        include_graph=bool(s.get("include_graph", False)),
        thumbnail=0 if thumb is False else int(256 if thumb is True else thumb or 0),
        password_env=s.get("key_password_env") or "KILN_C2PA_KEY_PASSWORD",
    )


def status() -> str | None:
    """None when outputs will be signed, else why not (for ``kiln validate`` and the run-time warning)."""
    try:
        cfg = signing_config()
    except NodeError as exc:
        return str(exc)
    if cfg is None:
        return (
            "no C2PA signing key is configured, so outputs carry no C2PA manifest (set KILN_C2PA_KEY and "
            f"KILN_C2PA_CERTS, or c2pa.key and c2pa.certs in {config.config_path()})"
        )
    if not available():
        return "the c2pa package is not installed, so outputs carry no C2PA manifest (pip install -e '.[c2pa]')"
    return None


_warned = threading.Event()


def warn_unsigned_once(reason: str) -> None:
    """A log warning, once per process, that provenance is asked for but nothing will be signed."""
    if not _warned.is_set():
        _warned.set()
        log.warning("embed_provenance is on but %s", reason)


def _remember_secret(pem: bytes) -> None:
    """The key's text and each base64 line of it join the redaction set (config.redact)."""
    text = pem.decode("ascii", "replace")
    config.add_secret(text.strip())
    body = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("-----")]
    config.add_secret("".join(body))
    config.add_secret(*(ln for ln in body if len(ln) >= 16))


@functools.lru_cache(maxsize=4)
def _load_key(path: str, stamp: tuple[int, int], password_env: str | None) -> tuple[bytes, str]:
    """(unencrypted PEM, algorithm) of the key file; cached by (mtime, size)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    pem = Path(path).read_bytes()
    _remember_secret(pem)
    password = os.environ.get(password_env or "") or None
    try:
        key = serialization.load_pem_private_key(pem, password=password.encode() if password else None)
    except (ValueError, TypeError) as exc:
        raise NodeError(
            f"the C2PA signing key {path} cannot be read ({type(exc).__name__})",
            hint="give an unencrypted PEM private key, or set its password in the variable named by "
            "c2pa.key_password_env (default KILN_C2PA_KEY_PASSWORD)",
        ) from None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        alg = {256: "es256", 384: "es384", 521: "es512"}.get(key.curve.key_size, "es256")
    elif isinstance(key, rsa.RSAPrivateKey):
        alg = "ps256"
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        alg = "ed25519"
    else:
        raise NodeError(f"the C2PA signing key {path} is a {type(key).__name__}; use EC, RSA or Ed25519")
    plain = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _remember_secret(plain)
    return plain, alg


def _stamp(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_mtime_ns, st.st_size


def _c2pa_context(thumbnail: int = 0, trust_anchors: bytes | None = None) -> Any:
    import c2pa

    s: dict[str, Any] = {
        "builder": {
            "thumbnail": {"enabled": bool(thumbnail), "long_edge": max(16, thumbnail or 256), "quality": "medium"}
        }
    }
    if trust_anchors:
        s["verify"] = {"verify_trust": True}
        s["trust"] = {"trust_anchors": trust_anchors.decode("utf-8", "replace")}
    return c2pa.Context(settings=c2pa.Settings.from_dict(s))


def _signer(cfg: SigningConfig) -> Any:
    import c2pa

    key, alg = _load_key(str(cfg.key_path), _stamp(cfg.key_path), cfg.password_env)
    certs = cfg.certs_path.read_bytes()
    info = c2pa.C2paSignerInfo((cfg.alg or alg).encode(), certs, key, cfg.tsa_url.encode() if cfg.tsa_url else None)
    return c2pa.Signer.from_info(info)


# -- images providers returned with their own manifest -------------------------------------------------------

_SOURCES: collections.OrderedDict[str, tuple[bytes, str]] = collections.OrderedDict()
_SOURCES_LOCK = threading.Lock()
_SOURCES_MAX_BYTES = 256 << 20


def has_manifest_marker(data: bytes) -> bool:
    """Cheap test: might these bytes carry a C2PA manifest store (a JUMBF box labelled ``c2pa``)?"""
    return b"c2pa" in data


def remember_source(data: bytes, pixels: np.ndarray, mime: str | None = None) -> None:
    """Keep decoded bytes that carry a C2PA manifest, keyed by the hash of their pixels (HxWx3 uint8), so a
    saver writing those same pixels can name them as the parent ingredient. Bounded (oldest dropped)."""
    if not has_manifest_marker(data):
        return
    from .provenance import pixel_hash

    mime = mime or _sniff(data)
    if mime is None:
        return
    key = pixel_hash(np.ascontiguousarray(pixels[..., :3]))
    with _SOURCES_LOCK:
        _SOURCES[key] = (bytes(data), mime)
        _SOURCES.move_to_end(key)
        while len(_SOURCES) > 1 and sum(len(b) for b, _ in _SOURCES.values()) > _SOURCES_MAX_BYTES:
            _SOURCES.popitem(last=False)


def source_for(digest: str) -> tuple[bytes, str] | None:
    with _SOURCES_LOCK:
        return _SOURCES.get(digest)


def _sniff(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


# -- the manifest ---------------------------------------------------------------------------------------------


def build_manifest(
    t: Trace,
    generations: list[dict],
    *,
    mime: str,
    title: str,
    graph: dict | None,
    include_graph: bool,
    parent_label: str | None,
    parent_is_source: bool,
    prompt_id: str | None,
    node_id: str | None,
    when: str,
) -> dict:
    """The C2PA manifest definition for one output (ingredients are added separately, by label)."""
    version = kiln_version()
    kiln_agent = {"name": "Kiln", "version": version}
    generative = bool(t.samplers or t.providers or generations)
    params: dict[str, Any] = {}
    ckpt = next((m for m in t.models if m["role"] == "checkpoint"), None)
    if ckpt:
        params["model"] = ckpt.get("name")
    if generations and generations[0].get("model"):
        params.update({"provider": generations[0].get("provider"), "model": generations[0].get("model")})
    if t.samplers:
        s = t.samplers[-1]  # BFS from the saver: the last one found is the first that ran
        seed = s.get("seed", s.get("noise_seed"))
        params.update({k: v for k, v in (("seed", seed), ("sampler", s.get("sampler_name"))) if v is not None})
    actions: list[dict[str, Any]] = []
    if parent_label is not None:
        actions.append({"action": "c2pa.opened", "when": when, "parameters": {"ingredientIds": [parent_label]}})
        if not parent_is_source:
            source = SOURCE_COMPOSITE if t.partial or any(p.get("mask") for p in t.providers) else SOURCE_GENERATED
            edited: dict[str, Any] = {"action": "c2pa.edited", "when": when, "softwareAgent": kiln_agent}
            if generative:
                edited["digitalSourceType"] = source
            edited["parameters"] = params | {"description": _describe(t, generations, edit=True)}
            actions.append(edited)
    else:
        actions.append(
            {
                "action": "c2pa.created",
                "when": when,
                "softwareAgent": kiln_agent,
                "digitalSourceType": SOURCE_GENERATED if generative else SOURCE_EDITED,
                "parameters": params | {"description": _describe(t, generations, edit=False)},
            }
        )
    data: dict[str, Any] = {
        "generator": f"Kiln {version}",
        "graph_sha256": graph_sha256(graph),
        "prompt_id": prompt_id,
        "node": node_id,
        "models": t.models,
        "samplers": t.samplers,
        "providers": [
            {k: g.get(k) for k in ("provider", "model", "request_id", "response_id", "created") if g.get(k)}
            for g in generations
        ]
        or t.providers,
        "edit_of": [p["title"] for p in t.parents],
        "inputs": [h["title"] for h in t.hints],
    }
    if include_graph and graph is not None:
        data["graph"] = graph
    return {
        "claim_generator_info": [kiln_agent],
        "title": title,
        "format": mime,
        "assertions": [
            {"label": "c2pa.actions.v2", "data": {"actions": actions}},
            {"label": LABEL, "data": json.loads(config.redact(json.dumps(data, default=str)))},
        ],
    }


def _describe(t: Trace, generations: list[dict], edit: bool) -> str:
    if generations and generations[0].get("provider"):
        g = generations[0]
        return f"{'edited' if edit else 'generated'} by {g.get('provider')} {g.get('model') or ''}".strip()
    if t.samplers:
        kind = "inpainted" if t.partial and edit else "image-to-image" if edit else "text-to-image"
        return f"{kind} with a diffusion model in Kiln"
    return "edited in Kiln" if edit else "made in Kiln"


# -- signing --------------------------------------------------------------------------------------------------


Sign = Callable[..., bytes]  # (encoded bytes, format, HxWxC uint8 pixels[, source]) -> signed bytes


def signer_for(prompt: dict | None, generation_info: str | None) -> Sign | None:
    """A function ``(encoded bytes, format, HxWxC uint8 pixels) -> signed bytes`` for the running saver, or
    None (with a once-per-process warning) when no key is configured or ``c2pa`` is missing.

    Called on the node's own thread (it reads the node context); the function it returns may run on any."""
    from kiln import engine

    from .provenance import parse_generation_info

    reason = status()
    if reason is not None:
        warn_unsigned_once(reason)
        return None
    cfg = signing_config()
    assert cfg is not None
    ctx = engine.current()
    folders = ctx.folders if ctx is not None else None
    if folders is None:
        folders = engine.get_folders()
    node_id = None
    if ctx is not None:
        node_id = next((i for i in (ctx.real_id, ctx.display_id, ctx.node_id) if i and prompt and i in prompt), None)
        node_id = node_id or ctx.node_id
    t = trace(prompt, node_id, folders)
    gens = [g for g in parse_generation_info(generation_info) if g.get("provider") or g.get("model")]
    prompt_id = ctx.prompt_id if ctx is not None else None
    _signer(cfg)  # an unreadable key fails here; a chain that does not match it, at the first signature

    def sign(data: bytes, fmt: str, pixels: np.ndarray | None, source: tuple[bytes, str] | None = None) -> bytes:
        from .provenance import pixel_hash

        mime = MIME.get(fmt.upper())
        if mime is None:
            return data
        if source is None and pixels is not None and pixels.ndim == 3 and pixels.shape[-1] >= 3:
            source = source_for(pixel_hash(np.ascontiguousarray(pixels[..., :3])))
        return sign_bytes(data, mime, t, gens, cfg, prompt, prompt_id, node_id, source)

    return sign


def sign_file(data: Any, prompt: dict | None) -> Any:
    """SaveFileS3's payload, signed when it is a PNG, JPEG or WebP image, a key is configured and
    ``c2pa.sign_files`` is not false; anything else comes back unchanged. Bytes that already carry a
    manifest keep it as their parent ingredient."""
    if not isinstance(data, bytes) or settings().get("sign_files", True) is False:
        return data
    mime = _sniff(data)
    if mime is None or status() is not None:
        return data
    sign = signer_for(prompt, None)
    if sign is None:
        return data
    from PIL import Image

    try:
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    except Exception:
        return data  # not decodable: stored as given
    source = (data, mime) if has_manifest_marker(data) else None
    return sign(data, mime.split("/")[1].upper(), pixels, source)


def sign_bytes(
    data: bytes,
    mime: str,
    t: Trace,
    generations: list[dict],
    cfg: SigningConfig,
    graph: dict | None = None,
    prompt_id: str | None = None,
    node_id: str | None = None,
    source: tuple[bytes, str] | None = None,
) -> bytes:
    """``data`` (an encoded image of type ``mime``) with a signed C2PA manifest store embedded."""
    import c2pa

    parent = next((p for p in t.parents if p.get("path") is not None and Path(p["path"]).is_file()), None)
    parent_label = None
    ingredients: list[tuple[dict, str, bytes]] = []
    if source is not None:  # the provider's own signed output, saved unchanged
        parent_label = "provider-output"
        ingredients.append(
            ({"title": "provider output", "relationship": "parentOf", "label": parent_label}, source[1], source[0])
        )
    elif parent is not None:
        pdata = Path(parent["path"]).read_bytes()
        pmime = _sniff(pdata)
        if pmime is not None:
            parent_label = "parent"
            ingredients.append(
                ({"title": parent["title"], "relationship": "parentOf", "label": "parent"}, pmime, pdata)
            )
    # what guided generation without being the parent: ControlNet and mask images, and the image a provider
    # edited when the provider's own signed output is the parent (its manifest records the edit)
    for i, h in enumerate(t.hints + ([parent] if source is not None and parent is not None else [])):
        p = h.get("path")
        if p is not None and Path(p).is_file():
            hdata = Path(p).read_bytes()
            hmime = _sniff(hdata)
            if hmime is not None:
                ingredients.append(
                    ({"title": h["title"], "relationship": "inputTo", "label": f"input-{i}"}, hmime, hdata)
                )
    when = _dt.datetime.now(_dt.timezone.utc).isoformat()
    manifest = build_manifest(
        t,
        generations,
        mime=mime,
        title=f"{node_id or 'kiln'}.{mime.split('/')[1]}",
        graph=graph,
        include_graph=cfg.include_graph,
        parent_label=parent_label,
        parent_is_source=source is not None,
        prompt_id=prompt_id,
        node_id=node_id,
        when=when,
    )
    try:
        builder = c2pa.Builder(manifest, context=_c2pa_context(cfg.thumbnail))
        for ing, imime, idata in ingredients:
            builder.add_ingredient(ing, imime, io.BytesIO(idata))
        out = io.BytesIO()
        builder.sign(_signer(cfg), mime, io.BytesIO(data), out)
    except c2pa.C2paError as exc:
        raise NodeError(
            f"C2PA signing failed: {config.redact(exc)}",
            hint="check that c2pa.certs holds the signing certificate first, then its CA chain, that the "
            "certificate matches the key and allows C2PA signing (digitalSignature key usage, an "
            "emailProtection or documentSigning extended key usage), and that it has not expired",
        ) from None
    return out.getvalue()


# -- reading --------------------------------------------------------------------------------------------------


def trust_anchors() -> bytes | None:
    p = _path(os.environ.get("KILN_C2PA_TRUST_ANCHORS") or settings().get("trust_anchors"))
    return p.read_bytes() if p is not None and p.is_file() else None


def read(data: bytes, anchors: bytes | None = None) -> dict | None:
    """The manifest store of an image as a dict (``c2pa.Reader``'s JSON plus ``validation_state``), or None
    when the file has none. Raises ``c2pa.C2paError`` for a store that cannot be parsed."""
    import c2pa

    ctx = _c2pa_context(0, anchors) if anchors else None
    mime = _sniff(data) or "application/octet-stream"
    kwargs = {"context": ctx} if ctx is not None else {}
    r = c2pa.Reader.try_create(mime, io.BytesIO(data), None, **kwargs)
    if r is None:
        return None
    with r:
        store = json.loads(r.json())
        store["validation_state"] = r.get_validation_state()
    return store
