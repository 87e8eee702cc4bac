"""Typed configuration: ``config.yaml`` (optional), environment variables, CLI flags.

Precedence, lowest first: built-in defaults < the YAML file < environment
variables (secrets, ``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT`` as a Space
sets them, ``CHUANHU_DATA_DIR`` for the history folder, ``CHUANHU_HISTORY_URL`` for a
history in PostgreSQL) < command-line flags. Any problem raises :class:`ConfigError`, whose
message names the file, the key and what is wrong.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from modules.providers import ModelConfig, validate_entry
from modules.providers.base import Price
from modules.providers.validation import first_problem

DEFAULT_CONFIG_FILE = "config.yaml"
LANGUAGES = ("auto", "en_US", "zh_CN", "zh_TW", "ja_JP")


class ConfigError(Exception):
    """A configuration problem: ``file: key: problem``."""

    def __init__(self, file: str, key: str, problem: str):
        self.file, self.key, self.problem = file, key, problem
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {problem}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Section):
    host: str = Field("127.0.0.1", description="Interface to listen on; 0.0.0.0 for every one.")
    port: int = Field(7860, ge=1, le=65535)
    share: bool = Field(False, description="Create a public gradio.live link.")
    concurrency: int = Field(128, ge=1, description="Replies that may stream at the same time.")


class UIConfig(_Section):
    update_interval_ms: int = Field(40, ge=5, le=2000, description="Least time between chatbot updates.")
    max_updates_per_second: float = Field(400, gt=0, description="Chat updates per second, all replies together.")
    system_prompt: str = Field("You are a helpful assistant.", description="Default system prompt.")
    default_model: str = Field("", description="Display name of the model selected at start.")


class OpenAISection(_Section):
    api_key: SecretStr | None = Field(None, description="OpenAI key; OPENAI_API_KEY overrides.")
    base_url: str = Field("https://api.openai.com/v1")
    models: list[str] = Field(default_factory=lambda: ["gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "o4-mini"])
    context_size: int = Field(128000, ge=256)
    prices: dict[str, Price] = Field(default_factory=dict, description="Prices of these models, by model name.")


class APIConfig(_Section):
    """The HTTP API (``modules/api/gateway.py``): OpenAI-compatible, Promptflow, Deep Chat, EventSource."""

    enabled: bool = Field(False, description="Serve the HTTP API beside the page, on the same port.")
    keys: list[SecretStr] = Field(default_factory=list, description="Accepted Bearer keys; CHUANHU_API_KEYS overrides.")
    heartbeat_seconds: float = Field(15.0, gt=0, le=300, description="Idle seconds before a stream gets a ': ping'.")
    resume_grace_seconds: float = Field(30.0, ge=0, le=3600, description=(
        "GET /stream: how long a reply whose EventSource lost its connection goes on, waiting for the "
        "browser to reconnect with Last-Event-ID; then it is cancelled."))
    cors_origins: list[str] = Field(default_factory=list, description="Origins whose pages may call the API.")

    @field_validator("keys")
    @classmethod
    def _usable_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        for i, key in enumerate(keys):
            value = key.get_secret_value()
            if len(value) < 8 or value != value.strip() or "," in value:
                # never echo the value: only which one is wrong
                raise ValueError(f"key #{i + 1} must be at least 8 characters, with no spaces or commas around it")
        return keys

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin in ("*", "null"):
                continue
            scheme, sep, rest = origin.partition("://")
            if scheme not in ("http", "https") or not sep or not rest or "/" in rest:
                raise ValueError(f"{origin!r} is not an origin: use scheme://host[:port] "
                                 "with no path or trailing slash, 'null' or '*'")
        return origins


class ModelLimits(_Section):
    """A model's own per-user limit, beside the user's limits for all models together."""

    tokens_per_day: int | None = Field(None, ge=1, description=(
        "Tokens (in and out) one user may use on this model per day (UTC); none: only the overall limit."))


class PerUserLimits(_Section):
    """What one user may use (a logged-in user, a browser, everyone on a desktop, an API key), counted in
    the history's database: with PostgreSQL, across every app process. None: unlimited."""

    concurrent_replies: int | None = Field(None, ge=1, le=10000, description=(
        "Replies one user may have streaming at once, in all processes together."))
    messages_per_minute: int | None = Field(None, ge=1, le=100000, description=(
        "Messages (each question, Regenerate or Continue) one user may send in any 60 seconds."))
    tokens_per_day: int | None = Field(None, ge=1, description=(
        "Tokens (in and out, all models) one user may use per day; the day starts at 00:00 UTC. A reply "
        "that crosses the limit finishes; the next message is refused."))
    models: dict[str, ModelLimits] = Field(default_factory=dict, description=(
        "Per model (its display name): its own tokens_per_day."))

    def any(self) -> bool:
        return any(v is not None for v in (self.concurrent_replies, self.messages_per_minute, self.tokens_per_day)) \
            or any(m.tokens_per_day is not None for m in self.models.values())


