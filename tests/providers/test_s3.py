"""S3 sinks and loaders against a real S3-compatible server (moto, server mode, 127.0.0.1, path-style)."""

from __future__ import annotations

import io
import json
import os
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from kiln import engine
from kiln.engine import Node
from kiln.nodes.providers import provenance
from tests.conftest import SAFETY_S
from tests.providers.s3_proxy import Rule, S3FaultProxy


class Gradient(Node):
    outputs = ("IMAGE",)

    def run(self, batch: int = 1, height: int = 48, width: int = 64, flat: bool = False):
        if flat:
            return torch.full((batch, height, width, 3), 0.5)
        x = torch.linspace(0, 1, width).view(1, 1, width, 1).expand(batch, height, width, 3).clone()
        x[..., 1] = torch.linspace(0, 1, height).view(1, height, 1)
        for b in range(batch):
            x[b, ..., 2] = b / max(batch, 1)
        return x


class Blob(Node):
    outputs = ("*",)

    def run(self, size: int = 1, text: str = ""):
        return text if text else os.urandom(size)


@pytest.fixture()
def reg(registry):
    registry.register(Gradient, "TestGradient")
    registry.register(Blob, "TestBlob")
    return registry


@pytest.fixture()
def runner(reg, run_graph):
    return run_graph


@pytest.fixture()
def proxy(moto_url):
    p = S3FaultProxy(moto_url).start()
    try:
        yield p
    finally:
        p.stop()


def save_graph(bucket, endpoint, batch=2, **inputs):
    base = {
        "images": ["g", 0],
        "bucket": bucket,
        "endpoint_url": endpoint,
        "path_style": True,
        "region": "us-east-1",
        "key_template": "{prefix}/{prompt_id}/{index}.{ext}",
    }
    base.update(inputs)
    return {
        "g": {"class_type": "TestGradient", "inputs": {"batch": batch}},
        "s": {"class_type": "SaveImageS3", "inputs": base},
    }


def objects(s3, prefix=""):
    r = s3.list_objects_v2(Bucket=s3.bucket, Prefix=prefix)
    return sorted(o["Key"] for o in r.get("Contents", []))


def test_save_png_with_metadata_provenance_and_ui(runner, s3, moto_url):
    r = runner(save_graph(s3.bucket, moto_url, metadata='{"project": "spring"}'), extra_pnginfo={"workflow": {"w": 1}})
    assert r.status == "success", r.error
    keys = objects(s3)
    assert keys == [f"kiln/{r.prompt_id}/00000.png", f"kiln/{r.prompt_id}/00001.png"]
    head = s3.head_object(Bucket=s3.bucket, Key=keys[1])
    assert head["ContentType"] == "image/png"
    assert head["Metadata"]["kiln-prompt-id"] == r.prompt_id and head["Metadata"]["kiln-node"] == "s"
    assert head["Metadata"]["project"] == "spring"
    body = s3.get_object(Bucket=s3.bucket, Key=keys[1])["Body"].read()
    img = Image.open(io.BytesIO(body))
    assert json.loads(img.text["prompt"])["s"]["class_type"] == "SaveImageS3"
    assert json.loads(img.text["workflow"]) == {"w": 1}
    rec = provenance.read(body)
    pixels = np.asarray(img.convert("RGB"))
    content = next(a for a in rec["assertions"] if a["label"] == "kiln.content_hash")["data"]["hash"]
    assert content == provenance.pixel_hash(pixels) == head["Metadata"]["kiln-sha256"]
    assert next(a for a in rec["assertions"] if a["label"] == "kiln.graph")["data"]["g"]["class_type"] == "TestGradient"
    ui = r.outputs["s"]
    assert [e["uri"] for e in ui["s3"]] == [f"s3://{s3.bucket}/{k}" for k in keys]
    executed = [e for e in runner.events if type(e).__name__ == "NodeOutput"]
    assert executed and executed[0].output["s3"][0]["key"] == keys[0]


@pytest.mark.parametrize("fmt,mime", [("jpeg", "image/jpeg"), ("webp", "image/webp")])
def test_jpeg_and_webp_carry_provenance_as_xmp_and_exif(runner, s3, moto_url, fmt, mime):
    r = runner(save_graph(s3.bucket, moto_url, batch=1, format=fmt, quality=85))
    assert r.status == "success", r.error
    key = objects(s3)[0]
    obj = s3.get_object(Bucket=s3.bucket, Key=key)
    assert obj["ContentType"] == mime and key.endswith("." + fmt)
    body = obj["Body"].read()
    rec = provenance.read(body)
    assert rec["format"] == mime and rec["kiln"]["prompt_id"] == r.prompt_id
    exif = Image.open(io.BytesIO(body)).getexif()
    assert exif[0x0131] == provenance.GENERATOR


def test_presigned_url_fetches_the_object(runner, s3, moto_url):
    r = runner(save_graph(s3.bucket, moto_url, batch=1, presign_seconds=600))
    assert r.status == "success", r.error
    url = r.outputs["s"]["s3"][0]["url"]
    assert url.startswith(moto_url) and "X-Amz-Signature" in url
    with urllib.request.urlopen(url, timeout=SAFETY_S) as resp:
        fetched = resp.read()
    key = objects(s3)[0]
    assert fetched == s3.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    assert r.outputs["s"]["text"] == [url]


