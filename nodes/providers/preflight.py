"""Preflight checks for paid provider nodes and remote sinks, run at validation (``Node.preflight``).

A graph that generates with a paid provider and then saves to S3 must not pay first and fail at the save:
each provider node checks that its package is installed and its endpoint profile has a key, and each S3 node
that its bucket answers with the configured credentials, before anything runs. Bucket answers are kept for a
short while (keyed by target, bucket and the credential chain's identity), so validating many prompts does not
ask the store every time.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from typing import Any

from kiln.engine import NodeError

from . import config

BUCKET_ANSWER_TTL_S = 60.0
_bucket_answers: dict[tuple, tuple[float, str | None]] = {}
_bucket_lock = threading.Lock()
_MAX_ANSWERS = 64

_EXTRAS = {"openai": "openai", "boto3": "s3"}


def _message(exc: NodeError) -> str:
    return str(exc) + (f"; {exc.hint}" if exc.hint else "")


def package_missing(module: str) -> str | None:
    if importlib.util.find_spec(module) is not None:
        return None
    extra = _EXTRAS.get(module, module)
    return (
        f"needs the '{module}' package: pip install -e \".[{extra}]\" from your Kiln checkout (or pip install {module})"
    )


def endpoint_ready(kind: str, endpoint: Any, base_url: Any = "", package: str | None = None) -> bool | dict:
    """True when a call to ``endpoint`` (a profile of ``kind``) could be made: package, profile and key."""
    if package and (missing := package_missing(package)):
        return {"endpoint": missing}
    if endpoint is None:  # linked: known only at run time
        return True
    try:
        profile = config.get_profile(str(endpoint), kind)
        config.resolve_endpoint(profile, str(base_url or ""))
    except NodeError as exc:
        return {exc.input_name or "endpoint": _message(exc)}
    return True


def bucket_ready(bucket: Any, endpoint_url: Any = "", region: Any = "", path_style: Any = False) -> bool | dict:
    """True when ``bucket`` answers a HEAD with the configured credentials (cached for a short while)."""
    if missing := package_missing("boto3"):
        return {"bucket": missing}
    if not bucket or not isinstance(bucket, str):  # linked, or empty (the node's own check names it)
        return True
    from kiln.nodes.providers import s3io

    url = str(endpoint_url or "").strip()
    if url and not url.startswith(("http://", "https://")):
        return {"endpoint_url": f"endpoint_url {url!r} needs a scheme: write it like http://127.0.0.1:9000"}
    target = s3io.Target(url, str(region or "").strip(), bool(path_style))
    key = (target, bucket, s3io.credentials_identity())
    now = time.monotonic()
    with _bucket_lock:
        hit = _bucket_answers.get(key)
    if hit is not None and now - hit[0] < BUCKET_ANSWER_TTL_S:
        problem = hit[1]
    else:
        problem = None
        try:
            s3io.client(target).head_bucket(Bucket=bucket)
        except NodeError as exc:
            problem = _message(exc)
        except Exception as exc:
            code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket", "NotFound"):
                problem = f"bucket '{bucket}' does not exist there (NoSuchBucket); create it or fix its name"
            else:
                problem = _message(s3io.to_node_error(exc, action="checking", bucket=bucket))
        with _bucket_lock:
            if len(_bucket_answers) >= _MAX_ANSWERS:
                _bucket_answers.clear()
            _bucket_answers[key] = (now, problem)
    return {"bucket": problem} if problem else True
