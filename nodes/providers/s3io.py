"""S3 for the storage nodes: clients, atomic uploads, bounded downloads, errors that say what to fix.

- Credentials come from boto3's standard chain (environment, shared files, instance roles); nothing here
  reads them from a graph.
- An object is either complete or absent: small bodies go up with one ``PutObject`` (atomic on S3);
  large ones go through boto3's transfer manager, which uploads ``s3.max_concurrency`` parts at a time and
  aborts the multipart upload on any failure, so no parts linger.
- botocore's "standard" retry mode retries throttling and 5xx with backoff; the attempt count comes from
  the config's ``s3.max_attempts``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.engine import NodeError

from . import config

MIB = 1024 * 1024

# What boto3's credential and region chain reads from the environment: a client is reused only while all
# of it (and the shared config/credentials files) is unchanged.
_AWS_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CA_BUNDLE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_EC2_METADATA_DISABLED",
)


@dataclass(frozen=True)
class Target:
    endpoint_url: str
    region: str
    path_style: bool


def settings() -> dict:
    s = config.section("s3")
    return {
        "multipart_threshold": int(s.get("multipart_threshold", 16 * MIB)),
        "part_size": max(5 * MIB, int(s.get("part_size", 8 * MIB))),
        "max_attempts": int(s.get("max_attempts", 5)),
        "max_concurrency": int(s.get("max_concurrency", 8)),
        "connect_timeout_s": float(s.get("connect_timeout_s", 10)),
        "read_timeout_s": float(s.get("read_timeout_s", 60)),
    }


def credentials_identity() -> str:
    """A digest of everything boto3's default chain builds a client's credentials and region from: the
    ``AWS_*`` environment and the shared config/credentials files (path, mtime, size). Secrets stay out
    of cache keys; only their digest is kept."""
    h = hashlib.sha256()
    for name in _AWS_ENV:
        h.update(f"{name}={os.environ.get(name, '')}\0".encode())
    for var, default in (("AWS_CONFIG_FILE", "~/.aws/config"), ("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")):
        path = Path(os.environ.get(var) or default).expanduser()
        try:
            st = path.stat()
            h.update(f"{path}:{st.st_mtime_ns}:{st.st_size}\0".encode())
        except OSError:
            h.update(f"{path}:-\0".encode())
    return h.hexdigest()


def client(t: Target) -> Any:
    """A boto3 S3 client for ``t`` with the config's retry, timeout and pool settings.

    Clients are cached because building one costs a session, endpoint resolution and a connection pool,
    and reusing one keeps connections warm across nodes. The key holds everything the client depends on
    (target, the ``s3`` settings, :func:`credentials_identity`), so editing the config file or the AWS
    environment gives a new client without a restart; the cache is small and least-recently-used.
    """
    try:
        import boto3  # noqa: F401
    except ImportError as exc:  # pragma: no cover - only without the extra
        raise NodeError(
            "the S3 nodes need boto3", hint='pip install -e ".[s3]" from your Kiln checkout (or pip install boto3)'
        ) from exc
    s = settings()
    return _client(
        t, s["max_attempts"], s["connect_timeout_s"], s["read_timeout_s"], s["max_concurrency"], credentials_identity()
    )


@functools.lru_cache(maxsize=8)
def _client(
    t: Target,
    max_attempts: int,
    connect_timeout_s: float,
    read_timeout_s: float,
    max_concurrency: int,
    credentials: str,
) -> Any:
    import boto3
    from botocore.config import Config

    cfg = Config(
        retries={"total_max_attempts": max_attempts, "mode": "standard"},
        s3={"addressing_style": "path" if t.path_style else "auto"},
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        max_pool_connections=max(10, max_concurrency * 2),
        signature_version="s3v4",
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=t.endpoint_url or None, region_name=t.region or None, config=cfg
    )


def to_node_error(exc: BaseException, *, action: str, bucket: str, key: str | None = None) -> NodeError:
    from botocore import exceptions as bx

    where = f"s3://{bucket}/{key}" if key else f"bucket '{bucket}'"
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return NodeError(
            f"{action} {where}: no AWS credentials found",
            hint="set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role; "
            "credentials are never graph inputs",
        )
    if isinstance(exc, bx.EndpointConnectionError | bx.ConnectTimeoutError | bx.ReadTimeoutError):
        return NodeError(
            f"{action} {where}: cannot reach the S3 endpoint ({exc})",
            input_name="endpoint_url",
            hint="check endpoint_url (for MinIO/R2 include the scheme and port) and the network",
        )
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        meta = exc.response.get("ResponseMetadata", {})
        code = err.get("Code", "?")
        status = meta.get("HTTPStatusCode", "?")
        rid = meta.get("RequestId") or meta.get("HTTPHeaders", {}).get("x-amz-request-id") or "none"
        retries = meta.get("RetryAttempts", 0)
        tail = f" after {retries + 1} attempts" if retries else ""
        head = (
            f"{action} {where} failed: S3 {code} (HTTP {status}, request id {rid}){tail}: "
            f"{config.redact(err.get('Message', ''))}"
        )
        if code in ("NoSuchBucket",):
            return NodeError(head, input_name="bucket", hint="create the bucket or fix its name")
        if code in ("NoSuchKey", "404", "NotFound"):
            return NodeError(head, input_name="key", hint="check the key; S3 keys are case-sensitive")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
            return NodeError(
                head,
                hint="the credentials from the AWS chain lack access to this bucket, or the region/endpoint is wrong",
            )
        if code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "301", "400"):
            return NodeError(head, input_name="region", hint="set region to the bucket's region")
        if code in ("InvalidStorageClass",):
            return NodeError(head, input_name="storage_class", hint="this store does not offer that storage class")
        return NodeError(head, hint="S3 refused the request; see the code above")
    if isinstance(exc, bx.BotoCoreError):
        return NodeError(f"{action} {where}: {exc}")
    return NodeError(f"{action} {where}: {type(exc).__name__}: {exc}")


def put(
    c: Any,
    bucket: str,
    key: str,
    data: bytes,
    *,
    content_type: str,
    metadata: dict[str, str],
    storage_class: str = "STANDARD",
) -> dict:
    """Upload ``data`` so that the object is complete or absent; returns {etag, size, multipart}.

    Below ``s3.multipart_threshold``: one PutObject. Above: boto3's transfer manager, ``s3.part_size``
    parts, ``s3.max_concurrency`` of them in flight; when a part fails for good it aborts the multipart
    upload and re-raises that part's botocore error.
    """
    s = settings()
    extra = {"ContentType": content_type, "Metadata": metadata}
    if storage_class and storage_class != "STANDARD":
        extra["StorageClass"] = storage_class
    if len(data) < s["multipart_threshold"]:
        r = c.put_object(Bucket=bucket, Key=key, Body=data, **extra)
        return {"etag": r.get("ETag", "").strip('"'), "size": len(data), "multipart": False}
    from boto3.s3.transfer import TransferConfig

    cfg = TransferConfig(
        multipart_threshold=s["multipart_threshold"],
        multipart_chunksize=s["part_size"],
        max_concurrency=s["max_concurrency"],
        use_threads=True,
        preferred_transfer_client="classic",
    )
    c.upload_fileobj(io.BytesIO(data), bucket, key, ExtraArgs=extra, Config=cfg)
    try:  # the transfer manager does not return CompleteMultipartUpload's answer
        etag = c.head_object(Bucket=bucket, Key=key).get("ETag", "")
    except Exception:  # the object is written; its ETag is only informational, so never fail (or roll back) here
        etag = ""
    return {"etag": etag.strip('"'), "size": len(data), "multipart": True, "parts": -(-len(data) // s["part_size"])}


def get(c: Any, bucket: str, key: str, *, max_bytes: int) -> tuple[bytes, str, str]:
    """(body, content type, etag), refusing objects over ``max_bytes`` before downloading them."""
    head = c.head_object(Bucket=bucket, Key=key)
    size = int(head.get("ContentLength", 0))
    if size > max_bytes:
        raise NodeError(
            f"s3://{bucket}/{key} is {size} bytes, over max_bytes={max_bytes}",
            input_name="max_bytes",
            hint="raise max_bytes or store a smaller image",
        )
    r = c.get_object(Bucket=bucket, Key=key, IfMatch=head["ETag"])
    body = r["Body"].read(max_bytes + 1)
    if len(body) > max_bytes:
        raise NodeError(
            f"s3://{bucket}/{key} grew past max_bytes={max_bytes} while downloading", input_name="max_bytes"
        )
    return body, (r.get("ContentType") or "").split(";")[0].strip().lower(), head["ETag"].strip('"')


def ascii_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """S3 user metadata must be ASCII and small: drop what is not, truncate long values."""
    out: dict[str, str] = {}
    for k, v in meta.items():
        if v is None:
            continue
        k = str(k).lower()
        s = str(v)
        if not k.isascii() or not k.replace("-", "").replace("_", "").isalnum():
            continue
        s = s.encode("ascii", "replace").decode("ascii").replace("\n", " ")[:512]
        out[k] = s
    return out
