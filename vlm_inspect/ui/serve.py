"""Serving the page to others: limits in front of Gradio's routes, and the one way the app is launched.

:class:`ServeGuard` is an ASGI middleware on the app Gradio builds:

- **Only the routes the page and the API need** take a POST: joining the queue (the page's events and
  ``/inspect``), ``/call/<api>``, uploads, cancelling, and ``/run/`` for the page's unqueued events.
  Gradio's other POST routes (recordings, component servers, streams, the editor) are refused, the
  queue has no REST route around it (``api_open=False``), and a JSON body has at most ``MAX_JSON_BYTES``.
- **A budget per client address**: requests a minute, jobs waiting or running at once, and a share of
  the upload space.
- **Uploads**: one at a time; at most ``MAX_FILES`` files, each an image by file name *and* content
  (Pillow must recognise the header). Anything else, and anything else the request left in the upload
  folder (Gradio's parser keeps stray parts), is deleted at once, and the client is told in one
  sentence. Gradio's own upload route accepts any file; these checks are ours.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
RATE_PER_MINUTE = 60         # a person moving the slider sends a few a minute
QUEUE_SIZE = 16              # jobs waiting for the one model worker
JOBS_PER_CLIENT = 3          # of those, waiting or running for one address
UPLOAD_QUOTA = 2_000_000_000  # bytes the uploads may take at once
UPLOAD_TTL_S = 1800          # uploads older than this are deleted (Gradio's delete_cache), and first when full
MAX_FILES = 4                # files in one upload request (the page sends one)
MAX_JSON_BYTES = 1_000_000   # a request body other than an upload (1000 classes of 100 characters fit)
# /run/ and /api/ stay for the page's few unqueued events (loading a sample); with api_open=False Gradio
# refuses them for every queued function, so no job can skip the queue through them
_POST = re.compile(r"^(/gradio_api)?/(queue/join|upload|cancel|(call|call/v2|run|api)/[\w.-]+)/?$")


class ServeGuard:
    """Per-client limits, a POST allow-list and upload checks (see the module doc). ``queue`` returns
    Gradio's queue (to count a client's jobs); ``max_file_size`` is the per-file upload cap in bytes."""

    def __init__(self, app: Any, rate_per_minute: int = RATE_PER_MINUTE, upload_quota: int = UPLOAD_QUOTA,
                 upload_ttl_s: int = UPLOAD_TTL_S, max_file_size: int = 25_000_000,
                 jobs_per_client: int = JOBS_PER_CLIENT, queue: Callable[[], Any] | None = None) -> None:
        self.app, self.rate, self.quota, self.ttl = app, int(rate_per_minute), int(upload_quota), int(upload_ttl_s)
        self.max_request = MAX_FILES * int(max_file_size) + 1_000_000
        self.jobs_per_client, self.queue = int(jobs_per_client), queue
        self._seen: dict[str, deque[float]] = {}
        self._uploads: dict[str, tuple[float, int, str]] = {}  # accepted uploads on disk: path -> (time, bytes, client)
        self._lock = threading.Lock()
        self._upload_lock = asyncio.Lock()  # one upload at a time: its leftovers are told apart by a folder diff

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if not _POST.match(path):
            log.info("refused a POST to %s", path[:200])
            return await _reply(send, 404, "this server does not offer that route")
        headers = dict(scope.get("headers") or [])
        try:
            length = int(headers.get(b"content-length", b""))
        except ValueError:
            return await _reply(send, 411, "a request must state its size (Content-Length)")
        upload = path.rstrip("/").endswith("/upload")
        if length > (self.max_request if upload else MAX_JSON_BYTES):
            return await _reply(send, 413, f"the request is too large ({length:,} bytes)")
        client = (scope.get("client") or ("unknown",))[0]
        wait = self._take(client)
        if wait is not None:
            return await _reply(send, 429, f"too many requests from your address (at most {self.rate} a minute): "
                                           f"try again in {wait} s", [(b"retry-after", str(wait).encode())])
        if upload:
            async with self._upload_lock:
                return await self._upload(scope, receive, send, length, client)
        if ("/queue/join" in path or "/call/" in path) and self._jobs_of(client) >= self.jobs_per_client:
            return await _reply(send, 429, f"your address already has {self.jobs_per_client} jobs waiting or "
                                           "running: wait for them to finish")
        return await self.app(scope, receive, send)

    def _jobs_of(self, client: str) -> int:
        """Jobs of ``client`` in Gradio's queue, waiting or running."""
        queue = self.queue() if self.queue is not None else None
        if queue is None:
            return 0
        events = [e for job in getattr(queue, "active_jobs", []) if job for e in job]
        events += [e for q in getattr(queue, "event_queue_per_concurrency_id", {}).values() for e in q.queue]
        return sum(1 for e in events if getattr(getattr(getattr(e, "request", None), "client", None), "host",
                                                None) == client)

    def _take(self, client: str) -> int | None:
        """None if ``client`` may send one more request now, else the seconds to wait."""
        now = time.monotonic()
        with self._lock:
            seen = self._seen.setdefault(client, deque())
            while seen and seen[0] < now - 60:
                seen.popleft()
            if len(seen) >= self.rate:
                return max(1, int(seen[0] + 60 - now + 1))
            seen.append(now)
            if len(self._seen) > 10_000:  # forget clients silent for a minute
                for c in [c for c, d in self._seen.items() if not d or d[-1] < now - 60]:
                    del self._seen[c]
            return None

    async def _upload(self, scope, receive, send, length: int, client: str) -> None:
        from gradio.utils import get_upload_folder

        folder = Path(get_upload_folder())
        if not self._room(length, client, folder):
            return await _reply(send, 507, "the server's upload space is full: try again in a few minutes")
        before = _entries(folder)
        messages: list[dict] = []

        async def keep(message: dict) -> None:  # hold the answer until Gradio has stored the files
            messages.append(message)

        try:
            await self.app(scope, receive, keep)
        finally:
            start = next((m for m in messages if m["type"] == "http.response.start"), None)
            body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
            paths: list[str] = []
            if start is not None and start.get("status") == 200:
                try:
                    paths = [str(p) for p in json.loads(body)]
                except (ValueError, TypeError):
                    paths = []
            kept = {Path(p).resolve() for p in paths}
            for entry in _entries(folder) - before:  # whatever else the request left behind
                if not any(k == entry or entry in k.parents for k in kept):
                    _remove_tree(entry)
        if start is None or start.get("status") != 200:
            for m in messages:
                await send(m)
            return
        bad = [p for p in paths if not _is_image_file(Path(p))]
        if bad or len(paths) > MAX_FILES:
            for p in paths:  # refuse the whole upload, and keep none of it
                _remove(Path(p), folder)
            if bad:
                return await _reply(send, 415, f"only images can be uploaded (PNG, JPEG, WebP, BMP, GIF or TIFF); "
                                               f"{Path(bad[0]).name[:80]!r} is not one")
            return await _reply(send, 413, f"at most {MAX_FILES} files can be uploaded at once")
        now = time.time()
        with self._lock:
            for p in paths:
                try:
                    self._uploads[p] = (now, os.stat(p).st_size, client)
                except OSError:
                    pass
        for m in messages:
            await send(m)

    def _room(self, length: int, client: str, folder: Path) -> bool:
        """Whether ``length`` more bytes from ``client`` fit: the quota, and a tenth of it per client
        (so one address cannot lock everybody out). The oldest uploads past a quarter of their lifetime
        are deleted first to make room. Only uploads count (not Gradio's copies of the samples)."""
        with self._lock:
            for p in [p for p in self._uploads if not os.path.exists(p)]:  # deleted by Gradio's delete_cache
                del self._uploads[p]
            mine = sum(size for _, size, c in self._uploads.values() if c == client)
            if mine + length > max(self.quota // 10, self.max_request):
                return False
            used = sum(size for _, size, _ in self._uploads.values())
            cutoff = time.time() - self.ttl / 4
            for p, (t, size, _) in sorted(self._uploads.items(), key=lambda kv: kv[1][0]):
                if used + length <= self.quota or t > cutoff:
                    break
                _remove(Path(p), folder)
                del self._uploads[p]
                used -= size
            return used + length <= self.quota


def _entries(folder: Path) -> set[Path]:
    try:
        return {p.resolve() for p in folder.iterdir()}
    except OSError:
        return set()


def _remove_tree(path: Path) -> None:
    import shutil

    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def _is_image_file(path: Path) -> bool:
    from ..images import sniff_image

    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
    except OSError:
        return False
    return sniff_image(head) is not None


def _remove(path: Path, folder: Path) -> None:
    try:
        path.unlink(missing_ok=True)
        if path.parent != folder and path.parent.parent == folder:
            path.parent.rmdir()  # Gradio keeps each upload in a folder of its own
    except OSError:
        pass


async def _reply(send, status: int, message: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    """A plain-text answer: what the browser and a raw HTTP client show as the error."""
    body = message.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()), *(extra or [])]})
    await send({"type": "http.response.body", "body": body})


