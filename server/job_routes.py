"""The Jobs API (``/api/jobs``): the queue and history as one list of jobs, in the shape of ComfyUI's.

The editor's queue and history panels read only this. Every job is a stored prompt, so the list comes
from the SQLite store and is the same after a restart. Statuses: ``pending``, ``in_progress``,
``completed``, ``failed`` and ``cancelled`` (an interrupted prompt). Cancelling is idempotent: cancelling a
job that already ended answers its state and changes nothing.
"""

from __future__ import annotations

from aiohttp import web

from .http_api import MAX_ITEMS, read_json, service
from .params import BadParam, json_response, query_int, query_str
from .security import error_response
from .service import ApiError
from .store import JOB_SORTS, JOB_STATUS, JobRow, PromptRow

STORE_STATUS = {v: k for k, v in JOB_STATUS.items()}
PREVIEWABLE = ("images", "video", "audio")
MODEL_3D = (".obj", ".fbx", ".gltf", ".glb")
MAX_CANCEL = 10_000  # job ids in one batch cancel


def _ms(seconds: float | None) -> int | None:
    return int(seconds * 1000) if seconds is not None else None


def _previewable(media: str, item: dict) -> bool:
    fmt = item.get("format")
    name = item.get("filename")
    return (
        media in PREVIEWABLE
        or (isinstance(fmt, str) and fmt.startswith(("video/", "audio/")))
        or (isinstance(name, str) and name.lower().endswith(MODEL_3D))
    )


def outputs_summary(outputs: dict | None) -> tuple[int, dict | None]:
    """How many output items a job has, and the one to preview (a saved output before a temporary one)."""
    count, best, fallback = 0, None, None
    for node_id, per_node in (outputs or {}).items():
        if not isinstance(per_node, dict):
            continue
        for media, items in per_node.items():
            if media == "animated" or not isinstance(items, list):
                continue
            for item in items:
                if not isinstance(item, dict):
                    continue
                count += 1
                if best is None and _previewable(media, item):
                    found = {**item, "nodeId": node_id, "mediaType": media}
                    if item.get("type") == "output":
                        best = found
                    elif fallback is None:
                        fallback = found
    return count, best or fallback


def _error_of(messages: list | None) -> dict | None:
    for entry in messages or []:
        if isinstance(entry, list) and len(entry) >= 2 and entry[0] == "execution_error" and isinstance(entry[1], dict):
            return entry[1]
    return None


def job_summary(row: JobRow) -> dict:
    count, preview = outputs_summary(row.outputs)
    job = {
        "id": row.prompt_id,
        "status": JOB_STATUS.get(row.status, row.status),
        "priority": int(row.number) if float(row.number).is_integer() else row.number,
        "create_time": row.create_time if row.create_time is not None else _ms(row.created),
        "execution_start_time": _ms(row.started),
        "execution_end_time": _ms(row.finished),
        "execution_error": _error_of(row.messages),
        "outputs_count": count,
        "preview_output": preview,
        "workflow_id": row.workflow_id,
    }
    return {k: v for k, v in job.items() if v is not None}  # ComfyUI leaves out what is unknown


def job_detail(row: PromptRow) -> dict:
    history = row.history or {}
    outputs = history.get("outputs") if isinstance(history.get("outputs"), dict) else {}
    extra = row.extra_data
    pnginfo = extra.get("extra_pnginfo")
    wf = pnginfo.get("workflow") if isinstance(pnginfo, dict) else None
    job = job_summary(
        JobRow(
            row.prompt_id,
            row.number,
            row.status,
            row.created,
            row.started,
            row.finished,
            extra.get("create_time"),
            wf.get("id") if isinstance(wf, dict) else None,
            outputs,
            (history.get("status") or {}).get("messages"),
        )
    )
    job["outputs"] = outputs
    job["execution_status"] = history.get("status")
    job["workflow"] = {"prompt": row.prompt, "extra_data": extra}
    return job


def _statuses(request: web.Request) -> list[str]:
    raw = query_str(request, "status")
    if not raw:
        return list(JOB_STATUS)
    names = [s.strip() for s in raw.split(",") if s.strip()]
    bad = [s for s in names if s not in STORE_STATUS]
    if bad:
        raise BadParam(f"Invalid status value(s): {', '.join(bad)}", f"use {', '.join(STORE_STATUS)}")
    return [STORE_STATUS[s] for s in names]


async def list_jobs(request: web.Request) -> web.Response:
    statuses = _statuses(request)
    sort_by = query_str(request, "sort_by") or "created_at"
    if sort_by not in JOB_SORTS:
        raise BadParam(f"Invalid sort_by {sort_by!r}", f"use {' or '.join(JOB_SORTS)}")
    sort_order = query_str(request, "sort_order") or "desc"
    if sort_order not in ("asc", "desc"):
        raise BadParam(f"Invalid sort_order {sort_order!r}", "use asc or desc")
    limit = query_int(request, "limit", None, 1, MAX_ITEMS)
    offset = query_int(request, "offset", 0, 0, MAX_ITEMS) or 0
    workflow_id = query_str(request, "workflow_id") or None
    rows, total = service(request).store.jobs(statuses, workflow_id, sort_by, sort_order == "desc", limit, offset)
    jobs = [job_summary(r) for r in rows]
    return json_response(
        {
            "jobs": jobs,
            "pagination": {"offset": offset, "limit": limit, "total": total, "has_more": offset + len(jobs) < total},
        }
    )


async def get_job(request: web.Request) -> web.Response:
    pid = request.match_info["job_id"]
    row = service(request).store.get(pid)
    if row is None:
        return error_response(404, "job_not_found", "Job not found", pid)
    return json_response(job_detail(row))


def _cancel(request: web.Request, pid: str) -> str | None:
    """Cancel one job; its status afterwards (``in_progress`` while a running one stops), None if unknown."""
    svc = service(request)
    known = svc.store.status_of(pid)
    if known is None:
        return None
    if known[0] in ("pending", "running"):
        try:
            svc.interrupt(pid)
        except ApiError:  # it finished meanwhile: cancelling it again is a no-op
            pass
    after = svc.store.status_of(pid)
    return JOB_STATUS.get(after[0], after[0]) if after is not None else None


async def cancel_job(request: web.Request) -> web.Response:
    pid = request.match_info["job_id"]
    status = _cancel(request, pid)
    if status is None:
        return error_response(404, "job_not_found", "Job not found", pid)
    return json_response({"id": pid, "status": status})


async def cancel_jobs(request: web.Request) -> web.Response:
    """``{"job_ids": [...]}``: each is cancelled if it has not ended. Answers ``cancelled`` (the ids this
    request cancelled, as the editor reads it), every known job's status after it, and the unknown ids."""
    try:
        data = await read_json(request)
    except ApiError as exc:
        return json_response(exc.body, status=exc.status)
    ids = data.get("job_ids") if isinstance(data, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or len(ids) > MAX_CANCEL:
        return error_response(400, "bad_request", "'job_ids' must be a list of job ids", f"at most {MAX_CANCEL}")
    jobs, missing, cancelled = [], [], []
    store = service(request).store
    for pid in dict.fromkeys(ids):
        before = store.status_of(pid)
        status = _cancel(request, pid)
        if status is None:
            missing.append(pid)
            continue
        jobs.append({"id": pid, "status": status})
        if before is not None and before[0] in ("pending", "running"):
            cancelled.append(pid)
    return json_response({"cancelled": cancelled, "jobs": jobs, "not_found": missing})
