"""Object storage for the outputs of workers that do not share the server's disk: ``--output-store
s3://bucket/prefix`` (any S3-compatible endpoint: ``--output-store-endpoint URL``; credentials from the usual
AWS environment variables or config files, on the server and on every worker).

A worker's savers still write their file locally (atomically, see ``kiln.nodes.outputs``) and then put it at

    <prefix>/<type>/<prompt_id>/<subfolder>/<name>          type: output or temp

so every object of a prompt is under one key prefix: before a prompt is run again (its worker died) the
server deletes what the earlier attempt stored, and a re-run never leaves a duplicate. History entries name
``subfolder = "<prompt_id>/<subfolder>"``, which is what a client passes back to ``/view``: the server then
streams the object (or redirects to a presigned URL, ``--output-serve redirect``).

Inputs go the other way: before the server hands a prompt to a worker it puts the files of its input folder
that the prompt names (uploads, or files copied there) at ``<prefix>/input/<subfolder>/<name>``, and the
worker fetches those it lacks into its own input folder before it validates and runs the prompt. So
``LoadImage`` and uploads work on workers that share no disk with the server.

boto3 is imported when a store is made (the ``s3`` extra), never at import time.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger("kiln.server")
SERVICE = "output_store"  # the executor service savers look up (kiln.nodes.outputs)


@dataclass(frozen=True)
class StoreConfig:
    url: str  # s3://bucket/prefix
    endpoint_url: str | None = None

    def __post_init__(self) -> None:
        u = urlparse(self.url)
        if u.scheme != "s3" or not u.netloc:
            raise ValueError(f"--output-store {self.url!r}: write s3://BUCKET/PREFIX")

    @property
    def bucket(self) -> str:
        return urlparse(self.url).netloc

    @property
    def prefix(self) -> str:
        return urlparse(self.url).path.strip("/")


class OutputStore:
    def __init__(self, config: StoreConfig):
        import boto3
        from botocore.config import Config

        self.config = config
        self.bucket = config.bucket
        self.prefix = config.prefix
        self.client = boto3.client(
            "s3", endpoint_url=config.endpoint_url, config=Config(retries={"max_attempts": 5, "mode": "standard"})
        )

    def key(self, type_: str, subfolder: str, name: str) -> str:
        """``subfolder`` as history names it (``<prompt_id>/<subfolder>``)."""
        parts = [self.prefix, type_, *[p for p in subfolder.split("/") if p], name]
        return "/".join(p for p in parts if p)

    # -- the worker's side ------------------------------------------------------------------------
    def put_output(self, prompt_id: str, folder: Path, name: str, data: bytes, roots: dict[str, Path]) -> None:
        """Store a file a saver wrote to ``folder`` (under one of ``roots``: type -> folder)."""
        type_, sub = "output", ""
        for t, root in roots.items():
            try:
                rel = os.path.relpath(os.path.realpath(folder), os.path.realpath(root))
            except ValueError:
                continue
            if not rel.startswith(".."):
                type_, sub = t, "" if rel == "." else rel.replace(os.sep, "/")
                break
        self.client.put_object(Bucket=self.bucket, Key=self.key(type_, f"{prompt_id}/{sub}", name), Body=data)

    def fetch_inputs(self, names: dict[str, int], input_dir: Path) -> list[str]:
        """Bring the input files a prompt reads (relative name -> size) into this worker's ``input_dir`` from
        ``<prefix>/input/``, unless a file of that size is already there; atomically (temporary name, then
        rename). Returns the names fetched."""
        fetched = []
        root = os.path.realpath(input_dir)
        for rel, size in names.items():
            target = Path(root, rel)
            if not os.path.realpath(target).startswith(root + os.sep):
                continue  # the server only sends names inside its input folder; never write elsewhere
            try:
                if target.stat().st_size == size:
                    continue
            except OSError:
                pass
            sub, _, name = rel.rpartition("/")
            data = self.get("input", sub, name)
            if data is None:
                log.warning("input file %r is not in the store: the node reading it will say so", rel)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
            fetched.append(rel)
        return fetched

    # -- the server's side ------------------------------------------------------------------------
    def put_input(self, rel: str, path: Path) -> None:
        """Store a file of the server's input folder at ``<prefix>/input/<rel>`` (for workers elsewhere)."""
        sub, _, name = rel.rpartition("/")
        with open(path, "rb") as f:
            self.client.put_object(Bucket=self.bucket, Key=self.key("input", sub, name), Body=f.read())

    def delete_prompt(self, prompt_id: str) -> int:
        """Delete every object a prompt's earlier attempts stored; how many."""
        n = 0
        for type_ in ("output", "temp"):
            prefix = self.key(type_, prompt_id, "") + "/"
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})
                    n += len(keys)
        return n

    def get(self, type_: str, subfolder: str, name: str) -> bytes | None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key(type_, subfolder, name))
        except self.client.exceptions.NoSuchKey:
            return None
        except Exception as exc:  # a 404 without the modelled error, or the store is unreachable
            if getattr(exc, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return obj["Body"].read()

    def exists(self, type_: str, subfolder: str, name: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(type_, subfolder, name))
            return True
        except Exception:
            return False

    def presigned(self, type_: str, subfolder: str, name: str, seconds: int = 3600) -> str:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.key(type_, subfolder, name)}, ExpiresIn=seconds
        )


def scope_outputs(outputs: dict, prompt_id: str) -> dict:
    """History outputs with each stored file's subfolder prefixed by the prompt id (where its object is)."""

    def fix(value: Any) -> Any:
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, dict):
            if isinstance(value.get("filename"), str) and value.get("type") in ("output", "temp"):
                sub = str(value.get("subfolder") or "")
                return {**value, "subfolder": f"{prompt_id}/{sub}" if sub else prompt_id}
            return {k: fix(v) for k, v in value.items()}
        return value

    return {node: fix(ui) for node, ui in outputs.items()}
