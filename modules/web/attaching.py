"""Files attached to a message on the page: checked and kept when the message is sent, and turned
into what the model is sent (the text of each document in a labelled block, each image scaled to
the model's limit; a model that cannot see images gets its name instead, unless it is the
question being asked, which is refused with a sentence).

Everything that reads or decodes a file runs off the event loop. A file that cannot be taken
(too big, too many, a type that cannot be read, an image that does not decode, a broken or
encrypted PDF, a zip bomb...) gets one sentence naming it and the reason; the message is then not
sent, and its text and the other files stay in the box.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from modules.config import AttachmentsConfig
from modules.core import tokens
from modules.core.documents import Document, DocumentProblem, document_block, kind_of, read_document
from modules.core.images import OPENAI_LIMIT, ImageProblem, for_model, inspect_image
from modules.history.attachments import AttachmentFiles
from modules.history.conversation import Conversation, Extras, Node
from modules.history.records import Attachment
from modules.i18n import Translator
from modules.providers import ChatModel, Image

log = logging.getLogger(__name__)

DOCUMENT_CACHE_CHARS = 20_000_000  # text of documents kept read, in all (a document is read again after)


@dataclass
class Taken:
    """What the box's files gave: the attachments kept, and the refusals (one sentence each) with
    the paths of the files that stay in the box."""

    attachments: list[Attachment]
    problems: list[str]
    kept_paths: list[str]


class Attaching:
    def __init__(self, config: AttachmentsConfig, files: AttachmentFiles, t: Translator):
        self.config, self.files, self.t = config, files, t
        self._documents: OrderedDict[str, Document] = OrderedDict()
        self._cached_chars = 0

    # -- sending ---------------------------------------------------------------------------------
    async def take(self, paths: list[str], lang: str) -> Taken:
        """Check and keep the files of a message being sent (in the order attached)."""
        taken = Taken([], [], [])
        if len(paths) > self.config.max_files:
            taken.problems.append(self.t.text(lang, "attach.too_many", count=len(paths), limit=self.config.max_files))
            taken.kept_paths = list(paths)
            return taken
        for path in paths:
            name = Path(path).name
            try:
                taken.attachments.append(await asyncio.to_thread(self._take_one, Path(path)))
                taken.kept_paths.append(path)
            except _Refused as refused:
                taken.problems.append(self.t.text(lang, "attach.refused", file=name, reason=refused.reason(self.t, lang)))
        return taken

    def _take_one(self, path: Path) -> Attachment:
        limit = int(self.config.max_mb * 1024 * 1024)
        try:
            size = path.stat().st_size
            if size > limit:
                raise _Refused("attach.too_big", size=_megabytes(size), limit=_megabytes(limit))
            data = path.read_bytes()
        except OSError as exc:
            raise _Refused("attach.unreadable", reason=exc.strerror or str(exc)) from None
        if len(data) > limit:  # (grew meanwhile)
            raise _Refused("attach.too_big", size=_megabytes(len(data)), limit=_megabytes(limit))
        name = path.name
        kind = kind_of(name, data)
        if kind is None:
            raise _Refused("attach.unknown_type")
        try:
            if kind == "image":
                mime, width, height = inspect_image(data)
                sha256 = self.files.put(data)
                return Attachment(sha256, name, mime, len(data), "image", width, height)
            document = read_document(name, data, max_chars=self.config.max_document_chars,
                                     max_pages=self.config.max_pdf_pages)
        except (ImageProblem, DocumentProblem) as problem:
            raise _Refused("attach.problem", reason=str(problem)) from None
        sha256 = self.files.put(data)
        self._remember(sha256, document)
        count, _ = tokens.count(document.text, "")
        return Attachment(sha256, name, _document_mime(name), len(data), "document", tokens=count)

    # -- asking ----------------------------------------------------------------------------------
    @staticmethod
    def images_of(node: Node) -> list[Attachment]:
        return [a for a in node.attachments if a.kind == "image"]

    async def extras(self, conversation: Conversation, model: ChatModel, upto: int | None = None) -> Extras:
        """What the attachments of the branch's questions add to the request for ``model``."""
        turns = conversation.turns if upto is None else conversation.turns[:upto + 1]
        wanted = [turn.question for turn in turns if turn.question.attachments]
        if not wanted:
            return {}
        return await asyncio.to_thread(self._extras, wanted, model.vision)

    def _extras(self, questions: list[Node], vision: bool) -> Extras:
        extras: Extras = {}
        for question in questions:
            blocks: list[str] = []
            images: list[Image] = []
            for attachment in question.attachments:
                try:
                    if attachment.kind == "document":
                        blocks.append(document_block(self._document(attachment)))
                    elif vision:
                        images.append(for_model(attachment.name, self.files.read(attachment.sha256),
                                                max_long=OPENAI_LIMIT[0], max_short=OPENAI_LIMIT[1]))
                    else:
                        blocks.append(f"[image: {attachment.name}]")
                except (FileNotFoundError, DocumentProblem, ImageProblem) as exc:  # (its file is gone)
                    log.warning("attachment %s of message %s left out: %s", attachment.name, question.id, exc)
                    blocks.append(f"[{attachment.kind}: {attachment.name}, no longer available]")
            extras[question.id] = ("\n\n".join(blocks), tuple(images))
        return extras

    def _document(self, attachment: Attachment) -> Document:
        document = self._documents.get(attachment.sha256)
        if document is not None:
            self._documents.move_to_end(attachment.sha256)
            return document
        document = read_document(attachment.name, self.files.read(attachment.sha256),
                                 max_chars=self.config.max_document_chars, max_pages=self.config.max_pdf_pages)
        self._remember(attachment.sha256, document)
        return document

    def _remember(self, sha256: str, document: Document) -> None:
        if sha256 in self._documents:
            return
        self._documents[sha256] = document
        self._cached_chars += len(document.text)
        while self._cached_chars > DOCUMENT_CACHE_CHARS and len(self._documents) > 1:
            _, dropped = self._documents.popitem(last=False)
            self._cached_chars -= len(dropped.text)


class _Refused(Exception):
    def __init__(self, key: str, **values: object):
        self.key, self.values = key, values

    def reason(self, t: Translator, lang: str) -> str:
        return t.text(lang, self.key, **self.values)


def _megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB"


_MIMES = {".pdf": "application/pdf", ".docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
          ".html": "text/html", ".htm": "text/html", ".json": "application/json", ".csv": "text/csv",
          ".md": "text/markdown"}


def _document_mime(name: str) -> str:
    return _MIMES.get(Path(name).suffix.lower(), "text/plain")