class LimitsConfig(_Section):
    """Bounds on what one request may ask of the app (the page, /chat and the HTTP API), and per user."""

    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024, description=(
        "Largest HTTP API request body, in bytes; a larger one is refused (413) before it is read."))
    max_message_chars: int = Field(200_000, ge=100, description=(
        "Longest message, in characters, on the page, /chat and the HTTP API; a longer one is "
        "refused with a sentence saying so (on the page it stays in the box)."))
    heartbeat_seconds: float = Field(15.0, gt=0, le=300, description=(
        "While a reply waits for its first token (or its upstream stalls), the page and /chat check this "
        "often that their client is still there; a client that has gone stops the reply."))
    per_user: PerUserLimits = Field(default_factory=PerUserLimits, description=(
        "Per-user limits (concurrent replies, messages per minute, tokens per day), enforced across processes."))


class RunsConfig(_Section):
    """Replies are runs on the server: they outlive the page that asked for them (a reload, a closed
    tab, a second tab or device of the same owner shows the same reply, as far as it has come)."""

    unwatched: Literal["continue", "stop"] = Field("continue", description=(
        "A page's reply that nobody watches any more (its tab was closed): continue to its end and save "
        "it, so that it is there when the user comes back; or stop it after unwatched_grace_seconds "
        "(for those who pay per token). Replies to the HTTP API and /chat belong to their request and "
        "stop as soon as their client disconnects."))
    unwatched_grace_seconds: float = Field(30.0, ge=0, le=3600, description=(
        "With unwatched: stop, how long a reply goes on without a viewer (a reload comes back in time)."))
    max_seconds: float = Field(1800.0, gt=0, description=(
        "Longest a reply may run, watched or not; it is then stopped and saved as stopped."))
    max_per_owner: int = Field(4, ge=1, le=1000, description=(
        "Replies one owner (a user, a browser, or everyone on a desktop) may have streaming at once; "
        "past it, a new message gets a sentence saying so."))
    lease_seconds: float = Field(10.0, ge=1, le=600, description=(
        "With the history on PostgreSQL (several app processes): how long a process may go without its "
        "heartbeat before the others take it for dead and mark its replies still streaming as interrupted "
        "(with their text so far). It beats every third of this."))


class AttachmentsConfig(_Section):
    """Files attached to a message: images for models that see them, documents read as text."""

    max_mb: float = Field(20.0, gt=0, le=1024, description=(
        "Largest file, in megabytes; a larger one is refused with a sentence naming it (the message and "
        "the other files are kept)."))
    max_files: int = Field(10, ge=1, le=100, description="Most files one message may carry.")
    max_document_chars: int = Field(2_000_000, ge=1000, description=(
        "Most characters of text read from one document; a longer one is refused, naming its size."))
    max_pdf_pages: int = Field(2000, ge=1, description="Most pages read from one PDF.")


class EmbeddingsConfig(_Section):
    """An OpenAI-compatible ``/v1/embeddings`` endpoint (OpenAI, Azure, Ollama, llama.cpp's server):
    dense retrieval beside BM25, fused by reciprocal rank."""

    base_url: str = Field(description="The API's base URL, e.g. http://127.0.0.1:11434/v1 (…/embeddings is added).")
    model: str = Field(min_length=1, description="The embedding model's name, as the endpoint knows it.")
    api_key: SecretStr | None = Field(None, description="Bearer key, if the endpoint needs one (or api_key_env).")
    api_key_env: str | None = Field(None, description="Environment variable holding the key.")
    batch: int = Field(64, ge=1, le=2048, description="Texts per request while indexing.")
    timeout_seconds: float = Field(30.0, gt=0, le=600, description="Longest wait for one request.")

    @field_validator("base_url")
    @classmethod
    def _url(cls, url: str) -> str:
        scheme, sep, rest = url.partition("://")
        if scheme not in ("http", "https") or not sep or not rest:
            raise ValueError(f"{url!r} is not an http(s) URL")
        return url