@pytest.fixture()
def small_parts(tmp_path, monkeypatch, kiln_config):
    text = kiln_config.read_text() + "s3:\n  multipart_threshold: 6291456\n  part_size: 5242880\n  max_attempts: 3\n"
    kiln_config.write_text(text)


def file_graph(bucket, endpoint, size, **inputs):
    base = {
        "data": ["b", 0],
        "bucket": bucket,
        "endpoint_url": endpoint,
        "path_style": True,
        "region": "us-east-1",
        "key_template": "files/{hash}.{ext}",
        "extension": "bin",
    }
    base.update(inputs)
    return {
        "b": {"class_type": "TestBlob", "inputs": {"size": size}},
        "f": {"class_type": "SaveFileS3", "inputs": base},
    }


def test_large_files_go_up_in_parts(runner, s3, proxy, small_parts):
    size = 11 * 1024 * 1024
    r = runner(file_graph(s3.bucket, proxy.url, size))
    assert r.status == "success", r.error
    key = objects(s3, "files/")[0]
    assert s3.head_object(Bucket=s3.bucket, Key=key)["ContentLength"] == size
    parts = [q for m, q, _ in proxy.log if m == "PUT" and "partNumber=" in q]
    assert len(parts) == 3
    assert r.outputs["f"]["s3"][0]["size"] == size


def test_transient_s3_errors_are_retried(runner, s3, proxy):
    proxy.rules.append(Rule("PUT", path_has="/kiln/", status=500, times=2))
    r = runner(save_graph(s3.bucket, proxy.url, batch=1))
    assert r.status == "success", r.error
    assert [s for m, _, s in proxy.log if m == "PUT"] == [500, 500, 200]
    assert len(objects(s3)) == 1


def test_failed_multipart_upload_leaves_nothing(runner, s3, proxy, small_parts):
    proxy.rules.append(Rule("PUT", query_has="partNumber=2", status=500, times=-1))
    r = runner(file_graph(s3.bucket, proxy.url, 11 * 1024 * 1024))
    assert r.status == "error"
    msg = r.error.message
    assert "S3 InternalError (HTTP 500, request id FAULT123) after 3 attempts" in msg and "s3://" in msg
    assert objects(s3) == []
    assert s3.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []


def test_batch_is_all_or_nothing(runner, s3, proxy, small_parts):
    proxy.rules.append(Rule("PUT", path_has="/00003.png", status=503, code="SlowDown", times=-1))
    r = runner(save_graph(s3.bucket, proxy.url, batch=5))
    assert r.status == "error"
    assert "00003.png" in r.error.message
    assert objects(s3) == []


def test_interrupt_mid_batch_leaves_nothing(runner, s3, proxy):
    import threading

    # the upload of 00002 is held in the proxy until the executor has acknowledged the interrupt, so the
    # interrupt lands while that upload is in flight, however slow the machine; the others may have landed
    arrived, hold = threading.Event(), threading.Event()
    proxy.rules.append(Rule("PUT", path_has="/00002.png", status=0, times=-1, arrived=arrived, hold=hold))
    at_interrupt: dict = {}

    def interrupt_once_uploading():
        try:
            if arrived.wait(SAFETY_S):
                at_interrupt["acknowledged"] = runner.ex.interrupt()
                at_interrupt["log"] = list(proxy.log)
        finally:
            hold.set()

    runner.ex.CANCEL_GRACE_S = SAFETY_S  # the run returns once the roll-back is done, however loaded the machine
    t = threading.Thread(target=interrupt_once_uploading, daemon=True)
    t.start()
    r = runner(save_graph(s3.bucket, proxy.url, batch=4))
    t.join(SAFETY_S)
    assert at_interrupt["acknowledged"] is True
    assert not [q for m, q, _ in at_interrupt["log"] if m == "PUT" and "00002" in q]  # still held then
    assert r.status == "interrupted" and "s" not in r.ran
    assert type(runner.events[-1]).__name__ == "ExecutionInterrupted" and runner.events[-1].node_id == "s"
    assert not [e for e in runner.events if type(e).__name__ == "NodeOutput"]
    # the held upload could not be stopped mid-request; once it landed, the node took it back with the rest
    written = sorted(q for m, q, st in proxy.log if m == "PUT" and st == 200)
    deleted = sorted(q for m, q, _ in proxy.log if m == "DELETE")
    assert len(written) == 4 and any("00002" in q for q in written)
    assert deleted == written
    assert objects(s3) == []


