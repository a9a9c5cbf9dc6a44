"""Signed C2PA manifests in Kiln's outputs, verified with the C2PA library's own reader.

A throwaway CA and an ES256 signing certificate are made per session; the images are real outputs of the
shipped kiln-shapes model (txt2img, img2img with LoRA and ControlNet) and of the fake OpenAI server.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kiln import engine, nodes
from kiln.nodes.providers import c2pa_sign, config

c2pa = pytest.importorskip("c2pa")

REPO = Path(__file__).resolve().parents[2]
CKPT = REPO / "models" / "checkpoints" / "kiln-shapes.safetensors"
PROMPT_TEXT = "a large red circle in the center on a white background"


# -- a throwaway PKI --------------------------------------------------------------------------------------


def make_pki(d: Path, org: str) -> dict[str, Path]:
    """A CA and an end-entity certificate for C2PA claim signing (ES256), as PEM files in ``d``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)]
        )

    def usage(sign: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=sign,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=not sign,
            crl_sign=not sign,
            encipher_only=False,
            decipher_only=False,
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name(f"{org} CA"))
        .issuer_name(name(f"{org} CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage(False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    ee = (
        x509.CertificateBuilder()
        .subject_name(name(f"{org} signer"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage(True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    out = {"key": d / "key.pem", "certs": d / "certs.pem", "ca": d / "ca.pem"}
    out["key"].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    out["certs"].write_bytes(ee.public_bytes(pem) + ca.public_bytes(pem))
    out["ca"].write_bytes(ca.public_bytes(pem))
    return out


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"), "Kiln tests")


@pytest.fixture(scope="session")
def provider_pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("provider-pki"), "Fake OpenAI")


@pytest.fixture()
def signing(pki, monkeypatch, tmp_path):
    """Signing on, through the environment; an empty config file so the user's own is never read."""
    if not (tmp_path / "kiln.yaml").exists():
        (tmp_path / "kiln.yaml").write_text("{}\n")
        monkeypatch.setenv("KILN_CONFIG", str(tmp_path / "kiln.yaml"))
    monkeypatch.setenv("KILN_C2PA_KEY", str(pki["key"]))
    monkeypatch.setenv("KILN_C2PA_CERTS", str(pki["certs"]))
    monkeypatch.setenv("KILN_C2PA_TRUST_ANCHORS", str(pki["ca"]))
    return pki


def verify(data: bytes, anchors: Path) -> dict:
    """The C2PA library's own reading of ``data``, trusting ``anchors``."""
    store = c2pa_sign.read(data, anchors.read_bytes())
    assert store is not None, "no C2PA manifest"
    return store


def active(store: dict) -> dict:
    return store["manifests"][store["active_manifest"]]


def assertion(manifest: dict, label: str) -> dict:
    return next(a["data"] for a in manifest["assertions"] if a["label"] == label)


def actions(manifest: dict) -> list[dict]:
    return assertion(manifest, "c2pa.actions.v2")["actions"]


def png_with_one_pixel_changed(data: bytes) -> bytes:
    """The same PNG, every chunk (the manifest store too) kept, with the last pixel's last channel changed
    (the last byte of the image data: no later pixel is predicted from it, so exactly one pixel differs)."""
    chunks, i = [], 8
    while i < len(data):
        (n,) = struct.unpack(">I", data[i : i + 4])
        chunks.append((data[i + 4 : i + 8], data[i + 8 : i + 8 + n]))
        i += 12 + n
    raw = bytearray(zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT")))
    raw[-1] ^= 0x01
    out, idat_done = bytearray(data[:8]), False
    for kind, body in chunks:
        if kind == b"IDAT":
            if idat_done:
                continue
            kind, body, idat_done = b"IDAT", zlib.compress(bytes(raw)), True
        out += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    a = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    b = np.asarray(Image.open(io.BytesIO(bytes(out))).convert("RGB"))
    assert (a != b).any(axis=-1).sum() == 1
    return bytes(out)


# -- the shipped model --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    import torch

    from kiln.nodes.sd.manager import ModelManager

    base = tmp_path_factory.mktemp("shapes")
    (base / "input").mkdir()
    folders = engine.Folders(REPO, input_dir=base / "input", output_dir=base / "output", temp_dir=base / "temp")
    reg = engine.Registry()
    nodes.register_builtin(reg)
    manager = ModelManager(budget_bytes=2**30, device="cpu", dtype=torch.float32)
    ex = engine.Executor(reg, cache="none", folders=folders, services={"model_manager": manager})
    return ex, folders


def run(ex: engine.Executor, graph: dict) -> tuple[list, list[Path]]:
    events: list = []
    result = ex.run(engine.Graph.from_json(graph), sink=events.append)
    assert result.ok, result.error
    files = []
    for ui in result.outputs.values():
        for img in (ui or {}).get("images", []):
            files.append(ex.folders.safe_path(img["type"], img["filename"], img["subfolder"]))
    return events, files


def txt2img(seed: int = 42, lora: bool = False, control: str | None = None) -> dict:
    g = json.loads((REPO / "graphs" / "txt2img.json").read_text())
    g["3"]["inputs"].update(seed=seed, steps=2)
    g["5"]["inputs"].update(width=64, height=64)
    g["9"]["inputs"].update(embed_provenance=True, filename_prefix="c2pa")
    if lora:
        g["20"] = {
            "class_type": "LoraLoader",
            "inputs": {
                "model": ["4", 0],
                "clip": ["4", 1],
                "lora_name": "kiln-outline.safetensors",
                "strength_model": 0.8,
                "strength_clip": 0.8,
            },
        }
        g["3"]["inputs"]["model"] = ["20", 0]
        g["6"]["inputs"]["clip"] = ["20", 1]
    if control:
        g["21"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "kiln-shapes-edges.safetensors"}}
        g["22"] = {"class_type": "LoadImage", "inputs": {"image": control}}
        g["23"] = {
            "class_type": "ControlNetApplyAdvanced",
            "inputs": {
                "positive": ["6", 0],
                "negative": ["7", 0],
                "control_net": ["21", 0],
                "image": ["22", 0],
                "strength": 0.5,
                "start_percent": 0.0,
                "end_percent": 1.0,
            },
        }
        g["3"]["inputs"]["positive"], g["3"]["inputs"]["negative"] = ["23", 0], ["23", 1]
    return g


def test_txt2img_output_carries_a_signed_manifest_that_says_what_made_it(shapes, signing, caplog):
    ex, folders = shapes
    caplog.set_level(logging.DEBUG)
    events, files = run(ex, txt2img(lora=True))
    data = files[0].read_bytes()
    store = verify(data, signing["ca"])
    assert store["validation_state"] == "Trusted", store.get("validation_results")
    m = active(store)
    assert m["claim_generator_info"][0]["name"] == "Kiln"
    assert m["claim_generator_info"][0]["version"] == c2pa_sign.kiln_version()
    assert m["signature_info"]["common_name"] == "Kiln tests signer"
    (created,) = actions(m)
    assert created["action"] == "c2pa.created"
    assert created["digitalSourceType"] == c2pa_sign.SOURCE_GENERATED
    assert created["parameters"]["seed"] == 42 and created["parameters"]["sampler"] == "euler"
    gen = assertion(m, c2pa_sign.LABEL)
    ckpt = next(x for x in gen["models"] if x["role"] == "checkpoint")
    assert ckpt["name"] == CKPT.name and ckpt["sha256"] == hashlib.sha256(CKPT.read_bytes()).hexdigest()
    lora = next(x for x in gen["models"] if x["role"] == "lora")
    lora_file = REPO / "models" / "loras" / "kiln-outline.safetensors"
    assert lora["sha256"] == hashlib.sha256(lora_file.read_bytes()).hexdigest() and lora["strength_model"] == 0.8
    assert gen["samplers"][0]["seed"] == 42 and gen["samplers"][0]["steps"] == 2
    assert gen["graph_sha256"] and "graph" not in gen  # the graph only when c2pa.include_graph is on
    assert PROMPT_TEXT not in json.dumps(store)  # private prompts stay out of the manifest
    assert not m.get("ingredients")
    # the key never leaves its file: not in the output, the events or the log
    body = "".join(ln for ln in signing["key"].read_text().splitlines() if not ln.startswith("-----"))
    for line in [body, *[ln for ln in signing["key"].read_text().splitlines() if len(ln) >= 16]]:
        assert line.encode() not in data
        assert line not in repr(events) and line not in caplog.text
    assert config.redact(f"oops {body}") == "oops ***"


def test_changing_one_pixel_breaks_verification(shapes, signing, tmp_path):
    ex, _ = shapes
    _, files = run(ex, txt2img(seed=3))
    tampered = png_with_one_pixel_changed(files[0].read_bytes())
    store = verify(tampered, signing["ca"])
    assert store["validation_state"] == "Invalid"
    failures = store["validation_results"]["activeManifest"]["failure"]
    assert any(f["code"] == "assertion.dataHash.mismatch" for f in failures)

    from kiln.cli import main

    bad = tmp_path / "tampered.png"
    bad.write_bytes(tampered)
    assert main(["provenance", str(files[0])]) == 0
    assert main(["provenance", "--require-trusted", str(files[0])]) == 0
    assert main(["provenance", str(bad)]) != 0
    assert main(["provenance", str(files[0]), str(bad)]) != 0  # one bad file fails the command
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8), "white").save(plain)
    assert main(["provenance", str(plain)]) != 0  # no manifest at all


def test_kiln_provenance_prints_and_emits_json(shapes, signing, capsys, monkeypatch):
    ex, _ = shapes
    _, files = run(ex, txt2img(seed=5))
    from kiln.cli import main

    assert main(["provenance", str(files[0])]) == 0
    out = capsys.readouterr().out
    assert "TRUSTED" in out and "c2pa.created (trainedAlgorithmicMedia" in out and "Kiln tests signer" in out
    assert main(["provenance", "--json", str(files[0])]) == 0
    v = json.loads(capsys.readouterr().out)
    assert v["status"] == "trusted" and v["actions"][0]["action"] == "c2pa.created"
    assert v["claim_generator"] == f"Kiln {c2pa_sign.kiln_version()}"
    monkeypatch.delenv("KILN_C2PA_TRUST_ANCHORS")  # without the CA: intact, but not trusted
    assert main(["provenance", "--json", str(files[0])]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "valid"
    assert main(["provenance", "--require-trusted", str(files[0])]) != 0


def test_img2img_with_controlnet_names_its_parent_and_keeps_the_parent_chain(shapes, signing):
    ex, folders = shapes
    # the source image is itself a signed Kiln output: the chain must survive into the edit
    _, first = run(ex, txt2img(seed=11))
    (folders.input_dir / "source.png").write_bytes(first[0].read_bytes())
    Image.new("RGB", (64, 64), "white").save(folders.input_dir / "edges.png")
    g = json.loads((REPO / "graphs" / "img2img.json").read_text())
    g["10"]["inputs"]["image"] = "source.png"
    g["3"]["inputs"].update(steps=2)
    g["9"]["inputs"].update(embed_provenance=True, filename_prefix="c2pa-i2i")
    control = txt2img(control="edges.png")
    for k in ("21", "22", "23"):
        g[k] = control[k]
    g["3"]["inputs"]["positive"], g["3"]["inputs"]["negative"] = ["23", 0], ["23", 1]
    _, files = run(ex, g)
    store = verify(files[0].read_bytes(), signing["ca"])
    assert store["validation_state"] == "Trusted", store.get("validation_results")
    m = active(store)
    opened, edited = actions(m)
    assert opened["action"] == "c2pa.opened" and edited["action"] == "c2pa.edited"
    assert edited["digitalSourceType"] == c2pa_sign.SOURCE_GENERATED and edited["parameters"]["seed"] == 7
    by_rel = {i["relationship"]: i for i in m["ingredients"]}
    parent = by_rel["parentOf"]
    assert parent["title"] == "source.png"
    # the parent's own manifest came along and still validates: the chain txt2img -> img2img
    parent_manifest = store["manifests"][parent["active_manifest"]]
    assert actions(parent_manifest)[0]["action"] == "c2pa.created"
    assert not [f for f in parent["validation_results"]["activeManifest"]["failure"] if "untrusted" not in f["code"]]
    assert by_rel["inputTo"]["title"] == "edges.png"
    roles = {x["role"] for x in assertion(m, c2pa_sign.LABEL)["models"]}
    assert {"checkpoint", "controlnet"} <= roles


def test_include_graph_and_keys_from_the_config_file(shapes, pki, monkeypatch, tmp_path):
    cfg = tmp_path / "kiln.yaml"
    cfg.write_text(f"c2pa:\n  key: {pki['key']}\n  certs: {pki['certs']}\n  include_graph: true\n  thumbnail: false\n")
    monkeypatch.setenv("KILN_CONFIG", str(cfg))
    for v in ("KILN_C2PA_KEY", "KILN_C2PA_CERTS", "KILN_C2PA_TRUST_ANCHORS"):
        monkeypatch.delenv(v, raising=False)
    ex, _ = shapes
    _, files = run(ex, txt2img(seed=9))
    store = verify(files[0].read_bytes(), pki["ca"])
    m = active(store)
    gen = assertion(m, c2pa_sign.LABEL)
    assert gen["graph"]["6"]["inputs"]["text"] == PROMPT_TEXT
    assert gen["graph_sha256"] == c2pa_sign.graph_sha256(gen["graph"])
    assert "thumbnail" not in m


def test_without_a_key_outputs_are_unsigned_and_a_warning_says_so_once(shapes, monkeypatch, tmp_path, caplog, capfd):
    (tmp_path / "kiln.yaml").write_text("{}\n")
    monkeypatch.setenv("KILN_CONFIG", str(tmp_path / "kiln.yaml"))
    for v in ("KILN_C2PA_KEY", "KILN_C2PA_CERTS"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(c2pa_sign, "_warned", type(c2pa_sign._warned)())
    ex, _ = shapes
    caplog.set_level(logging.WARNING, logger="kiln.provenance")
    _, files = run(ex, txt2img(seed=1))
    _, more = run(ex, txt2img(seed=2))
    assert c2pa_sign.read(files[0].read_bytes()) is None and c2pa_sign.read(more[0].read_bytes()) is None
    assert "kiln_provenance" in Image.open(files[0]).text  # the unsigned record stays
    warnings = [r for r in caplog.records if "no C2PA signing key" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING

    from kiln.cli import main

    graph = tmp_path / "g.json"
    graph.write_text(json.dumps(txt2img()))
    assert main(["validate", "--json", str(graph)]) == 0  # (--json: the plain form prints to stderr)
    (warning,) = json.loads(capfd.readouterr().out)["warnings"]
    assert "embed_provenance" in warning and "no C2PA signing key" in warning
    plain = txt2img()
    plain["9"]["inputs"]["embed_provenance"] = False
    graph.write_text(json.dumps(plain))
    assert main(["validate", "--json", str(graph)]) == 0
    assert "warnings" not in json.loads(capfd.readouterr().out)


def test_half_configured_signing_is_an_error(monkeypatch, tmp_path, pki):
    (tmp_path / "kiln.yaml").write_text("{}\n")
    monkeypatch.setenv("KILN_CONFIG", str(tmp_path / "kiln.yaml"))
    monkeypatch.setenv("KILN_C2PA_KEY", str(pki["key"]))
    monkeypatch.delenv("KILN_C2PA_CERTS", raising=False)
    with pytest.raises(engine.NodeError, match="certificate chain"):
        c2pa_sign.signing_config()
    assert "only the key" in (c2pa_sign.status() or "")


def test_a_certificate_that_does_not_match_the_key_fails_the_saver_without_leaking_it(
    shapes, signing, provider_pki, monkeypatch, caplog
):
    monkeypatch.setenv("KILN_C2PA_CERTS", str(provider_pki["certs"]))  # another key's certificate
    ex, folders = shapes
    before = set(folders.output_dir.glob("bad*"))
    events: list = []
    g = txt2img(seed=4)
    g["9"]["inputs"]["filename_prefix"] = "bad"
    result = ex.run(engine.Graph.from_json(g), sink=events.append)
    assert not result.ok and "C2PA signing failed" in result.error.message
    assert set(folders.output_dir.glob("bad*")) == before  # nothing written unsigned
    body = "".join(ln for ln in signing["key"].read_text().splitlines() if not ln.startswith("-----"))
    for line in [body[:64], body[-40:]]:
        assert line not in repr(result.error) and line not in repr(events) and line not in caplog.text


# -- providers (the fake OpenAI server) ----------------------------------------------------------------------


def provider_graph(prefix: str, saver: str = "SaveImage", **saver_inputs) -> dict:
    return {
        "load": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "edit": {
            "class_type": "OpenAIImageEdit",
            "inputs": {"image": ["load", 0], "prompt": "make it blue", "model": "gpt-image-1", "size": "1024x1024"},
        },
        "save": {
            "class_type": saver,
            "inputs": {"images": ["edit", 0], "generation_info": ["edit", 3], **saver_inputs},
        },
    }


@pytest.fixture()
def provider_run(openai_server, executor, signing, tmp_path):
    inp = executor.folders.input_dir
    inp.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.indices((64, 64)).sum(0) % 256).astype(np.uint8)).convert("RGB").save(inp / "photo.png")

    def go(graph: dict) -> tuple[engine.RunResult, list]:
        events: list = []
        res = executor.run(engine.Graph.from_json(graph), sink=events.append)
        assert res.ok, res.error
        return res, events

    return go


def test_provider_edit_names_the_input_as_parent_and_the_provider_model(provider_run, executor, signing, caplog):
    from tests.providers.conftest import API_KEY

    caplog.set_level(logging.DEBUG)
    res, events = provider_run(provider_graph("edit", embed_provenance=True, filename_prefix="edit"))
    img = res.outputs["save"]["images"][0]
    data = executor.folders.safe_path("output", img["filename"], img["subfolder"]).read_bytes()
    store = verify(data, signing["ca"])
    assert store["validation_state"] == "Trusted"
    m = active(store)
    opened, edited = actions(m)
    assert opened["action"] == "c2pa.opened" and edited["action"] == "c2pa.edited"
    assert edited["digitalSourceType"] == c2pa_sign.SOURCE_GENERATED
    assert edited["parameters"]["model"] == "gpt-image-1" and edited["parameters"]["provider"] == "openai"
    (parent,) = m["ingredients"]
    assert parent["relationship"] == "parentOf" and parent["title"] == "photo.png"
    gen = assertion(m, c2pa_sign.LABEL)
    assert gen["providers"][0]["request_id"]
    assert API_KEY not in json.dumps(store) and API_KEY not in repr(events) and API_KEY not in caplog.text


@pytest.mark.parametrize("fmt,mime", [("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp")])
def test_s3_outputs_in_every_format_are_signed(provider_run, signing, s3, moto_url, fmt, mime):
    graph = provider_graph(
        "s3",
        "SaveImageS3",
        bucket=s3.bucket,
        endpoint_url=moto_url,
        path_style=True,
        format=fmt,
        key_template="out/{index}.{ext}",
    )
    res, _ = provider_run(graph)
    obj = s3.get_object(Bucket=s3.bucket, Key=f"out/00000.{fmt}")
    data = obj["Body"].read()
    assert obj["ContentType"] == mime
    store = verify(data, signing["ca"])
    assert store["validation_state"] == "Trusted", store.get("validation_results")
    m = active(store)
    assert m["title"] == f"save.{fmt}" and [a["action"] for a in actions(m)] == ["c2pa.opened", "c2pa.edited"]


def test_save_file_s3_signs_image_bytes(provider_run, signing, s3, moto_url, executor):
    png = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(png, format="PNG")

    class Bytes(engine.Node):
        outputs = ("*",)

        def run(self):
            return png.getvalue()

    executor.registry.register(Bytes, "TestPngBytes")
    graph = {
        "b": {"class_type": "TestPngBytes", "inputs": {}},
        "s": {
            "class_type": "SaveFileS3",
            "inputs": {
                "data": ["b", 0],
                "bucket": s3.bucket,
                "endpoint_url": moto_url,
                "path_style": True,
                "extension": "png",
                "key_template": "f.{ext}",
            },
        },
    }
    provider_run(graph)
    data = s3.get_object(Bucket=s3.bucket, Key="f.png")["Body"].read()
    assert verify(data, signing["ca"])["validation_state"] == "Trusted"


def test_a_providers_own_manifest_is_kept_as_the_parent(
    provider_run, openai_server, provider_pki, signing, executor, monkeypatch
):
    """gpt-image-1 and Imagen sign what they return: saved unchanged, it stays the parent ingredient."""
    from tests.providers import fake_providers

    def signed_render(size, prompt, fmt, transparent, seed):
        raw = fake_providers.render("64x64", prompt, "png", transparent, seed)
        cfg = c2pa_sign.SigningConfig(
            key_path=provider_pki["key"],
            certs_path=provider_pki["certs"],
            alg=None,
            tsa_url=None,
            include_graph=False,
            thumbnail=0,
        )
        t = c2pa_sign.Trace(providers=[{"class": "FakeOpenAI", "model": "gpt-image-1"}])
        return c2pa_sign.sign_bytes(raw, "image/png", t, [{"provider": "fake-openai", "model": "gpt-image-1"}], cfg)

    monkeypatch.setattr(openai_server, "_image", signed_render)
    graph = {
        "gen": {"class_type": "OpenAIImageGenerate", "inputs": {"prompt": "a kiln", "model": "gpt-image-1"}},
        "save": {
            "class_type": "SaveImage",
            "inputs": {"images": ["gen", 0], "generation_info": ["gen", 3], "embed_provenance": True},
        },
    }
    res, _ = provider_run(graph)
    img = res.outputs["save"]["images"][0]
    data = executor.folders.safe_path("output", img["filename"], img["subfolder"]).read_bytes()
    anchors = signing["ca"].read_bytes() + provider_pki["ca"].read_bytes()
    store = c2pa_sign.read(data, anchors)
    assert store is not None and store["validation_state"] == "Trusted", store
    m = active(store)
    assert [a["action"] for a in actions(m)] == ["c2pa.opened"]
    (parent,) = m["ingredients"]
    assert parent["relationship"] == "parentOf"
    provider_manifest = store["manifests"][parent["active_manifest"]]
    assert provider_manifest["signature_info"]["common_name"] == "Fake OpenAI signer"
    assert actions(provider_manifest)[0]["digitalSourceType"] == c2pa_sign.SOURCE_GENERATED


def test_trace_reads_inpaint_outpaint_and_custom_sampling_from_the_graph(tmp_path):
    """Pure graph reading: no run. Inpainting regenerates part of the image (a composite), the mask image is
    an input rather than the parent, and seeds and samplers are followed through their own nodes."""
    g = {
        "img": {"class_type": "LoadImage", "inputs": {"image": "room.png"}},
        "mask": {"class_type": "LoadImageMask", "inputs": {"image": "hole.png", "channel": "alpha"}},
        "pad": {"class_type": "ImagePadForOutpaint", "inputs": {"image": ["img", 0], "left": 8}},
        "enc": {"class_type": "VAEEncodeForInpaint", "inputs": {"pixels": ["pad", 0], "mask": ["mask", 0]}},
        "seed": {"class_type": "PrimitiveInt", "inputs": {"value": 1234}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": ["seed", 0]}},
        "sel": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m"}},
        "ks": {
            "class_type": "SamplerCustomAdvanced",
            "inputs": {"noise": ["noise", 0], "sampler": ["sel", 0], "latent_image": ["enc", 0]},
        },
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "embed_provenance": True}},
        "other": {"class_type": "SaveImage", "inputs": {"images": ["img", 0]}},  # not upstream of "save"
    }
    t = c2pa_sign.trace(g, "save")
    assert [p["title"] for p in t.parents] == ["room.png"] and [h["title"] for h in t.hints] == ["hole.png"]
    assert t.partial
    (s,) = t.samplers
    assert s["noise_seed"] == 1234 and s["sampler_name"] == "dpmpp_2m"
    m = c2pa_sign.build_manifest(
        t,
        [],
        mime="image/png",
        title="save.png",
        graph=g,
        include_graph=False,
        parent_label="parent",
        parent_is_source=False,
        prompt_id="p",
        node_id="save",
        when="2026-01-01T00:00:00+00:00",
    )
    opened, edited = actions(m)
    assert opened["parameters"]["ingredientIds"] == ["parent"]
    assert edited["digitalSourceType"] == c2pa_sign.SOURCE_COMPOSITE
    assert edited["parameters"]["seed"] == 1234 and edited["parameters"]["sampler"] == "dpmpp_2m"
    assert assertion(m, c2pa_sign.LABEL)["graph_sha256"] == c2pa_sign.graph_sha256(g)
