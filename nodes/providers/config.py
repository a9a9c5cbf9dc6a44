"""Provider profiles and API keys.

Keys come from environment variables or Kiln's config file, never from graph inputs. The config file is
YAML, found at ``$KILN_CONFIG`` or ``~/.config/kiln/config.yaml``::

    providers:
      openai:                      # a profile; nodes pick one with their ``endpoint`` input
        api_key_env: OPENAI_API_KEY
        timeout_s: 120
        retries: {max_attempts: 4, budget_s: 120, base_delay_s: 1.0, max_delay_s: 30}
      together:
        kind: openai               # speaks the OpenAI Images API
        base_url: https://api.together.xyz/v1
        api_key_env: TOGETHER_API_KEY
        default_model: black-forest-labs/FLUX.1-schnell
    prices: {...}                  # see pricing.py
    budget: {max_cost: 2.50}       # default per-run budget in USD (extra_data.max_cost wins)
    prompt_screen: {block: [...], max_length: 4000}

A profile's base URL can also come from ``KILN_<PROFILE>_BASE_URL`` (and ``OPENAI_BASE_URL`` for the
``openai`` profile, as the official SDK does). A node may override the base URL, but a key is only sent
to the origin its profile names: an override pointing elsewhere must be a configured profile of its own,
so a shared graph can never redirect someone's key to another host.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kiln.engine import NodeError
from kiln.engine.net import is_loopback_host

from .retry import RetryPolicy

_BUILTIN: dict[str, dict[str, Any]] = {
    "openai": {
        "kind": "openai",
        "base_url": "https://api.openai.com/v1",
        "api_key_env": ["OPENAI_API_KEY"],
        "base_url_env": ["OPENAI_BASE_URL"],
    },
    "together": {
        "kind": "openai",
        "base_url": "https://api.together.xyz/v1",
        "api_key_env": ["TOGETHER_API_KEY"],
        "default_model": "black-forest-labs/FLUX.1-schnell",
    },
    "fireworks": {
        "kind": "openai",
        "base_url": "https://api.fireworks.ai/inference/v1",
        "api_key_env": ["FIREWORKS_API_KEY"],
    },
    "replicate": {
        "kind": "replicate",
        "base_url": "https://api.replicate.com/v1",
        "api_key_env": ["REPLICATE_API_TOKEN"],
    },
    "google": {
        "kind": "google",
        "base_url": "https://generativelanguage.googleapis.com/v1beta",
        "api_key_env": ["GEMINI_API_KEY", "GOOGLE_API_KEY"],
    },
}


@dataclass(frozen=True)
class Profile:
    """Where and how to call one provider account."""

    name: str
    kind: str
    base_url: str
    api_key_env: tuple[str, ...] = ()
    api_key_in_file: bool = field(default=False, repr=False)
    default_model: str | None = None
    timeout_s: float = 120.0
    retry: RetryPolicy = RetryPolicy()
    max_download_bytes: int = 64 * 1024 * 1024

    def api_key(self, required: bool = True) -> str | None:
        """The key, read at call time; a NodeError that says where to put it when it is missing."""
        for var in self.api_key_env:
            v = os.environ.get(var)
            if v:
                _SECRETS.add(v)
                return v
        if self.api_key_in_file:
            v = load().raw.get("providers", {}).get(self.name, {}).get("api_key")
            if v:
                _SECRETS.add(str(v))
                return str(v)
        if not required:
            return None
        env = " or ".join(self.api_key_env) or f"KILN_{self.name.upper()}_API_KEY"
        raise NodeError(
            f"no API key for provider profile '{self.name}'",
            hint=f"set the environment variable {env}, or providers.{self.name}.api_key in "
            f"{config_path()}; keys are never taken from the graph",
        )


@dataclass
class Config:
    raw: dict
    profiles: dict[str, Profile]
    path: Path | None


_SECRETS: set[str] = set()


def config_path() -> Path:
    env = os.environ.get("KILN_CONFIG")
    return Path(env).expanduser() if env else Path.home() / ".config" / "kiln" / "config.yaml"


def _read_file(path: Path) -> dict:
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise NodeError(
            f"Kiln config file {path} is not valid YAML: {exc}", hint="fix the file or point KILN_CONFIG elsewhere"
        ) from exc
    if not isinstance(data, dict):
        raise NodeError(f"Kiln config file {path} must hold a mapping at the top level")
    return data


def _retry_policy(d: dict) -> RetryPolicy:
    base = RetryPolicy()
    return RetryPolicy(
        max_attempts=int(d.get("max_attempts", base.max_attempts)),
        budget_s=float(d.get("budget_s", base.budget_s)),
        base_delay_s=float(d.get("base_delay_s", base.base_delay_s)),
        max_delay_s=float(d.get("max_delay_s", base.max_delay_s)),
    )


def _env_names(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    return (v,) if isinstance(v, str) else tuple(str(x) for x in v)


def _base_url_envs(name: str, d: dict) -> tuple[str, ...]:
    return _env_names(d.get("base_url_env")) + (f"KILN_{name.upper()}_BASE_URL",)


def _profile(name: str, d: dict, env: dict[str, str | None]) -> Profile:
    base = next((env[e] for e in _base_url_envs(name, d) if env.get(e)), None) or d.get("base_url")
    kind = d.get("kind", "openai")
    if not base:
        raise NodeError(
            f"provider profile '{name}' has no base_url", hint=f"add providers.{name}.base_url to {config_path()}"
        )
    return Profile(
        name=name,
        kind=str(kind),
        base_url=str(base).rstrip("/"),
        api_key_env=_env_names(d.get("api_key_env")),
        api_key_in_file=bool(d.get("api_key")),
        default_model=d.get("default_model"),
        timeout_s=float(d.get("timeout_s", 120.0)),
        retry=_retry_policy(d.get("retries") or {}),
        max_download_bytes=int(d.get("max_download_bytes", 64 * 1024 * 1024)),
    )


def _stamp(path: Path) -> tuple[int, int] | None:
    """(mtime in ns, size) of the config file, None when it is absent: part of every cache key below."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=4)