class SharedBaseConfig(_Section):
    """A knowledge base every user may read (none may change it): a folder the app keeps indexed."""

    name: str = Field(min_length=1, max_length=200, description="The base's name, as users see it.")
    folder: str = Field(min_length=1, description="The folder of its documents (read at start, again at each start).")


class KnowledgeConfig(_Section):
    """Knowledge bases: documents a reply answers from, citing them. Offline by default (BM25)."""

    enabled: bool = Field(True, description="Show knowledge bases on the page and answer from them.")
    top_k: int = Field(5, ge=1, le=50, description="Passages retrieved for each question.")
    max_share: float = Field(0.5, gt=0, le=0.9, description=(
        "Most of the prompt's token budget the passages may take; the lowest-ranked ones that do not "
        "fit are left out, and the reply says so."))
    embeddings: EmbeddingsConfig | None = Field(None, description="Dense retrieval beside BM25 (none: BM25 only).")
    bases: list[SharedBaseConfig] = Field(default_factory=list, description=(
        "Shared, read-only bases from folders on the server; a model entry's knowledge: [names] answers from them."))
    max_bases: int = Field(50, ge=1, le=10000, description="Most bases one owner may create.")
    max_documents: int = Field(5000, ge=1, description="Most documents in one base.")


class HistoryConfig(_Section):
    """Where conversations are kept, and whose they are."""

    data_dir: str = Field("data", description="Folder of the history database and exports (relative: to the working directory).")
    mode: Literal["auto", "shared", "per_browser"] = Field(
        "auto",
        description="shared: one history for everyone (a desktop app); per_browser: each browser sees only its own; "
                    "auto: shared on localhost, per_browser on a shared link, a Space or another interface. "
                    "With login, each user always sees only their own.",
    )
    title_model: str = Field("", description="Model (display name) that writes titles; empty: the first question.")
    url: SecretStr | None = Field(None, description=(
        "Keep the history in PostgreSQL instead of data_dir's SQLite file (for a team: several app processes "
        "share it): postgresql://user:password@host:5432/database, or postgresql:///database?host=/socket/folder. "
        "CHUANHU_HISTORY_URL overrides. The app creates and upgrades its tables; it does not start when the "
        "database cannot be reached."))
    pool_size: int = Field(10, ge=1, le=1000, description="Most connections to PostgreSQL this process keeps open.")
    pool_min_size: int = Field(1, ge=0, le=1000, description="Connections kept open even when idle.")
    pool_timeout_seconds: float = Field(10.0, gt=0, le=600, description=(
        "Longest a history read or write waits for a free connection before it fails."))
    connect_timeout_seconds: int = Field(10, ge=2, le=600, description=(
        "Longest a new connection to PostgreSQL may take (at start-up, the app gives up after it)."))

    @field_validator("url", mode="before")
    @classmethod
    def _empty_url(cls, value: Any) -> Any:
        return None if value is None or (isinstance(value, str) and not value.strip()) else value

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, url: SecretStr | None) -> SecretStr | None:
        if url is None:
            return None
        scheme, sep, _ = url.get_secret_value().partition("://")
        if scheme not in ("postgresql", "postgres") or not sep:
            # never echo the value: it holds a password
            raise ValueError("must be a PostgreSQL URL: postgresql://user:password@host:5432/database "
                             "or postgresql:///database?host=/socket/folder")
        return url


class ContextConfig(_Section):
    """What happens when a conversation outgrows the model's context window."""

    strategy: Literal["trim", "summarize"] = Field(
        "trim", description="trim: leave out the oldest rounds; summarize: replace them by a summary the model writes."
    )
    reserve_output_tokens: int = Field(1024, ge=16, description="Tokens kept free for the reply (unless Max output tokens is set).")