def test_interrupt_after_the_batch_keeps_it(reg, runner, s3, moto_url):
    # the interrupt comes from a node that runs on the sink's output, so the sink has finished: it is not
    # undone, and the run still ends interrupted
    acknowledged: list[bool] = []

    class InterruptHere(Node):
        output_node = True
        outputs = ()

        def run(self, after: str = ""):
            acknowledged.append(runner.ex.interrupt())
            engine.check_interrupted()

    reg.register(InterruptHere, "TestInterruptHere")
    g = save_graph(s3.bucket, moto_url, batch=3)
    g["x"] = {"class_type": "TestInterruptHere", "inputs": {"after": ["s", 0]}}
    r = runner(g)
    assert acknowledged[:1] == [True]
    assert r.status == "interrupted" and "s" in r.ran and "x" not in r.ran
    keys = [f"kiln/{r.prompt_id}/{i:05d}.png" for i in range(3)]
    assert objects(s3) == keys
    assert [e["key"] for e in r.outputs["s"]["s3"]] == keys


@pytest.mark.parametrize(
    "inputs,input_name,expect",
    [
        ({"key_template": "{prefix}/{nope}.png"}, "key_template", "unknown field"),
        ({"key_template": "{prefix}/same.{ext}"}, "key_template", "same key"),
        ({"bucket": "no-such-bucket-here"}, "bucket", "NoSuchBucket"),
        ({"bucket": ""}, "bucket", "no bucket"),
        ({"endpoint_url": "127.0.0.1:9"}, "endpoint_url", "scheme"),
        ({"metadata": "{not json"}, "metadata", "not JSON"),
    ],
)
def test_bad_sink_inputs_name_the_input(runner, s3, moto_url, inputs, input_name, expect):
    from kiln.engine import ValidationFailed

    g = save_graph(s3.bucket, moto_url)
    g["s"]["inputs"].update(inputs)
    try:
        msg = runner(g).error.message
    except ValidationFailed as exc:  # found by the node's preflight check, before anything ran
        issues = exc.result.problems["s"].issues
        assert [i.extra.get("input_name") for i in issues] == [input_name], issues
        msg = issues[0].details
        assert expect in msg, msg
        return
    assert msg.startswith(f"input '{input_name}'") and expect in msg, msg


def test_blank_images_are_refused_before_upload(runner, s3, moto_url):
    g = save_graph(s3.bucket, moto_url)
    g["g"]["inputs"]["flat"] = True
    msg = runner(g).error.message
    assert msg.startswith("input 'images'") and "single colour" in msg
    assert objects(s3) == []


def test_load_image_s3_round_trip_and_etag_cache(runner, s3, moto_url):
    assert runner(save_graph(s3.bucket, moto_url, batch=1, key_template="in/{index}.{ext}")).status == "success"
    load = {
        "l": {
            "class_type": "LoadImageS3",
            "inputs": {"bucket": s3.bucket, "key": "in/00000.png", "endpoint_url": moto_url, "path_style": True},
        }
    }
    ex = runner.ex
    r = ex.run(engine.Graph.from_json(load), targets=["l"])
    assert r.status == "success", r.error
    img, mask = r.values["l"]
    expected = Gradient().run(batch=1)
    assert torch.allclose(img, torch.floor(expected * 255) / 255, atol=1e-6) and mask.abs().sum() == 0
    assert ex.run(engine.Graph.from_json(load), targets=["l"]).cached == ["l"]
    s3.put_object(Bucket=s3.bucket, Key="in/00000.png", Body=_png(8, 8), ContentType="image/png")
    r3 = ex.run(engine.Graph.from_json(load), targets=["l"])
    assert r3.ran == ["l"] and r3.values["l"][0].shape == (1, 8, 8, 3)


def _png(w, h):
    buf = io.BytesIO()
    Image.fromarray(np.random.randint(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "setup,inputs,input_name,expect",
    [
        (("a.txt", b"hello", "text/plain"), {"key": "a.txt"}, "key", "not an image"),
        (("big.png", None, "image/png"), {"key": "big.png", "max_bytes": 100}, "max_bytes", "over max_bytes"),
        (None, {"key": "missing.png"}, "key", "404"),
        (("junk.png", b"\x89PNG broken", "image/png"), {"key": "junk.png"}, "key", "not an image Kiln can decode"),
    ],
)
def test_load_image_s3_errors(runner, s3, moto_url, setup, inputs, input_name, expect):
    if setup:
        name, body, ctype = setup
        s3.put_object(Bucket=s3.bucket, Key=name, Body=body if body is not None else _png(64, 64), ContentType=ctype)
    g = {
        "l": {
            "class_type": "LoadImageS3",
            "inputs": {"bucket": s3.bucket, "endpoint_url": moto_url, "path_style": True, **inputs},
        }
    }
    r = runner.ex.run(engine.Graph.from_json(g), targets=["l"])
    msg = r.error.message
    assert expect in msg, msg
    if input_name:
        assert msg.startswith(f"input '{input_name}'"), msg


def test_save_file_s3_text_with_content_type(runner, s3, moto_url):
    g = file_graph(s3.bucket, moto_url, 0, extension="json", key_template="{prefix}/{node}.{ext}")
    g["b"]["inputs"]["text"] = '{"a": 1}'
    r = runner(g)
    assert r.status == "success", r.error
    obj = s3.get_object(Bucket=s3.bucket, Key="kiln/f.json")
    assert obj["ContentType"] == "application/json" and obj["Body"].read() == b'{"a": 1}'
