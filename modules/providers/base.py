"""The adapter contract every model provider implements.

An adapter is stateless about the conversation: it gets the whole message list
and typed options on every call, yields :class:`Delta` objects, and closes its
upstream connection in ``finally`` (which is what makes Stop stop the upstream).

    class MyModel(ChatModel):
        Config = MyModelConfig            # pydantic, validated from config.yaml

        async def stream(self, messages, options):
            async with open_upstream(...) as upstream:   # closed on Stop too
                async for piece in upstream:
                    yield Delta(text=piece)

Continuing a reply: :attr:`ChatModel.can_continue` says what an adapter does with messages
that end with an assistant message. True: it continues that message, so its deltas extend
the partial answer (the text already there is not sent again, and usage counts the new
tokens only). False (the default): it answers such a list anew like any other, so a caller
that wants a continuation asks for one in words (see ``ChatService.continuation``).
"""

from __future__ import annotations

import abc
import base64
from dataclasses import dataclass
from typing import Any, AsyncIterator, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from .errors import BadRequestError

Role = Literal["system", "user", "assistant"]


@dataclass(slots=True, frozen=True)
class Image:
    """An image attached to a user message, as it is sent: already decoded, checked and scaled
    down to the model's limit (``modules/core/images.py``); ``name`` is the file's, for labels."""

    mime: str  # image/png, image/jpeg, image/webp or image/gif
    data: bytes
    width: int
    height: int
    name: str = ""

    def data_url(self) -> str:
        return f"data:{self.mime};base64," + base64.b64encode(self.data).decode("ascii")


@dataclass(slots=True)
class Message:
    """One message as sent to a model.

    ``outputs``: for an earlier assistant reply, the non-streamed fields it
    came with (e.g. sources), for adapters whose history carries them
    (Promptflow's ``chat_history``); others ignore it. ``images``: a user message's
    images, for models that see them (:attr:`ChatModel.vision`); an adapter of a model that
    does not is never given any. Documents are text by then: part of ``content``.
    """

    role: Role
    content: str
    outputs: dict[str, Any] | None = None
    images: tuple[Image, ...] = ()

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(slots=True)
class Usage:
    """Token usage of one reply; ``exact`` is False for estimates."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    exact: bool = True


@dataclass(slots=True)
class Delta:
    """One piece of a streamed reply. Every field is optional.

    text: answer text to append.  reasoning: "thinking" text to append.
    usage: token usage (usually once, at the end).  finish_reason: why the
    model stopped ("stop", "length", "content_filter", ...).  outputs: fields
    that are not streamed (for example ``{"sources": [...]}``), merged.
    retrying: ``(attempt, attempts)`` before any text: the upstream failed and
    attempt ``attempt`` of ``attempts`` is about to be made (shown as
    "retrying (2/3)…" while it waits).
    """

    text: str = ""
    reasoning: str = ""
    usage: Usage | None = None
    finish_reason: str | None = None
    outputs: dict[str, Any] | None = None
    retrying: tuple[int, int] | None = None


class GenerationOptions(BaseModel):
    """Sampling options a user sets in the parameters accordion.

    ``None`` means "the model's default": the option is not sent upstream.
    """

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(None, ge=0, le=2, description="Randomness; 0 is greedy.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass.")
    max_tokens: int | None = Field(None, ge=1, description="Upper bound on output tokens.")
    stop: list[str] = Field(default_factory=list, max_length=4, description="Stop sequences.")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="Penalty for tokens already present.")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="Penalty by token frequency.")
    seed: int | None = Field(None, description="Seed for reproducible sampling, where supported.")

    def openai_params(self) -> dict[str, Any]:
        """The options in the OpenAI request-body shape, unset ones left out."""
        params = self.model_dump(exclude_none=True)
        if not params.get("stop"):
            params.pop("stop", None)
        return params


class Price(BaseModel):
    """A model's price in US dollars per million tokens."""

    model_config = ConfigDict(extra="forbid")

    input: float = Field(ge=0, description="USD per 1M input (prompt) tokens.")
    output: float = Field(ge=0, description="USD per 1M output (completion) tokens.")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1_000_000


class ModelConfig(BaseModel):
    """Fields every configured model has. Providers subclass it."""

    model_config = ConfigDict(extra="forbid")

    provider: str = Field(description="Registry key of the adapter, e.g. 'openai'.")
    name: str = Field(min_length=1, description="Display name in the model dropdown.")
    context_size: int = Field(8192, ge=256, description="Context window in tokens.")
    price: Price | None = Field(None, description="Price per million tokens; without one, costs show 'price unknown'.")
    vision: bool | None = Field(None, description=(
        "Whether the model sees images attached to a message. None: the provider's default (OpenAI and "
        "Azure: true for OpenAI's vision models, ids starting with gpt-4o, gpt-4.1, gpt-4-turbo, gpt-5, o1, "
        "o3 or o4; Promptflow: true when image_input is set; LangChain and the embedded model: false)."))


class ChatModel(abc.ABC):
    """A configured model. Subclasses set ``Config`` and implement ``stream``."""

    Config: ClassVar[type[ModelConfig]] = ModelConfig
    # How a user makes the model see images, said when it refuses them ("" where no setting does).
    vision_hint: ClassVar[str] = "set vision: true in its config entry if it can"

    def __init__(self, config: ModelConfig):
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def model_id(self) -> str:
        """The model's id upstream (what picks a tokenizer); the display name by default."""
        return self.name

    @property
    def context_size(self) -> int:
        return self.config.context_size

    @property
    def can_continue(self) -> bool:
        """True when, given messages that end with an assistant message, the model continues that
        message (its deltas extend it) instead of answering anew. False by default."""
        return False

    @property
    def vision(self) -> bool:
        """True when the model sees images (a user message's :attr:`Message.images`): the entry's
        ``vision`` when set, else the provider's default (:meth:`default_vision`)."""
        return self.config.vision if self.config.vision is not None else self.default_vision()

    def default_vision(self) -> bool:
        """Whether the model sees images when its entry does not say: False unless a provider knows better."""
        return False

    def refuse_images(self, messages: list[Message]) -> None:
        """Raise a BadRequestError naming the model when it cannot see images and a message has some.
        The callers check before; this is the adapter's own defence."""
        if not self.vision and any(m.images for m in messages):
            hint = f" ({self.vision_hint})" if self.vision_hint else ""
            raise BadRequestError(f"the model {self.name!r} cannot see images{hint}")

    def secrets(self) -> list[str]:
        """Every secret value of this model, so that messages can be scrubbed."""
        return [
            value.get_secret_value()
            for value in self.config.__dict__.values()
            if isinstance(value, SecretStr) and value.get_secret_value()
        ]

    def available(self) -> bool:
        """False when the model certainly cannot answer (e.g. its weights are missing)."""
        return True

    @abc.abstractmethod
    def stream(self, messages: list[Message], options: GenerationOptions) -> AsyncIterator[Delta]:
        """Yield the reply's deltas; raise a :class:`ModelError` on failure."""

    async def aclose(self) -> None:
        """Release long-lived resources (connection pools, loaded weights)."""
