"""Attached files as the page shows them: links that only their owner's pages get, and the route
that serves them.

A link is ``/attachments/<sha256>/<name>?o=<owner>&s=<signature>``: the signature is an HMAC
(SHA-256, the app's key kept in the data folder) of the owner and the file's hash, so a link
cannot be made up or moved to another owner, and guessing a path gives nothing. The route checks
the signature, then that the owner still has a message with that file (a deleted conversation's
files are gone for it), then sends the bytes: images inline, documents as downloads, never
sniffed (``nosniff``), never cached by a shared cache.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from modules.history.attachments import AttachmentFiles
from modules.history.records import Attachment
from modules.history.store import HistoryStore

PREFIX = "/attachments"
_HASH = re.compile(r"[0-9a-f]{64}")
_IMAGES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
           (b"GIF89a", "image/gif"))


def _image_type(data: bytes) -> str | None:
    """The type of an image the page shows inline (by its first bytes); None: any other file, sent
    as a download."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((mime for magic, mime in _IMAGES if data.startswith(magic)), None)


class FileLinks:
    def __init__(self, key: bytes, store: HistoryStore, files: AttachmentFiles):
        self.key, self.store, self.files = key, store, files

    def _signature(self, owner: str, sha256: str) -> str:
        digest = hmac.new(self.key, f"{owner}\n{sha256}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:18]).decode("ascii")

    def url(self, owner: str, attachment: Attachment) -> str:
        """The link to ``attachment`` for pages of ``owner``."""
        name = quote(Path(attachment.name).name or "file", safe="")
        query = urlencode({"o": owner, "s": self._signature(owner, attachment.sha256)})
        return f"{PREFIX}/{attachment.sha256}/{name}?{query}"

    async def serve(self, request: Request) -> Response:
        sha256 = request.path_params.get("sha256", "")
        owner, signature = request.query_params.get("o", ""), request.query_params.get("s", "")
        if (not _HASH.fullmatch(sha256) or not owner or not signature
                or not hmac.compare_digest(signature, self._signature(owner, sha256))):
            return PlainTextResponse("Not found.", status_code=404)
        data = await asyncio.to_thread(self._find, owner, sha256)
        if data is None:
            return PlainTextResponse("Not found.", status_code=404)
        mime = _image_type(data)
        name = Path(request.path_params.get("name", "")).name or "file"
        disposition = ("inline" if mime else "attachment") + f"; filename*=UTF-8''{quote(name, safe='')}"
        return Response(data, media_type=mime or "application/octet-stream", headers={
            "Content-Disposition": disposition, "X-Content-Type-Options": "nosniff",
            "Cache-Control": "private, max-age=86400", "Content-Security-Policy": "default-src 'none'"})

    def _find(self, owner: str, sha256: str) -> bytes | None:
        """The file's bytes, if a message of ``owner`` still attaches it."""
        if not self.store.owns_attachment(owner, sha256):
            return None
        try:
            return self.files.read(sha256)
        except FileNotFoundError:
            return None

    def routes(self) -> list[Any]:
        return [Route(PREFIX + "/{sha256}/{name}", self.serve, methods=["GET"])]
