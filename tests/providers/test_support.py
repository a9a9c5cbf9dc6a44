"""The support package: retry timing rules, prices, profiles and key routing, redaction, provenance."""

from __future__ import annotations

import asyncio
import email.utils
import io
import json
import time

import numpy as np
import pytest
from hypothesis import given, strategies as st
from PIL import Image

from kiln.engine import NodeError
from kiln.nodes.providers import config, pricing, provenance
from kiln.nodes.providers.retry import RetryPolicy, Transient, backoff_delay, parse_retry_after, with_retries

# -- retry ---------------------------------------------------------------------------------------------


def test_parse_retry_after_seconds_and_http_dates():
    assert parse_retry_after("2") == 2.0 and parse_retry_after("0.5") == 0.5
    now = time.time()
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None


@given(attempt=st.integers(0, 20), rnd=st.floats(0, 1), ra=st.one_of(st.none(), st.floats(0, 1000)))
def test_backoff_is_jittered_capped_and_honours_retry_after(attempt, rnd, ra):
    p = RetryPolicy(base_delay_s=0.5, max_delay_s=8.0)
    d = backoff_delay(attempt, p, ra, rnd)
    assert d >= 0
    if ra is None:
        assert d <= min(p.max_delay_s, 0.5 * 2**attempt)
    else:
        assert d == max(ra, d) and d <= max(ra, p.max_delay_s)  # never shorter than the server asked


def test_with_retries_stops_at_attempts_and_budget():
    calls = []

    async def flaky():
        calls.append(time.monotonic())
        raise ConnectionError("boom")

    policy = RetryPolicy(max_attempts=3, budget_s=10, base_delay_s=0.001, max_delay_s=0.01)
    with pytest.raises(ConnectionError) as ei:
        asyncio.run(with_retries(flaky, policy, lambda e: Transient()))
    assert len(calls) == 3 and ei.value.attempts == 3

    calls.clear()
    tight = RetryPolicy(max_attempts=10, budget_s=0.05, base_delay_s=1.0, max_delay_s=1.0)
    with pytest.raises(ConnectionError) as ei:
        asyncio.run(with_retries(flaky, tight, lambda e: Transient(retry_after_s=1.0)))
    assert len(calls) == 1 and ei.value.budget_exhausted  # the wait would overrun the budget: stop now


def test_with_retries_does_not_retry_permanent_errors():
    calls = []

    async def bad():
        calls.append(1)
        raise ValueError("permanent")

    with pytest.raises(ValueError):
        asyncio.run(with_retries(bad, RetryPolicy(), lambda e: None))
    assert calls == [1]


# -- pricing -------------------------------------------------------------------------------------------


def test_per_image_prices_most_specific_first(kiln_config):
    assert pricing.per_image("dall-e-3", "1792x1024", "hd") == 0.12
    assert pricing.per_image("dall-e-2", "512x512", "standard") == 0.018
    assert pricing.per_image("gpt-image-1", "auto", "auto") == 0.25  # the dearest, for budget checks
    assert pricing.per_image("unknown/model") is None


def test_token_pricing_and_config_overrides(kiln_config):
    usage = {
        "input_tokens": 100,
        "input_tokens_details": {"image_tokens": 60, "text_tokens": 40},
        "output_tokens": 1000,
    }
    assert pricing.from_usage("gpt-image-1", usage) == pytest.approx((40 * 5 + 60 * 10 + 1000 * 40) / 1e6)
    assert pricing.from_usage("gpt-4.1", {"input_tokens": 1000, "output_tokens": 500}) == pytest.approx(
        (1000 * 2 + 500 * 8) / 1e6
    )
    kiln_config.write_text(
        kiln_config.read_text() + "prices:\n  dall-e-2: {per_image: {'256x256': 0.5}}\n"
        "  my/model: {per_image: {'*': 0.07}}\n"
    )
    assert pricing.per_image("dall-e-2", "256x256") == 0.5 and pricing.per_image("my/model") == 0.07


# -- profiles, keys, redaction -------------------------------------------------------------------------


