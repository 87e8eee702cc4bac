"""Promptflow endpoints: a flow served by ``pf flow serve`` or deployed as an Azure ML online endpoint.

The wire protocol is ``../shared/PROTOCOLS.md`` §4. One ``POST`` per reply,
with one key per flow input::

    {"question": "<the user's last message>",
     "chat_history": [{"inputs": {"question": "..."},
                       "outputs": {"answer": "<whole answer>", "url": [...]}}, ...]}

A flow with an image input (``image_input``, e.g. ``image`` of type ``image`` or ``list``) sees
images (``vision``): the question's images go in that input in Promptflow's own image form,
``{"data:image/png;base64": "<base64>"}`` for one image, a list of such for several
(:func:`flow_images`); a question without images leaves the input out (give it a default in
the flow). ``chat_history`` keeps the text of earlier turns only.

:func:`to_chat_history` writes that history and :func:`from_chat_history` reads it back
(the HTTP API's ``/score`` takes the same shape from its clients).

The request asks for a stream (``Accept: text/event-stream, application/json``)
and the answer's ``Content-Type`` decides how it is read: SSE from a flow whose
chat output is streamed (each event ``{"answer": "<delta>"}``, the flow's
non-streamed outputs all in one first event), or one JSON object from a flow
that does not stream (or any server that prefers JSON). Both are normal.

What is not sent, because a flow has no input for it:

* the **system prompt**: a flow owns its prompt (it is part of the flow's
  own template or code), so a ``system`` message is left out of the request;
* the **generation options** (temperature, max tokens, ...): they are the
  flow's own parameters, set in the flow, not per request.

An earlier user message whose reply produced no text at all (it failed before
its first token) still goes into ``chat_history``, with an empty answer, so
that the flow sees what the user said, as every other adapter does.

Promptflow has no error event and no end marker: a stream is complete when its
body ends cleanly; a failure after the first byte cuts the connection. A cut
after answer text is reported as :class:`~.errors.InterruptedError` (the
streaming layer keeps the partial answer); a cut before any answer text is the
flow failing before it answered, a :class:`~.errors.ServerError` (as is an
``{"error": {...}}`` event, which some servers send instead of cutting).

Retries (:mod:`.retry`) are as for the OpenAI adapter: before the first byte of
an answer only, within ``first_byte_timeout`` per attempt and ``retry_budget``
in all.
"""

from __future__ import annotations

import base64
import json
from contextlib import AsyncExitStack, aclosing
from typing import Any, AsyncIterator, Iterable, Literal, Mapping

import httpx
from httpx_sse import ServerSentEvent
from pydantic import Field, SecretStr, field_validator, model_validator

from . import errors, register, retry
from .base import ChatModel, Delta, GenerationOptions, Image, Message, ModelConfig
from .sse import iter_events
from .text import clip, scrub

ACCEPT = "text/event-stream, application/json"
DEPLOYMENT_HEADER = "azureml-model-deployment"
MAX_BODY_DETAIL = 300  # characters of a non-JSON error body kept as detail
MAX_EVENT_DETAIL = 80  # characters of an unreadable event or answer kept as detail


class PromptflowModelConfig(ModelConfig):
    """A chat flow behind a Promptflow endpoint (``pf flow serve`` or Azure ML)."""

    provider: Literal["promptflow"] = "promptflow"
    url: str = Field(description="The scoring URL, e.g. http://127.0.0.1:8080/score or "
                                 "https://<endpoint>.<region>.inference.ml.azure.com/score.")
    api_key: SecretStr | None = Field(None, description="Endpoint key or token, sent as 'Authorization: Bearer'.")
    deployment: str | None = Field(None, description="Azure ML: the deployment to route to "
                                                     "(azureml-model-deployment header); None: the endpoint's traffic rules.")
    input_field: str = Field("question", min_length=1, description="The flow's chat input.")
    history_field: str = Field("chat_history", min_length=1, description="The flow's chat history input.")
    output_field: str = Field("answer", min_length=1, description="The flow's chat output.")
    image_input: str | None = Field(None, min_length=1, description=(
        "The flow input that receives the question's images (type image, or list for several), in "
        "Promptflow's form {\"data:image/png;base64\": \"...\"}; None: the flow sees no images (vision is false)."))
    connect_timeout: float = Field(10.0, gt=0, description="Seconds to connect.")
    first_byte_timeout: float = Field(30.0, gt=0, description="Seconds from sending the request until the "
                                                               "headers and the first event arrive; for a flow "
                                                               "that does not stream, its whole answer.")
    idle_timeout: float = Field(120.0, gt=0, description="Seconds to wait for the next chunk mid-stream.")
    max_retries: int = Field(2, ge=0, le=10, description="Retries before the first token (no connection, no "
                                                          "first byte in time, 408, 409, 429, 5xx).")
    retry_budget: float = Field(60.0, gt=0, description="Seconds all attempts together (backoff included) may "
                                                         "take before the first token.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL (the flow's scoring URL, e.g. .../score)")
        return value

    @model_validator(mode="after")
    def _images_have_an_input(self) -> "PromptflowModelConfig":
        if self.vision and self.image_input is None:
            raise ValueError("vision: true needs image_input, the flow input that receives the images")
        if self.image_input is not None and self.image_input in (self.input_field, self.history_field):
            raise ValueError(f"image_input {self.image_input!r} is also the flow's chat input or history: "
                             "name the flow's image input")
        return self