def theme():
    """Gradio's default look with system fonts: the default theme fetches web fonts from Google, and on
    the embedded suite nothing may leave the machine, not even from the browser."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


def serve(demo, host: str = "127.0.0.1", port: int = 7860, max_file_size: str = "25mb",
          rate_per_minute: int = RATE_PER_MINUTE, queue_size: int = QUEUE_SIZE, upload_quota: int = UPLOAD_QUOTA,
          jobs_per_client: int = JOBS_PER_CLIENT, block: bool = True, **launch: Any):
    """Launch ``demo`` as ``python app.py`` does: one model worker behind a bounded queue (no REST route
    around it), :class:`ServeGuard` in front of every route, and at most 200 sessions' state kept.
    Returns what ``Blocks.launch`` returns."""
    from gradio.utils import _parse_file_size
    from starlette.middleware import Middleware


    demo.queue(default_concurrency_limit=1, max_size=queue_size, api_open=False)
    guard = Middleware(ServeGuard, rate_per_minute=rate_per_minute, upload_quota=upload_quota,
                       max_file_size=_parse_file_size(max_file_size) or 25_000_000, jobs_per_client=jobs_per_client,
                       queue=lambda: getattr(demo, "_queue", None))
    launch.setdefault("state_session_capacity", 200)  # each keeps the last inspection (images) for export
    return demo.launch(server_name=host, server_port=port, max_file_size=max_file_size, show_error=True,
                       ssr_mode=False, footer_links=["api"], theme=theme(), prevent_thread_lock=not block,
                       app_kwargs={"middleware": [guard]}, **launch)
