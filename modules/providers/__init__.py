"""Model providers, registered by the ``provider`` key they answer to in config.

Every provider, the embedded one included, registers itself the same way:

    @register("openai")
    class OpenAIChatModel(ChatModel):
        Config = OpenAIModelConfig
        ...

``create(entry)`` validates a config entry with the provider's own ``Config``
class and builds the adapter. Providers are looked up by this key only, never
by a model's display name.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, TypeVar

from .base import ChatModel, Delta, GenerationOptions, Image, Message, ModelConfig, Usage

__all__ = [
    "ChatModel",
    "Delta",
    "GenerationOptions",
    "Image",
    "Message",
    "ModelConfig",
    "Usage",
    "register",
    "provider_class",
    "providers",
]

_REGISTRY: dict[str, type[ChatModel]] = {}

# Built-in provider modules; each registers itself on import.
_BUILTIN = ("openai_compat", "azure", "langchain_runnable", "promptflow", "embedded")

M = TypeVar("M", bound=type[ChatModel])


def register(provider: str) -> Callable[[M], M]:
    """Class decorator: make ``cls`` the adapter for config entries of ``provider``."""

    def decorate(cls: M) -> M:
        if provider in _REGISTRY and _REGISTRY[provider] is not cls:
            raise ValueError(f"provider {provider!r} is registered twice")
        _REGISTRY[provider] = cls
        return cls

    return decorate


def _load_builtins() -> None:
    for module in _BUILTIN:
        importlib.import_module(f"{__name__}.{module}")


def providers() -> dict[str, type[ChatModel]]:
    """Every registered provider key and its adapter class."""
    _load_builtins()
    return dict(_REGISTRY)


def provider_class(provider: str) -> type[ChatModel]:
    """The adapter class for ``provider``; KeyError names the known ones."""
    registry = providers()
    try:
        return registry[provider]
    except KeyError:
        known = ", ".join(sorted(registry))
        raise KeyError(f"unknown provider {provider!r} (known: {known})") from None


def create(config: ModelConfig) -> ChatModel:
    """Build the adapter for a validated config entry."""
    return provider_class(config.provider)(config)


def validate_entry(entry: dict[str, Any]) -> ModelConfig:
    """Validate one raw ``models:`` entry with its provider's config class."""
    return provider_class(str(entry.get("provider", ""))).Config.model_validate(entry)