@register("promptflow")
class PromptflowChatModel(ChatModel):
    """Streams a chat flow's answer over SSE, or shows a JSON answer whole."""

    Config = PromptflowModelConfig
    config: PromptflowModelConfig

    def __init__(self, config: PromptflowModelConfig):
        super().__init__(config)
        self._client: httpx.AsyncClient | None = None

    vision_hint = "name the flow's image input as image_input in its config entry if it has one"

    def default_vision(self) -> bool:
        return self.config.image_input is not None

    # -- the request -------------------------------------------------------------------
    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            cfg = self.config
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(cfg.idle_timeout, connect=cfg.connect_timeout))
        return self._client

    def headers(self) -> dict[str, str]:
        cfg = self.config
        headers = {"Accept": ACCEPT, "Content-Type": "application/json"}
        if cfg.api_key is not None and cfg.api_key.get_secret_value():
            headers["Authorization"] = f"Bearer {cfg.api_key.get_secret_value()}"
        if cfg.deployment:
            headers[DEPLOYMENT_HEADER] = cfg.deployment
        return headers

    def request_body(self, messages: list[Message]) -> dict[str, Any]:
        """``{input_field: last user message, history_field: earlier turns}``; see the module doc."""
        cfg = self.config
        chat = [m for m in messages if m.role != "system"]
        last_user = max((i for i, m in enumerate(chat) if m.role == "user"), default=None)
        if last_user is None:
            raise errors.BadRequestError("there is no user message to send to the flow")
        history = to_chat_history(chat[:last_user], question=cfg.input_field, answer=cfg.output_field)
        body: dict[str, Any] = {cfg.input_field: chat[last_user].content, cfg.history_field: history}
        images = chat[last_user].images
        if images and cfg.image_input is not None:  # (refuse_images has refused them otherwise)
            body[cfg.image_input] = flow_images(images)
        return body

    # -- the contract -------------------------------------------------------------------
    async def stream(self, messages: list[Message], options: GenerationOptions) -> AsyncIterator[Delta]:
        self.refuse_images(messages)
        body = self.request_body(messages)
        secrets = self.secrets()

        async def attempt(stack: AsyncExitStack) -> AsyncIterator[Delta]:  # closes the connection with stack
            opened = await self._open(stack, body, secrets)
            if isinstance(opened, Delta):  # a JSON answer, whole
                return _once(opened)
            events, first = opened
            return self._read_sse(first, events, secrets)

        async with aclosing(retry.with_retries(self.config, attempt)) as deltas:
            async for delta in deltas:
                yield delta

    async def _open(self, stack: AsyncExitStack, body: dict[str, Any], secrets: list[str]
                    ) -> Delta | tuple[AsyncIterator[ServerSentEvent], ServerSentEvent | None]:
        """Send the request and wait for the answer's first byte: a JSON answer whole, or the
        events of a stream (closed with ``stack``) and the first of them."""
        try:
            response = await stack.enter_async_context(
                self.client.stream("POST", self.config.url, json=body, headers=self.headers()))
            if response.status_code >= 400:
                await response.aread()
                raise self._status_error(response, secrets)
            content_type = response.headers.get("content-type", "").partition(";")[0].strip().lower()
            if content_type == "text/event-stream":
                events = await stack.enter_async_context(aclosing(iter_events(response)))
                try:
                    return events, await anext(events, None)  # a cut or stalled body raises a ModelError
                except errors.InterruptedError as exc:  # not one event: the flow failed before it answered
                    raise errors.ServerError(_flow_failed("the endpoint closed the stream", secrets)) from exc
            if content_type == "application/json" or content_type.endswith("+json"):
                return self._whole(await response.aread(), secrets)
            raise errors.ServerError(
                f"the endpoint answered {content_type or 'no Content-Type'}, "
                "neither an event stream nor JSON: is the URL the flow's scoring URL?",
                status=response.status_code)
        except httpx.ConnectTimeout as exc:
            raise errors.UnreachableError(f"no connection within {self.config.connect_timeout:g} s") from exc
        except httpx.TimeoutException as exc:  # waiting for the headers or a JSON body: a first-byte timeout
            raise errors.TimeoutError("no answer from the endpoint in time") from exc
        except httpx.ConnectError as exc:
            raise errors.UnreachableError(scrub(str(exc) or type(exc).__name__, secrets)) from exc
        except (httpx.TransportError, httpx.StreamError) as exc:  # cut while reading a JSON body
            raise errors.InterruptedError(type(exc).__name__) from exc
        except httpx.InvalidURL as exc:
            raise errors.BadRequestError(f"invalid endpoint URL: {scrub(str(exc), secrets)}") from exc

    async def _read_sse(self, first: ServerSentEvent | None, events: AsyncIterator[ServerSentEvent],
                        secrets: list[str]) -> AsyncIterator[Delta]:
        field = self.config.output_field
        answered = False  # an event of the chat output came
        spoke = False  # ...with text
        index = -1
        event = first
        try:
            while event is not None:
                if event.data:
                    index += 1
                    try:
                        data = json.loads(event.data)
                    except ValueError as exc:
                        raise errors.ServerError(
                            f"unreadable event: {clip(event.data, MAX_EVENT_DETAIL, secrets)!r}") from exc
                    if not isinstance(data, dict):
                        raise errors.ServerError(f"unexpected event: {clip(event.data, MAX_EVENT_DETAIL, secrets)!r}")
                    if field not in data and _is_error(data):
                        why = f"it sent: {_error_text(data['error'])}"
                        raise errors.ServerError(_flow_failed(why, secrets, before=not spoke))
                    if field in data:
                        answered = True
                        piece = _text(data.pop(field))
                        if piece:
                            spoke = True
                            yield Delta(text=piece)
                    elif index > 0 and not answered:
                        # pf sends the non-streamed outputs once, first; every later event is a
                        # piece of the streamed output. Not ours: the flow streams another output.
                        raise self._no_output(set(data))
                    if data:
                        yield Delta(outputs=data)
                event = await anext(events, None)
        except errors.InterruptedError as exc:
            if spoke:
                raise
            # Nothing of the answer came: the flow failed before it answered (pf cuts the stream).
            raise errors.ServerError(_flow_failed("the endpoint closed the stream", secrets)) from exc
        # No end marker exists in this protocol: a body that ended cleanly is a complete answer
        # (possibly empty: a generator that yielded nothing sends no event of its output at all).
        yield Delta(finish_reason="stop")

    def _whole(self, raw: bytes, secrets: list[str]) -> Delta:
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise errors.ServerError(f"unreadable JSON answer: {_clip_bytes(raw, secrets)}") from exc
        if isinstance(data, str):  # a flex flow that returns a bare string
            return Delta(text=data, finish_reason="stop")
        if not isinstance(data, dict):
            raise errors.ServerError(f"unexpected JSON answer: {_clip_bytes(raw, secrets)}")
        if self.config.output_field not in data:
            raise self._no_output(set(data))
        text = _text(data.pop(self.config.output_field))
        return Delta(text=text, outputs=data or None, finish_reason="stop")

    def _no_output(self, keys: set[str]) -> errors.ModelError:
        field = self.config.output_field
        found = f" (it sent: {', '.join(sorted(keys))})" if keys else ""
        return errors.BadRequestError(
            f"the flow's answer has no output {field!r}{found}: set output_field to the flow's chat output")

    # -- errors -------------------------------------------------------------------------
    def _status_error(self, response: httpx.Response, secrets: list[str]) -> errors.ModelError:
        status = response.status_code
        code, message = _error_body(response)
        detail = clip(message, MAX_BODY_DETAIL, secrets)  # a gateway may echo the key
        if status == 406 or (message and "in Accept header is not acceptable" in message):
            # Our Accept takes both formats a flow can answer, so something between us and the
            # flow (a proxy, a gateway's rewrite) or the endpoint's set-up is wrong.
            return errors.NotAcceptableError(detail, status=status)
        if status == 424:
            # Azure ML: the flow (the "model") failed; its own error in the usual body.
            if code == "UserError":
                return errors.BadRequestError(detail, status=status)
            return errors.ServerError(detail, status=status)
        seconds = retry.retry_after(response.headers)
        return retry.asks_to_wait(errors.for_status(status, detail, retry_after=seconds), seconds)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def flow_image(image: Image) -> dict[str, str]:
    """One image as a Promptflow flow input: ``{"data:<mime>;base64": "<base64>"}``."""
    return {f"data:{image.mime};base64": base64.b64encode(image.data).decode("ascii")}