class AuthConfig(_Section):
    """Optional login. Without users, the app has no login."""

    users: dict[str, str] = Field(
        default_factory=dict,
        description="user name: password hash (make one with: python ChuanhuStyleChat.py hash-password).",
    )

    @field_validator("users")
    @classmethod
    def _hashed(cls, users: dict[str, str]) -> dict[str, str]:
        from modules.auth import is_password_hash

        for name, hashed in users.items():
            if not name.strip() or name != name.strip():
                raise ValueError(f"user name {name!r} is empty or has spaces around it")
            if not is_password_hash(str(hashed)):
                # never echo the value: it may be a plaintext password
                raise ValueError(f"the password of {name!r} is not a hash; plaintext passwords are refused. "
                                 "Make a hash with: python ChuanhuStyleChat.py hash-password")
        return users


def _default_models() -> list[dict[str, Any]]:
    # It runs on this machine: no per-token price.
    return [{"provider": "embedded", "name": "SmolLM2-135M (embedded)", "price": {"input": 0, "output": 0}}]


class AppConfig(_Section):
    language: str = Field("auto", description="UI language; auto follows the browser.")
    server: ServerConfig = Field(default_factory=ServerConfig)
    ui: UIConfig = Field(default_factory=UIConfig)
    openai: OpenAISection = Field(default_factory=OpenAISection)
    api: APIConfig = Field(default_factory=APIConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    runs: RunsConfig = Field(default_factory=RunsConfig)
    attachments: AttachmentsConfig = Field(default_factory=AttachmentsConfig)
    history: HistoryConfig = Field(default_factory=HistoryConfig)
    knowledge: KnowledgeConfig = Field(default_factory=KnowledgeConfig)
    context: ContextConfig = Field(default_factory=ContextConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    templates_dir: str = Field("templates", description="Folder of prompt template collections (YAML, JSON, CSV).")
    models: list[ModelConfig] = Field(default_factory=list)
    # The shared knowledge bases (names) each model answers from, by model name (a model entry's
    # ``knowledge:`` list; the entry itself goes to its provider without it).
    model_knowledge: dict[str, list[str]] = Field(default_factory=dict)

    @field_validator("language")
    @classmethod
    def _known_language(cls, value: str) -> str:
        if value not in LANGUAGES:
            raise ValueError(f"must be one of {', '.join(LANGUAGES)}")
        return value

    def model_names(self) -> list[str]:
        return [m.name for m in self.models]


def _knowledge_of(entry: dict[str, Any], key: str, file: str) -> list[str]:
    """A model entry's ``knowledge:`` (names of shared bases), taken out of the entry."""
    names = entry.pop("knowledge", None)
    if names is None:
        return []
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        raise ConfigError(file, f"{key}.knowledge", "must be a list of knowledge base names (from knowledge.bases)")
    return list(dict.fromkeys(n.strip() for n in names))


def _resolve_model_entry(raw: Any, index: int, env: Mapping[str, str], file: str) -> ModelConfig:
    key = f"models[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(file, key, "must be a mapping with at least 'provider' and 'name'")
    entry = dict(raw)
    entry.pop("knowledge", None)  # (read by _knowledge_of)
    env_name = entry.pop("api_key_env", None)
    if env_name and env.get(env_name):
        entry["api_key"] = env[env_name]
    try:
        return validate_entry(entry)
    except KeyError as exc:
        raise ConfigError(file, f"{key}.provider", exc.args[0]) from None
    except ValidationError as exc:
        sub, message = first_problem(exc, key)
        raise ConfigError(file, sub, message) from None


def build_config(
    data: Mapping[str, Any] | None,
    *,
    file: str = "(defaults)",
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AppConfig:
    """Validate raw config data, apply environment and CLI overrides."""
    env = os.environ if env is None else env
    data = dict(data or {})
    raw_models = data.pop("models", None)
    if raw_models is None:
        raw_models = _default_models()
    if not isinstance(raw_models, list):
        raise ConfigError(file, "models", "must be a list")

    server = dict(data.get("server") or {})
    if env.get("GRADIO_SERVER_NAME"):
        server["host"] = env["GRADIO_SERVER_NAME"]
    if env.get("GRADIO_SERVER_PORT"):
        server["port"] = env["GRADIO_SERVER_PORT"]
    server.update({k: v for k, v in (overrides or {}).items() if v is not None})
    data["server"] = server

    openai_section = dict(data.get("openai") or {})
    if env.get("OPENAI_API_KEY"):
        openai_section["api_key"] = env["OPENAI_API_KEY"]
    data["openai"] = openai_section

    if env.get("CHUANHU_DATA_DIR"):
        data["history"] = {**dict(data.get("history") or {}), "data_dir": env["CHUANHU_DATA_DIR"]}

    if env.get("CHUANHU_HISTORY_URL"):
        data["history"] = {**dict(data.get("history") or {}), "url": env["CHUANHU_HISTORY_URL"]}

    if env.get("CHUANHU_API_KEYS"):
        api_section = dict(data.get("api") or {})
        api_section["keys"] = [k.strip() for k in env["CHUANHU_API_KEYS"].split(",") if k.strip()]
        data["api"] = api_section

    try:
        config = AppConfig.model_validate(data)
    except ValidationError as exc:
        key, message = first_problem(exc)
        raise ConfigError(file, key, message) from None

    for name in config.openai.prices:
        if name not in config.openai.models:
            raise ConfigError(file, f"openai.prices.{name}", "not one of openai.models (a price for which model?)")
    models = [_resolve_model_entry(raw, i, env, file) for i, raw in enumerate(raw_models)]
    shared = {b.name for b in config.knowledge.bases}
    seen_bases: set[str] = set()
    for i, base in enumerate(config.knowledge.bases):
        if base.name in seen_bases:
            raise ConfigError(file, f"knowledge.bases[{i}].name", f"duplicate knowledge base name {base.name!r}")
        seen_bases.add(base.name)
    for i, (raw, model) in enumerate(zip(raw_models, models)):
        names = _knowledge_of(dict(raw), f"models[{i}]", file)
        for name in names:
            if name not in shared:
                raise ConfigError(file, f"models[{i}].knowledge", f"{name!r} is not one of knowledge.bases "
                                  "(a model answers from shared bases, listed there with their folders)")
        if names:
            config.model_knowledge[model.name] = names
    embeddings = config.knowledge.embeddings
    if embeddings is not None and embeddings.api_key_env and env.get(embeddings.api_key_env):
        embeddings.api_key = SecretStr(env[embeddings.api_key_env])
    if config.openai.api_key and config.openai.api_key.get_secret_value():
        models += [
            validate_entry(
                {
                    "provider": "openai",
                    "name": name,
                    "model": name,
                    "base_url": config.openai.base_url,
                    "api_key": config.openai.api_key,
                    "context_size": config.openai.context_size,
                    "price": config.openai.prices.get(name),
                }
            )
            for name in config.openai.models
        ]
    seen: set[str] = set()
    for i, model in enumerate(models):
        if model.name in seen:
            raise ConfigError(file, f"models[{i}].name", f"duplicate model name {model.name!r}")
        seen.add(model.name)
    if not models:
        raise ConfigError(file, "models", "no model is configured (add one, or an OpenAI key)")
    config.models = models
    if config.api.enabled and not config.api.keys:
        raise ConfigError(file, "api.keys", "the HTTP API is enabled but has no key: list one here "
                                            "or in the CHUANHU_API_KEYS environment variable")
    if config.history.pool_min_size > config.history.pool_size:
        raise ConfigError(file, "history.pool_min_size", f"{config.history.pool_min_size} is more than "
                                                         f"history.pool_size ({config.history.pool_size})")
    for name in config.limits.per_user.models:
        if name not in seen:
            raise ConfigError(file, f"limits.per_user.models.{name}", f"{name!r} is not a configured model name")
    if config.history.title_model and config.history.title_model not in seen:
        raise ConfigError(file, "history.title_model", f"{config.history.title_model!r} is not a configured model name")
    if config.ui.default_model and config.ui.default_model not in seen:
        raise ConfigError(file, "ui.default_model", f"{config.ui.default_model!r} is not a configured model name")
    return config


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AppConfig:
    """Load ``path`` (or ``config.yaml`` if present, else defaults)."""
    explicit = path is not None
    file = Path(path) if explicit else Path(DEFAULT_CONFIG_FILE)
    if not file.exists():
        if explicit:
            raise ConfigError(str(file), "", "file not found")
        return build_config(None, env=env, overrides=overrides)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else ""
        raise ConfigError(str(file), where, f"not valid YAML: {getattr(exc, 'problem', exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(file), "", f"cannot be read: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(str(file), "", "must be a YAML mapping at the top level")
    return build_config(data, file=str(file), env=env, overrides=overrides)