def test_profiles_come_from_config_and_environment(kiln_config, monkeypatch):
    p = config.get_profile("openai", "openai")
    assert p.base_url.startswith("http://127.0.0.1") and p.retry.max_attempts == 3
    monkeypatch.setenv("KILN_OPENAI_BASE_URL", "http://127.0.0.1:1/v9")
    assert config.get_profile("openai", "openai").base_url == "http://127.0.0.1:1/v9"
    assert "together" in config.profile_names("openai") and "replicate" not in config.profile_names("openai")
    with pytest.raises(NodeError) as ei:
        config.get_profile("nope", "openai")
    assert ei.value.input_name == "endpoint" and "openai" in ei.value.hint


def test_key_from_config_file_and_missing_key_message(kiln_config, monkeypatch, tmp_path):
    cfg = tmp_path / "k.yaml"
    cfg.write_text("providers:\n  openai:\n    api_key: sk-from-file-123456\n    api_key_env: UNSET_VAR_FOR_TEST\n")
    monkeypatch.setenv("KILN_CONFIG", str(cfg))
    assert config.get_profile("openai", "openai").api_key() == "sk-from-file-123456"
    assert config.redact("token sk-from-file-123456 here") == "token *** here"
    cfg.write_text("providers:\n  openai:\n    api_key_env: UNSET_VAR_FOR_TEST\n")
    with pytest.raises(NodeError) as ei:
        config.get_profile("openai", "openai").api_key()
    assert "UNSET_VAR_FOR_TEST" in ei.value.hint and str(cfg) in ei.value.hint


def test_bad_config_file_is_a_clear_error(tmp_path, monkeypatch):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("providers: [unclosed\n")
    monkeypatch.setenv("KILN_CONFIG", str(cfg))
    with pytest.raises(NodeError, match="not valid YAML"):
        config.load()


def test_keys_only_go_to_their_profile_origin(kiln_config, monkeypatch):
    p = config.get_profile("openai", "openai")
    from tests.providers.conftest import API_KEY

    assert config.resolve_endpoint(p, "") == (p.base_url, API_KEY)
    assert config.resolve_endpoint(p, p.base_url + "/")[1] == API_KEY
    with pytest.raises(NodeError) as ei:
        config.resolve_endpoint(p, "https://evil.example.com/v1")
    assert ei.value.input_name == "base_url"
    with pytest.raises(NodeError):
        config.resolve_endpoint(p, "ftp://127.0.0.1/v1")
    assert config.resolve_endpoint(p, "http://localhost:9/v1") == ("http://localhost:9/v1", None)
    monkeypatch.setenv("TOGETHER_API_KEY", "tg-key-abcdef")
    assert config.resolve_endpoint(p, "https://api.together.xyz/v1")[1] == "tg-key-abcdef"


# -- provenance ----------------------------------------------------------------------------------------


def _pixels():
    return np.random.default_rng(1).integers(0, 255, (20, 30, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_provenance_round_trips_through_each_format(fmt):
    px = _pixels()
    gen = {
        "provider": "openai",
        "model": "gpt-image-1",
        "revised_prompt": 'a "quoted" <tag> & more\nline',
        "request_id": "req_1",
    }
    rec = provenance.build(
        pixels=px,
        graph={"1": {"class_type": "X", "inputs": {}}},
        generations=[gen],
        prompt_id="p1",
        node_id="9",
        mime=f"image/{fmt.lower()}",
    )
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format=fmt, **provenance.save_kwargs(fmt, rec, {"prompt": {"a": 1}}))
    back = provenance.read(buf.getvalue())
    assert back == json.loads(provenance.dumps(rec))
    assert back["assertions"][0]["data"]["actions"][0]["parameters"]["revised_prompt"] == gen["revised_prompt"]
    if fmt == "PNG":
        assert provenance.pixel_hash(np.asarray(Image.open(buf))) == back["assertions"][1]["data"]["hash"]


def test_provenance_redacts_known_secrets(kiln_config):
    from tests.providers.conftest import API_KEY

    config.get_profile("openai", "openai").api_key()
    rec = provenance.build(
        pixels=_pixels(), graph={"leak": API_KEY}, generations=[], prompt_id=None, node_id=None, mime="image/png"
    )
    assert API_KEY not in provenance.dumps(rec)