def flow_images(images: Iterable[Image]) -> dict[str, str] | list[dict[str, str]]:
    """The value of a flow's image input: one image's dict, or a list of them for several."""
    values = [flow_image(image) for image in images]
    return values[0] if len(values) == 1 else values


# -- chat_history: written here for a flow, read by the HTTP API's /score ------------------------------
def to_chat_history(messages: Iterable[Message], *, question: str = "question",
                    answer: str = "answer") -> list[dict[str, Any]]:
    """Earlier messages as a flow's ``chat_history``: one turn per user message, the assistant
    reply after it as the turn's outputs (its other outputs kept, the answer shown winning);
    a question that got no reply has an empty answer. System messages are left out."""
    history: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "user":
            history.append({"inputs": {question: message.content}, "outputs": {answer: ""}})
        elif message.role == "assistant" and history:  # an assistant reply answers the turn before it
            history[-1]["outputs"] = {**(message.outputs or {}), answer: message.content}
    return history


def from_chat_history(turns: Iterable[Mapping[str, Any]], *, question: str = "question",
                      answer: str = "answer") -> list[Message]:
    """A ``chat_history`` as messages, the inverse of :func:`to_chat_history`: each turn's
    question, then its answer with the other outputs (none when the turn has neither)."""
    messages: list[Message] = []
    for turn in turns:
        messages.append(Message("user", _text((turn.get("inputs") or {}).get(question))))
        outputs = dict(turn.get("outputs") or {})
        text = _text(outputs.pop(answer, ""))
        if text or outputs:
            messages.append(Message("assistant", text, outputs or None))
    return messages


