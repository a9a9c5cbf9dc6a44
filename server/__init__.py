"""Kiln's server: ComfyUI's HTTP + websocket protocol, a durable queue and history, replayable events.

``create_app(executor, ServerConfig(...))`` builds the aiohttp application; ``serve(...)`` runs it.

Modules: ``app`` (route table, lifecycle), ``http_api`` and ``files`` (handlers), ``ws`` (the socket),
``service`` (queue, worker, recovery, control), ``event_router`` (events to sockets and to the log), ``jobs``
(the job model), ``hub`` (sockets and their bounded send queues), ``store`` (SQLite), ``security``
(middlewares), ``protocol`` (wire format), ``webhook``, ``config``, ``keys`` (typed app state). For the
graph editor: ``frontend`` (the editor at ``/``, packs' web files), ``userdata`` (users, settings, user
files), ``catalogue`` (model folders and metadata, empty catalogues), ``job_routes`` (the Jobs API).

Decisions beyond ComfyUI, for whoever comes next:

- Every route is at ``/x`` and ``/api/x``. New: ``GET /api/prompt/{id}`` (status: pending, running, success,
  error, interrupted, unknown; ``?wait=true&timeout=S`` blocks until done) and
  ``GET /api/prompt/{id}/events?since=K`` (``&wait=true`` long-polls until there is something new);
  ``POST /prompt?wait=true`` answers with the result. Unknown ids answer 404 with ``{"status": "unknown"}``.
- Per-prompt events carry a top-level ``"seq"``; the final ``executing {node: null}`` is logged too, so a
  replay always ends with it. Events of a re-run after a crash are numbered from ``attempt * 1_000_000`` so
  they follow anything a client saw of the attempt that died.
- ``progress_state`` is a full snapshot of the prompt's node states, as ComfyUI sends it (the editor replaces
  its map with each one), up to 64 started nodes; past that it carries the running, changed and most recently
  finished nodes only, so a huge graph does not cost a quadratic resend.
- Re-posting a prompt_id with the same graph answers 200 with the original number and does nothing; with a
  different graph, 409 ``prompt_id_conflict``. Interrupting or deleting an unknown id is 404, a finished one
  409. Interrupting a pending prompt cancels it alone (history status ``interrupted``).
- Keys of ``extra_data`` that look like secrets (api_key, token, secret, password, authorization) are kept
  in memory for the run only: never in the database, history or events. A prompt re-run after a crash
  therefore runs without them.
- Output frames (SaveImageWebsocket) are logged with their event and replayed in place; previews are not.
- One server per data directory (an advisory lock), so two processes never run one queue.
- Queue-size ``status`` messages go at once to the prompt's own client; other sockets get the latest value
  at most every 50 ms, only when it changed for them.
- Strict JSON both ways (``params``): NaN, Infinity, floats that overflow and integers over 40 digits are a
  typed 400; every query parameter goes through one parser; answers and logged events write non-finite
  numbers as ``null``. A submission's strings are capped (``max_string_bytes``); a large body is read,
  decoded, checked and encoded in a worker thread with the cyclic GC paused, so the loop keeps answering.
- A stored row that cannot be read is moved to the ``quarantine`` table and logged; it never stops start-up.
- Output files are journaled per (prompt, node, n-th output) through the executor service
  ``output_files`` (``journal``), so a re-run after a crash rewrites the same file: one file per output.
- Tracebacks sent to clients name files relative to the package or the node pack; libraries and Python
  itself appear as ``<module>``. The full traceback is logged. ``/system_stats`` hides secret arguments.
- A socket that connects with its clientId gets the final events of that client's prompts that finished in
  the last ``late_delivery_window`` seconds while none of its sockets was connected, once.
"""

from .app import ROUTES, create_app, serve
from .config import InsecureBind, ServerConfig, is_loopback
from .store import StoreLocked

__all__ = ["ROUTES", "create_app", "serve", "ServerConfig", "InsecureBind", "StoreLocked", "is_loopback"]