def _read_cached(path: str, stamp: tuple[int, int] | None) -> dict:
    """The parsed file, cached because :func:`load` runs for every provider call and every redaction, and
    parsing YAML each time would dominate; keyed by path and (mtime, size), so an edit is seen at once."""
    return _read_file(Path(path)) if stamp is not None else {}


def _merged(raw: dict, path: str) -> dict[str, dict]:
    merged: dict[str, dict] = {k: dict(v) for k, v in _BUILTIN.items()}
    for name, d in (raw.get("providers") or {}).items():
        if not isinstance(d, dict):
            raise NodeError(f"providers.{name} in {path} must be a mapping")
        merged.setdefault(name, {}).update(d)
    return merged


@functools.lru_cache(maxsize=4)
def _build(path: str, stamp: tuple[int, int] | None, env: tuple[tuple[str, str | None], ...]) -> Config:
    """The Config for one file version and the values of the environment variables it reads (``env``);
    a pure function of its key, so caching it can never serve a stale profile."""
    merged = _merged(_read_cached(path, stamp), path)
    profiles = {name: _profile(name, d, dict(env)) for name, d in merged.items()}
    return Config(raw=_read_cached(path, stamp), profiles=profiles, path=Path(path) if stamp is not None else None)


def load() -> Config:
    """The current config: re-read when the file (path, mtime, size) or an environment variable it reads
    (a profile's base-URL variables) changes; API keys are read from the environment at call time."""
    path = config_path()
    stamp = _stamp(path)
    merged = _merged(_read_cached(str(path), stamp), str(path))
    env = tuple(sorted({(e, os.environ.get(e)) for name, d in merged.items() for e in _base_url_envs(name, d)}))
    return _build(str(path), stamp, env)


def profile_names(kind: str) -> list[str]:
    """Profiles of one kind, for a node's ``endpoint`` combo (read afresh at validation)."""
    try:
        return [n for n, p in load().profiles.items() if p.kind == kind]
    except NodeError:
        return [n for n, d in _BUILTIN.items() if d["kind"] == kind]


def get_profile(name: str, kind: str, input_name: str = "endpoint") -> Profile:
    cfg = load()
    p = cfg.profiles.get(name)
    if p is None or p.kind != kind:
        choices = [n for n, q in cfg.profiles.items() if q.kind == kind]
        raise NodeError(
            f"unknown {kind} endpoint profile '{name}'",
            input_name=input_name,
            hint=f"choose one of {choices} or add providers.{name} (kind: {kind}) to {config_path()}",
        )
    return p


def _origin(url: str) -> tuple[str, str, int | None]:
    u = urlsplit(url)
    port = u.port or {"https": 443, "http": 80}.get(u.scheme)
    return u.scheme, (u.hostname or "").lower(), port


def is_loopback(url: str) -> bool:
    """True when the URL's host is one only this machine can reach (see ``kiln.engine.net``)."""
    return is_loopback_host(urlsplit(url).hostname or "")


def resolve_endpoint(profile: Profile, base_url_override: str, input_name: str = "base_url") -> tuple[str, str | None]:
    """(base_url, api_key) for a call. An override gets the key of the profile whose origin it matches;
    a loopback override with no matching profile gets no key; anything else is refused."""
    override = (base_url_override or "").strip().rstrip("/")
    if not override:
        return profile.base_url, profile.api_key()
    u = urlsplit(override)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise NodeError(
            f"base_url {override!r} is not an http(s) URL",
            input_name=input_name,
            hint="write it like https://api.example.com/v1, or leave it empty to use the profile's",
        )
    if _origin(override) == _origin(profile.base_url):
        return override, profile.api_key()
    for other in load().profiles.values():
        if other.kind == profile.kind and _origin(other.base_url) == _origin(override):
            return override, other.api_key()
    if is_loopback(override):
        return override, None
    raise NodeError(
        f"base_url {override!r} is not the origin of endpoint profile '{profile.name}' ({profile.base_url})",
        input_name=input_name,
        hint=f"Kiln only sends a key to the host its profile names: add a profile with this "
        f"base_url and its api_key_env to {config_path()} and select it as the endpoint",
    )


def section(name: str) -> dict:
    """A top-level section of the config file (``prices``, ``budget``, ``prompt_screen``...)."""
    v = load().raw.get(name) or {}
    return v if isinstance(v, dict) else {}


def add_secret(*values: str) -> None:
    """Values that must never appear in output, events or logs (redacted by :func:`redact`)."""
    _SECRETS.update(v for v in values if v)


def known_secrets() -> set[str]:
    """Every key value read so far (for redaction)."""
    out = set(_SECRETS)
    for p in load().profiles.values():
        for var in p.api_key_env:
            v = os.environ.get(var)
            if v:
                out.add(v)
    for d in (load().raw.get("providers") or {}).values():
        if isinstance(d, dict) and d.get("api_key"):
            out.add(str(d["api_key"]))
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        if os.environ.get(var):
            out.add(os.environ[var])
    return {s for s in out if len(s) >= 6}


def redact(text: Any) -> str:
    """``text`` with every known key replaced by ``***``; applied to every provider message we surface."""
    s = str(text)
    for secret in sorted(known_secrets(), key=len, reverse=True):
        if secret in s:
            s = s.replace(secret, "***")
    return s