async def _once(delta: Delta) -> AsyncIterator[Delta]:
    yield delta


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _error_body(response: httpx.Response) -> tuple[str | None, str]:
    """(code, message) of an error answer: Promptflow's ``{"error": {"code", "message"}}``,
    a gateway's ``{"message"}``, or the first characters of a plain-text body."""
    try:
        body = json.loads(response.content)
    except ValueError:
        body = None
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            code, message = inner.get("code"), inner.get("message")
            return (str(code) if code else None), (str(message) if message else "")
        if isinstance(inner, str):
            return None, inner
    content_type = response.headers.get("content-type", "")
    if content_type.startswith("text/plain") and response.content:
        return None, response.text.strip()  # clipped (after scrubbing) by the caller
    return None, ""


def _flow_failed(why: str, secrets: list[str], before: bool = True) -> str:
    """The detail of a flow that failed in its stream, ``why`` scrubbed and clipped."""
    what = "the flow failed before it answered" if before else "the flow failed while it answered"
    return f"{what} ({clip(why, MAX_BODY_DETAIL, secrets)})"


def _is_error(data: dict[str, Any]) -> bool:
    """An ``{"error": {"code": ..., "message": ...}}`` event (a server reporting the flow's failure)."""
    if set(data) != {"error"}:
        return False
    inner = data["error"]
    return isinstance(inner, dict) and bool({"code", "message"} & set(inner))


def _error_text(inner: Any) -> str:
    if isinstance(inner, dict):
        code, message = inner.get("code"), inner.get("message")
        return ": ".join(str(part) for part in (code, message) if part) or json.dumps(inner)
    return str(inner)


def _clip_bytes(raw: bytes, secrets: list[str]) -> str:
    return repr(clip(raw.decode("utf-8", "replace"), MAX_EVENT_DETAIL, secrets))
