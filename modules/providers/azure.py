"""Azure OpenAI deployments: the OpenAI adapter with Azure's paths and authentication.

Requests go to ``{endpoint}/openai/deployments/{deployment}/chat/completions
?api-version=...`` with an ``api-key`` header, or with a Microsoft Entra ID
token from azure-identity's credential chain (an optional dependency). The
stream is OpenAI's, plus a first chunk with empty ``choices`` (the prompt
filter results), which the OpenAI adapter already skips, and
``finish_reason: "content_filter"``, which it reports as a ContentFilterError
after the text that came before. Images go as OpenAI content parts, as there; whether a
deployment sees them (``vision`` unset) is told by its name, which usually is the model's
(``gpt-4o-prod`` does): set ``vision`` when it is not.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

import openai
from pydantic import Field, model_validator

from . import register
from .openai_compat import HTTPModelConfig, OpenAIChatModel

ENTRA_SCOPE = "https://cognitiveservices.azure.com/.default"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package ("azure") is missing too
        return False


class AzureModelConfig(HTTPModelConfig):
    """One Azure OpenAI deployment."""

    provider: Literal["azure"] = "azure"
    endpoint: str = Field(description="Resource endpoint, e.g. https://NAME.openai.azure.com")
    deployment: str = Field(min_length=1, description="Deployment name (selects the model).")
    api_version: str = Field("2024-10-21", description="The api-version query parameter.")
    auth: Literal["api_key", "entra_id"] = Field("api_key", description="api-key header, or an Entra ID token.")

    @model_validator(mode="after")
    def _auth_is_usable(self) -> "AzureModelConfig":
        if self.auth == "api_key" and not (self.api_key and self.api_key.get_secret_value()):
            raise ValueError("auth is api_key but no api_key is set (or api_key_env names an unset variable)")
        if self.auth == "entra_id" and not _installed("azure.identity"):
            raise ValueError("auth: entra_id needs the optional package azure-identity (pip install azure-identity)")
        return self


@register("azure")
class AzureChatModel(OpenAIChatModel):
    Config = AzureModelConfig  # type: ignore[assignment]
    config: AzureModelConfig  # type: ignore[assignment]

    @property
    def model_id(self) -> str:
        return self.config.deployment

    def _make_client(self) -> openai.AsyncAzureOpenAI:
        cfg = self.config
        auth: dict[str, Any]
        if cfg.auth == "entra_id":
            from azure.identity.aio import DefaultAzureCredential, get_bearer_token_provider

            auth = {"azure_ad_token_provider": get_bearer_token_provider(DefaultAzureCredential(), ENTRA_SCOPE)}
        else:
            auth = {"api_key": cfg.api_key.get_secret_value() if cfg.api_key else None}
        return openai.AsyncAzureOpenAI(
            azure_endpoint=cfg.endpoint,
            azure_deployment=cfg.deployment,
            api_version=cfg.api_version,
            max_retries=0,  # the adapter retries (see OpenAIChatModel.stream)
            timeout=self._timeout(),
            default_headers=cfg.headers or None,
            **auth,
        )
