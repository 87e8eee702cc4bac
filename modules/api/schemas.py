"""The HTTP API's request bodies (parsed by FastAPI) and response bodies (for the OpenAPI schema).

The handlers build their answers as dicts; the response models here document them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

EVENT_STREAM = "text/event-stream"


# -- request bodies -------------------------------------------------------------------------------
class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str = Field(description="The image as a data URL, data:image/png;base64,... (remote URLs are not fetched).")
    detail: Literal["auto", "low", "high"] | None = Field(None, description="Accepted; images are sent with 'auto'.")


class ContentPart(BaseModel):
    """A part of a message's content: ``{"type": "text", "text": ...}``, or on a user message
    ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,...", "detail": "auto"}}``."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"] = Field(description="'developer' is sent as 'system'.")
    content: str | list[ContentPart] | None = Field(
        None, description="Text, or a list of parts: text, and images (data URLs) on user messages "
                          "for a model that sees images.")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = Field(False, description="End the stream with a chunk carrying `usage`.")


class ChatCompletionRequest(BaseModel):
    """An OpenAI chat-completions request. Unknown fields are ignored."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"model": "SmolLM2-135M (embedded)", "stream": True,
                                         "messages": [{"role": "user", "content": "Hello!"}]}]},
    )
    model: str = Field("", description="A model id from GET /v1/models (the display name); empty: the default.")
    messages: list[ChatMessageIn] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = Field(None, description="Preferred over max_tokens when both are set.")
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    n: int = Field(1, description="Only 1 is supported.")
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported: must be absent or empty.")


class PromptflowTurn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    inputs: dict[str, Any] = Field(default_factory=dict, description='{"question": "..."}')
    outputs: dict[str, Any] = Field(default_factory=dict, description='{"answer": "...", <other outputs>}')


class ScoreRequest(BaseModel):
    """A Promptflow chat-flow request: the flow inputs ``question`` and ``chat_history``."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"question": "And in French?", "chat_history": [
            {"inputs": {"question": "Say hello."}, "outputs": {"answer": "Hello!"}}]}]},
    )
    question: str
    chat_history: list[PromptflowTurn] = Field(default_factory=list, description="Earlier turns, oldest first.")
    model: str | None = Field(None, description="Model name; or the azureml-model-deployment header; "
                                                "none: the default model.")


class DeepChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str = Field("user", description="'user', 'ai' (or 'assistant'), 'system'.")
    text: str = ""


class DeepChatRequest(BaseModel):
    """Deep Chat's request body, plus optional properties the page may set."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"messages": [{"role": "user", "text": "Hello!"}]}]},
    )
    messages: list[DeepChatMessage] = Field(min_length=1)
    model: str | None = Field(None, description="Model name; none: the default model.")
    stream: bool | None = Field(None, description="Force a stream (true) or one JSON object (false); "
                                                  "default: a stream when Accept lists text/event-stream.")


# -- response bodies (documentation; the handlers build dicts) ------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = Field(description="The provider of the model's config entry.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


class PromptflowErrorDetail(BaseModel):
    code: Literal["UserError", "SystemError"]
    message: str


class PromptflowError(BaseModel):
    error: PromptflowErrorDetail


class TextError(BaseModel):
    error: str


class DeepChatReply(BaseModel):
    text: str


def sse_doc(description: str, example: str) -> dict[str, Any]:
    return {"description": description, "content": {EVENT_STREAM: {"schema": {"type": "string"}, "example": example}}}
