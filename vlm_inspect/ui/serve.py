"""Serving the page to others: limits in front of Gradio's routes, and the one way the app is launched.

:class:`ServeGuard` is an ASGI middleware on the app Gradio builds. It gives each client address a
budget of requests a minute (queue joins, API calls and uploads), refuses an upload once the upload
folder holds its quota, and checks every uploaded file: only images, by file name *and* by content
(Pillow must recognise the header); anything else is deleted at once and refused with one sentence.
Gradio's own upload route accepts any file; these checks are ours.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
RATE_PER_MINUTE = 60         # a person moving the slider sends a few a minute
QUEUE_SIZE = 16              # jobs waiting for the one model worker
UPLOAD_QUOTA = 2_000_000_000  # bytes the upload folder may hold
UPLOAD_TTL_S = 1800          # uploads older than this are deleted (Gradio's delete_cache), and first when full


def _limited(path: str) -> bool:
    return path.endswith(("/queue/join", "/upload")) or "/call/" in path or "/run/" in path


class ServeGuard:
    """Per-client rate limit and upload checks (see the module doc)."""

    def __init__(self, app: Any, rate_per_minute: int = RATE_PER_MINUTE, upload_quota: int = UPLOAD_QUOTA,
                 upload_ttl_s: int = UPLOAD_TTL_S) -> None:
        self.app, self.rate, self.quota, self.ttl = app, int(rate_per_minute), int(upload_quota), int(upload_ttl_s)
        self._seen: dict[str, deque[float]] = {}
        self._uploads: dict[str, tuple[float, int]] = {}  # accepted uploads still on disk: path -> (time, bytes)
        self._lock = threading.Lock()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or not _limited(scope["path"]):
            return await self.app(scope, receive, send)
        client = (scope.get("client") or ("unknown",))[0]
        wait = self._take(client)
        if wait is not None:
            return await _reply(send, 429, f"too many requests from your address (at most {self.rate} a minute): "
                                           f"try again in {wait} s", [(b"retry-after", str(wait).encode())])
        if scope["path"].endswith("/upload"):
            return await self._upload(scope, receive, send)
        return await self.app(scope, receive, send)

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
            if len(self._seen) > 10_000:  # forget idle clients
                for c in [c for c, d in self._seen.items() if not d]:
                    del self._seen[c]
            return None

    async def _upload(self, scope, receive, send) -> None:
        from gradio.utils import get_upload_folder

        folder = Path(get_upload_folder())
        headers = dict(scope.get("headers") or [])
        try:
            length = int(headers.get(b"content-length", b""))
        except ValueError:
            return await _reply(send, 411, "an upload must state its size (Content-Length)")
        if not self._room(length, folder):
            return await _reply(send, 507, "the server's upload space is full: try again in a few minutes")
        messages: list[dict] = []

        async def keep(message: dict) -> None:  # hold the answer until Gradio has stored the files
            messages.append(message)

        await self.app(scope, receive, keep)
        start = next((m for m in messages if m["type"] == "http.response.start"), None)
        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
        if start is not None and start.get("status") == 200:
            try:
                paths = [str(p) for p in json.loads(body)]
            except (ValueError, TypeError):
                paths = []
            bad = [p for p in paths if not _is_image_file(Path(p))]
            if bad:
                for p in paths:  # refuse the whole upload, and keep none of it
                    _remove(Path(p), folder)
                name = Path(bad[0]).name
                return await _reply(send, 415, f"only images can be uploaded (PNG, JPEG, WebP, BMP, GIF or TIFF); "
                                               f"{name[:80]!r} is not one")
            now = time.time()
            with self._lock:
                for p in paths:
                    try:
                        self._uploads[p] = (now, os.stat(p).st_size)
                    except OSError:
                        pass
        for m in messages:
            await send(m)

    def _room(self, length: int, folder: Path) -> bool:
        """Whether ``length`` more bytes fit the quota; the oldest uploads past a quarter of their
        lifetime are deleted first to make room. Only uploads count (not Gradio's copies of the samples)."""
        with self._lock:
            for p in [p for p in self._uploads if not os.path.exists(p)]:  # deleted by Gradio's delete_cache
                del self._uploads[p]
            used = sum(size for _, size in self._uploads.values())
            cutoff = time.time() - self.ttl / 4
            for p, (t, size) in sorted(self._uploads.items(), key=lambda kv: kv[1][0]):
                if used + length <= self.quota or t > cutoff:
                    break
                _remove(Path(p), folder)
                del self._uploads[p]
                used -= size
            return used + length <= self.quota


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


def serve(demo, host: str = "127.0.0.1", port: int = 7860, max_file_size: str = "25mb",
          rate_per_minute: int = RATE_PER_MINUTE, queue_size: int = QUEUE_SIZE, upload_quota: int = UPLOAD_QUOTA,
          block: bool = True, **launch: Any):
    """Launch ``demo`` as ``python app.py`` does: one model worker behind a bounded queue, and
    :class:`ServeGuard` in front of every route. Returns what ``Blocks.launch`` returns."""
    from starlette.middleware import Middleware

    from .launch import theme

    demo.queue(default_concurrency_limit=1, max_size=queue_size)
    guard = Middleware(ServeGuard, rate_per_minute=rate_per_minute, upload_quota=upload_quota)
    return demo.launch(server_name=host, server_port=port, max_file_size=max_file_size, show_error=True,
                       ssr_mode=False, footer_links=["api"], theme=theme(), prevent_thread_lock=not block,
                       app_kwargs={"middleware": [guard]}, **launch)
