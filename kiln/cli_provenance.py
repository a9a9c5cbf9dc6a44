"""``kiln provenance FILE...``: read and verify the C2PA manifests in images, and the validate warning.

For each file: the signature and the hashes of the asset (valid, or the failure codes), the signing
certificate (issuer, common name) and whether its chain ends at a trusted anchor (``--trust`` PEM, the
``c2pa.trust_anchors`` setting or ``KILN_C2PA_TRUST_ANCHORS``), the claim generator, the actions and the
ingredients with their own validation state. Exit status: 0 when every file holds a valid manifest,
1 when one has none, 2 when one is invalid (tampered, broken signature, unreadable store), and 2 for an
untrusted certificate too when ``--require-trusted`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_NO_MANIFEST, EXIT_INVALID = 0, 1, 2

# failure codes that only say the certificate does not chain to a configured anchor: the signature and
# hashes still verified, so the file is intact
_TRUST_CODES = {"signingCredential.untrusted"}


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("provenance", help="read and verify the C2PA manifests (Content Credentials) of images")
    p.add_argument("files", nargs="+", metavar="FILE", help="PNG, JPEG or WebP files")
    p.add_argument("--json", action="store_true", help="print each file's manifest store and verdict as JSON")
    p.add_argument("--trust", metavar="PEM", help="CA certificates to trust (default: c2pa.trust_anchors)")
    p.add_argument(
        "--require-trusted", action="store_true", help="fail unless the signing certificate chains to a trusted CA"
    )
    p.set_defaults(fn=cmd_provenance)
    return p


def verify(data: bytes, anchors: bytes | None = None) -> dict:
    """The verdict on one file's bytes: ``status`` is ``valid``, ``trusted``, ``invalid`` or ``none``."""
    from kiln.nodes.providers import c2pa_sign

    try:
        store = c2pa_sign.read(data, anchors)
    except Exception as exc:  # a store that cannot even be parsed is a broken (or tampered) one
        return {"status": "invalid", "errors": [f"{type(exc).__name__}: {exc}"], "manifest": None}
    if store is None:
        return {"status": "none", "errors": [], "manifest": None}
    label = store.get("active_manifest")
    active = (store.get("manifests") or {}).get(label) or {}
    results = store.get("validation_results") or {}
    failures = [f for f in (results.get("activeManifest") or {}).get("failure", [])]
    codes = [f.get("code") for f in failures]
    hard = [f for f in failures if f.get("code") not in _TRUST_CODES]
    state = str(store.get("validation_state") or "")
    if hard or state == "Invalid" and not set(codes) <= _TRUST_CODES:
        status = "invalid"
    elif state == "Trusted":
        status = "trusted"
    else:
        status = "valid"
    actions = []
    for a in active.get("assertions") or []:
        if str(a.get("label", "")).startswith("c2pa.actions"):
            actions.extend((a.get("data") or {}).get("actions") or [])
    ingredients = []
    for ing in active.get("ingredients") or []:
        ir = (ing.get("validation_results") or {}).get("activeManifest") or {}
        ingredients.append(
            {
                "title": ing.get("title"),
                "relationship": ing.get("relationship"),
                "format": ing.get("format"),
                "manifest": ing.get("active_manifest"),
                "failures": [f.get("code") for f in ir.get("failure", [])],
            }
        )
    gen = active.get("claim_generator_info") or []
    generator = " ".join(str(x) for x in (gen[0].get("name"), gen[0].get("version")) if x) if gen else None
    return {
        "status": status,
        "errors": [f"{f.get('code')}: {f.get('explanation')}" for f in hard],
        "trusted": "signingCredential.untrusted" not in codes and state == "Trusted",
        "claim_generator": generator or active.get("claim_generator"),
        "signature": active.get("signature_info"),
        "actions": actions,
        "ingredients": ingredients,
        "assertions": [a.get("label") for a in active.get("assertions") or []],
        "manifest": store,
    }


def _print(path: str, v: dict, stream: Any = None) -> None:
    stream = stream or sys.stdout
    print(f"{path}: {v['status'].upper()}", file=stream)
    if v["status"] == "none":
        print("  no C2PA manifest", file=stream)
        return
    for e in v["errors"]:
        print(f"  error: {e}", file=stream)
    if v.get("manifest") is None:
        return
    sig = v.get("signature") or {}
    chain = "trusted" if v.get("trusted") else "not chained to a trusted CA (pass --trust CA.pem)"
    print(f"  signed by: {sig.get('common_name') or '?'} (issuer {sig.get('issuer') or '?'}), {chain}", file=stream)
    if sig.get("time"):
        print(f"  time stamp: {sig['time']}", file=stream)
    print(f"  generator: {v.get('claim_generator')}", file=stream)
    for a in v.get("actions") or []:
        src = str(a.get("digitalSourceType") or "").rsplit("/", 1)[-1]
        desc = (a.get("parameters") or {}).get("description")
        extra = ", ".join(x for x in (src, desc) if x)
        print(f"  action: {a.get('action')}{f' ({extra})' if extra else ''}", file=stream)
    for i in v.get("ingredients") or []:
        note = f", own manifest {i['manifest']}" if i.get("manifest") else ""
        bad = f", FAILURES {i['failures']}" if [c for c in i["failures"] if c not in _TRUST_CODES] else ""
        print(f"  ingredient: {i.get('title')} [{i.get('relationship')}]{note}{bad}", file=stream)


def cmd_provenance(args: argparse.Namespace) -> int:
    from kiln.nodes.providers import c2pa_sign

    if not c2pa_sign.available():
        print("kiln: reading C2PA manifests needs the c2pa package: pip install -e '.[c2pa]'", file=sys.stderr)
        return EXIT_INVALID
    anchors = Path(args.trust).expanduser().read_bytes() if args.trust else c2pa_sign.trust_anchors()
    worst = EXIT_OK
    out = []
    for f in args.files:
        try:
            data = Path(f).read_bytes()
        except OSError as exc:
            v = {"status": "invalid", "errors": [f"cannot read: {exc.strerror or exc}"], "manifest": None}
        else:
            v = verify(data, anchors)
        code = {"none": EXIT_NO_MANIFEST, "invalid": EXIT_INVALID}.get(v["status"], EXIT_OK)
        if args.require_trusted and v["status"] == "valid":
            code = EXIT_INVALID
        worst = max(worst, code)
        if args.json:
            out.append({"file": f, **v})
        else:
            _print(f, v)
    if args.json:
        print(json.dumps(out if len(out) > 1 else out[0], indent=2, default=str))
    return worst


def unsigned_warnings(graph: Any, registry: Any, result: Any) -> None:
    """``kiln validate``: a warning on every saver with ``embed_provenance`` on when nothing will be signed."""
    from kiln.engine.issues import Issue

    savers = []
    for node in graph.nodes.values():
        spec = registry.get(node.class_type) if isinstance(node.class_type, str) else None
        if spec is None or "embed_provenance" not in spec.inputs:
            continue
        v = node.inputs.get("embed_provenance", spec.inputs["embed_provenance"].options.get("default"))
        if v is True:
            savers.append(node)
    if not savers:
        return
    from kiln.nodes.providers import c2pa_sign

    reason = c2pa_sign.status()
    if reason is None:
        return
    for node in savers:
        result.warnings.setdefault(node.id, []).append(
            Issue.of(
                "c2pa_unsigned",
                "Provenance is embedded unsigned",
                reason,
                input_name="embed_provenance",
                hint=f"node {node.id} ({node.class_type}) has embed_provenance on but {reason}",
            )
        )
