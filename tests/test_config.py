"""Typed configuration: defaults, YAML problems named by file/key/problem, env, CLI flags.

The environment is always passed explicitly (``env={...}``): os.environ is
never read for a decision a test checks, and never changed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr

from modules.config import AppConfig, ConfigError, build_config, load_config

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_NAME = "SmolLM2-135M (embedded)"
OPENAI_KEY = "sk-env-secret-abcdef1234567890"


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, env=kwargs.pop("env", {}), **kwargs)
    return info.value


def assert_names(exc: ConfigError, path: Path, key: str, *problem_words: str) -> None:
    """The message is one line naming the file, the key and the problem."""
    message = str(exc)
    assert "\n" not in message, message
    assert exc.file == str(path)
    assert exc.key == key, message
    assert message.startswith(f"{path}: {key}: "), message
    for word in problem_words:
        assert word.lower() in exc.problem.lower(), message


# -- defaults ------------------------------------------------------------------------------------
def test_defaults_give_the_embedded_model():
    config = build_config(None, env={})
    assert isinstance(config, AppConfig)
    assert [(m.provider, m.name) for m in config.models] == [("embedded", EMBEDDED_NAME)]
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 7860
    assert config.server.share is False
    assert config.language == "auto"
    assert config.openai.api_key is None


def test_no_config_file_means_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no config.yaml here
    config = load_config(env={})
    assert config.model_names() == [EMBEDDED_NAME]


def test_config_yaml_in_the_working_directory_is_read(tmp_path, monkeypatch):
    write(tmp_path, "server:\n  port: 8123\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(env={}).server.port == 8123


def test_an_explicit_missing_file_is_an_error(tmp_path):
    path = tmp_path / "nope.yaml"
    exc = config_error(path)
    assert exc.file == str(path)
    assert "not found" in str(exc)


def test_an_empty_file_means_defaults(tmp_path):
    assert load_config(write(tmp_path, ""), env={}).model_names() == [EMBEDDED_NAME]


def test_a_valid_file_is_read(tmp_path):
    path = write(tmp_path, """
language: zh_CN
server: {host: 0.0.0.0, port: 8000, share: false}
ui: {update_interval_ms: 100, default_model: Local}
models:
  - provider: openai
    name: Local
    model: llama3
    base_url: http://127.0.0.1:11434/v1
    context_size: 4096
""")
    config = load_config(path, env={})
    assert config.language == "zh_CN"
    assert (config.server.host, config.server.port) == ("0.0.0.0", 8000)
    assert config.ui.update_interval_ms == 100
    [model] = config.models
    assert (model.provider, model.name, model.model, model.context_size) == ("openai", "Local", "llama3", 4096)
    assert model.api_key is None


# -- problems named by file, key and problem ------------------------------------------------------
def test_yaml_syntax_error(tmp_path):
    path = write(tmp_path, "server:\n  port: 7860\nmodels: [\n  {provider: openai, name: x\n")
    exc = config_error(path)
    assert exc.file == str(path)
    assert exc.key.startswith("line "), str(exc)
    assert "YAML" in exc.problem
    assert "\n" not in str(exc)
    assert str(path) in str(exc)


def test_unknown_top_level_key(tmp_path):
    path = write(tmp_path, "servr:\n  port: 7860\n")
    assert_names(config_error(path), path, "servr", "unknown key")


def test_unknown_nested_key(tmp_path):
    path = write(tmp_path, "server:\n  prot: 7860\n")
    assert_names(config_error(path), path, "server.prot", "unknown key")


def test_wrong_type(tmp_path):
    path = write(tmp_path, 'server: {port: "abc"}\n')
    assert_names(config_error(path), path, "server.port", "integer")


def test_out_of_range_value(tmp_path):
    path = write(tmp_path, "server: {port: 70000}\n")
    assert_names(config_error(path), path, "server.port", "65535")


def test_unknown_language(tmp_path):
    path = write(tmp_path, "language: klingon\n")
    assert_names(config_error(path), path, "language", "must be one of")


def test_unknown_provider(tmp_path):
    path = write(tmp_path, "models:\n  - {provider: nope, name: x}\n")
    assert_names(config_error(path), path, "models[0].provider", "unknown provider", "nope")


def test_missing_field(tmp_path):
    path = write(tmp_path, "models:\n  - {provider: openai, base_url: 'http://127.0.0.1:1/v1'}\n")
    assert_names(config_error(path), path, "models[0].name", "required")


def test_unknown_key_in_a_model_entry(tmp_path):
    path = write(tmp_path, "models:\n  - {provider: openai, name: x, base_ulr: 'http://h/v1'}\n")
    assert_names(config_error(path), path, "models[0].base_ulr", "unknown key")


def test_wrong_type_in_a_model_entry(tmp_path):
    path = write(tmp_path, "models:\n  - {provider: openai, name: a}\n  - {provider: openai, name: b, "
                           "max_retries: many}\n")
    assert_names(config_error(path), path, "models[1].max_retries", "integer")


def test_a_model_entry_that_is_not_a_mapping(tmp_path):
    path = write(tmp_path, "models:\n  - gpt-4o\n")
    assert_names(config_error(path), path, "models[0]", "mapping")


def test_duplicate_model_name(tmp_path):
    path = write(tmp_path, "models:\n  - {provider: openai, name: Same}\n  - {provider: embedded, name: Same}\n")
    assert_names(config_error(path), path, "models[1].name", "duplicate", "Same")


def test_unknown_default_model(tmp_path):
    path = write(tmp_path, "ui: {default_model: gpt-5-turbo}\n")
    assert_names(config_error(path), path, "ui.default_model", "gpt-5-turbo", "not a configured model")


def test_no_models_at_all(tmp_path):
    path = write(tmp_path, "models: []\n")
    assert_names(config_error(path), path, "models", "no model")


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "- just\n- a list\n")
    exc = config_error(path)
    assert exc.file == str(path) and "mapping" in exc.problem


# -- environment ---------------------------------------------------------------------------------
def test_openai_key_in_env_adds_the_openai_models():
    config = build_config(None, env={"OPENAI_API_KEY": OPENAI_KEY})
    names = config.model_names()
    assert names[0] == EMBEDDED_NAME
    openai_models = [m for m in config.models if m.provider == "openai"]
    assert [m.name for m in openai_models] == config.openai.models
    assert "gpt-4o-mini" in names
    for model in openai_models:
        assert isinstance(model.api_key, SecretStr)
        assert model.api_key.get_secret_value() == OPENAI_KEY
        assert model.base_url == "https://api.openai.com/v1"
        assert model.upstream_model == model.name
    assert isinstance(config.openai.api_key, SecretStr)


def test_the_openai_key_is_not_in_repr_or_str():
    config = build_config(None, env={"OPENAI_API_KEY": OPENAI_KEY})
    assert OPENAI_KEY not in repr(config)
    assert OPENAI_KEY not in str(config)
    for model in config.models:
        assert OPENAI_KEY not in repr(model)
        assert OPENAI_KEY not in str(model)
    assert OPENAI_KEY not in config.model_dump_json()


def test_openai_key_in_env_overrides_the_file(tmp_path):
    path = write(tmp_path, "openai:\n  api_key: sk-from-file-000000\n  models: [gpt-4o-mini]\n"
                           "  base_url: http://127.0.0.1:9/v1\n")
    config = load_config(path, env={"OPENAI_API_KEY": OPENAI_KEY})
    [model] = [m for m in config.models if m.provider == "openai"]
    assert model.api_key.get_secret_value() == OPENAI_KEY
    assert model.base_url == "http://127.0.0.1:9/v1"


def test_without_a_key_no_openai_models():
    assert all(m.provider != "openai" for m in build_config(None, env={"OPENAI_API_KEY": ""}).models)


def test_api_key_env_reads_the_key_from_env(tmp_path):
    path = write(tmp_path, "models:\n  - provider: openai\n    name: Gateway\n"
                           "    base_url: http://127.0.0.1:9/v1\n    api_key_env: GATEWAY_KEY\n")
    config = load_config(path, env={"GATEWAY_KEY": "sk-gateway-secret-42424242"})
    [model] = config.models
    assert isinstance(model.api_key, SecretStr)
    assert model.api_key.get_secret_value() == "sk-gateway-secret-42424242"
    assert "sk-gateway-secret-42424242" not in repr(config)
    assert not hasattr(model, "api_key_env")
    # Unset variable: no key (a server without auth), not an error.
    assert load_config(path, env={}).models[0].api_key is None


def test_gradio_env_variables_set_host_and_port():
    config = build_config(None, env={"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7861"})
    assert (config.server.host, config.server.port) == ("0.0.0.0", 7861)


def test_a_bad_gradio_port_in_env_is_named():
    with pytest.raises(ConfigError) as info:
        build_config(None, env={"GRADIO_SERVER_PORT": "http"})
    assert info.value.key == "server.port"


def test_gradio_env_variables_override_the_file(tmp_path):
    path = write(tmp_path, "server: {host: 127.0.0.1, port: 8000}\n")
    config = load_config(path, env={"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7861"})
    assert (config.server.host, config.server.port) == ("0.0.0.0", 7861)


# -- command-line flags -----------------------------------------------------------------------------
def test_cli_flags_override_defaults():
    config = build_config(None, env={}, overrides={"port": 9001, "host": "0.0.0.0", "share": True})
    assert (config.server.host, config.server.port, config.server.share) == ("0.0.0.0", 9001, True)


def test_cli_flags_override_file_and_env(tmp_path):
    path = write(tmp_path, "server: {host: 127.0.0.1, port: 8000}\n")
    config = load_config(path, env={"GRADIO_SERVER_PORT": "8001"}, overrides={"port": 9002})
    assert config.server.port == 9002
    assert config.server.host == "127.0.0.1"


def test_unset_cli_flags_change_nothing(tmp_path):
    path = write(tmp_path, "server: {port: 8000, share: true}\n")
    config = load_config(path, env={}, overrides={"port": None, "host": None, "share": None})
    assert (config.server.host, config.server.port, config.server.share) == ("127.0.0.1", 8000, True)


def test_a_bad_cli_flag_is_named():
    with pytest.raises(ConfigError) as info:
        build_config(None, env={}, overrides={"port": 0})
    assert info.value.key == "server.port"


# -- the command line --------------------------------------------------------------------------------
def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "GRADIO_SERVER_NAME",
                                                            "GRADIO_SERVER_PORT")}
    return subprocess.run([sys.executable, str(ROOT / "ChuanhuStyleChat.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=90)


@pytest.mark.parametrize("text, key", [
    ("servr:\n  port: 7860\n", "servr"),
    ('server: {port: "abc"}\n', "server.port"),
    ("models:\n  - {provider: nope, name: x}\n", "models[0].provider"),
    ("server:\n  port: [1, 2\n", "line "),
])
def test_cli_with_a_bad_config_exits_2_with_one_line(tmp_path, text, key):
    path = write(tmp_path, text, "bad.yaml")
    result = _run_cli("--config", str(path))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0]
    assert key in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_cli_with_a_missing_config_exits_2(tmp_path):
    path = tmp_path / "missing.yaml"
    result = _run_cli("--config", str(path))
    assert result.returncode == 2
    assert str(path) in result.stderr and "not found" in result.stderr
    assert "Traceback" not in result.stderr


# -- the shipped example ---------------------------------------------------------------------------
EXAMPLE = ROOT / "config_example.yaml"


@pytest.mark.parametrize("env", [{}, {"OPENAI_API_KEY": OPENAI_KEY}], ids=["no-key", "openai-key"])
def test_config_example_validates(env):
    config = load_config(EXAMPLE, env=env)
    assert config.models
    if config.ui.default_model:
        assert config.ui.default_model in config.model_names()


def _commented_model_examples() -> list[str]:
    """The commented-out ``models:`` entries of config_example.yaml, uncommented."""
    blocks: list[list[str]] = []
    inside = False
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line.startswith("  # - provider:"):
            blocks.append([line.replace("  # ", "", 1)])
            inside = True
        elif inside and line.startswith("  #   "):
            blocks[-1].append(line.replace("  #   ", "  ", 1))
        else:
            inside = False
    return ["\n".join(block) for block in blocks]


def test_every_commented_model_example_is_a_valid_entry():
    """The examples users uncomment must validate, every key spelt as the code expects."""
    examples = _commented_model_examples()
    providers = set()
    for text in examples:
        [entry] = yaml.safe_load(text)
        providers.add(entry["provider"])
        if "factory" in entry:  # names the user's own package: only its shape can be checked here
            entry["factory"] = "tests.fakes.chains:prompt_chat_openai"
        entry.pop("api_key_env", None)
        if entry["provider"] == "azure":
            entry["api_key"] = "example-key"
        build_config({"models": [entry]}, file="config_example.yaml", env={})
    assert providers == {"openai", "azure", "langchain", "promptflow"}


# -- knowledge bases (issue #14) ---------------------------------------------------------------------
SHARED_BASES = {"bases": [{"name": "Handbook", "folder": "docs"}]}


def test_a_model_entry_answers_from_shared_bases_named_in_knowledge():
    config = build_config({"knowledge": SHARED_BASES, "models": [
        {"provider": "embedded", "name": "Handbook assistant", "knowledge": ["Handbook"]},
        {"provider": "embedded", "name": "Plain"}]}, env={})
    assert config.model_knowledge == {"Handbook assistant": ["Handbook"]}
    assert [m.name for m in config.models] == ["Handbook assistant", "Plain"]
    assert not hasattr(config.models[0], "knowledge")  # (the provider never sees it)


@pytest.mark.parametrize("data, key, words", [
    ({"models": [{"provider": "embedded", "name": "A", "knowledge": ["Nope"]}], "knowledge": SHARED_BASES},
     "models[0].knowledge", "'Nope' is not one of knowledge.bases"),
    ({"models": [{"provider": "embedded", "name": "A", "knowledge": [3]}]}, "models[0].knowledge", "list of knowledge base names"),
    ({"knowledge": {"bases": [{"name": "H", "folder": "a"}, {"name": "H", "folder": "b"}]}},
     "knowledge.bases[1].name", "duplicate knowledge base name 'H'"),
    ({"knowledge": {"embeddings": {"base_url": "localhost:11434", "model": "m"}}}, "knowledge.embeddings.base_url",
     "is not an http(s) URL"),
    ({"knowledge": {"max_share": 1.5}}, "knowledge.max_share", ""),
    ({"knowledge": {"bases": [{"name": "H"}]}}, "knowledge.bases.0.folder", ""),
])
def test_a_bad_knowledge_setting_names_its_key(data, key, words):
    with pytest.raises(ConfigError) as caught:
        build_config(data, file="config.yaml", env={})
    assert caught.value.file == "config.yaml"
    assert caught.value.key.replace("[", ".").replace("]", "") == key.replace("[", ".").replace("]", "")
    assert words in caught.value.problem


def test_the_embeddings_key_comes_from_its_environment_variable_and_stays_secret():
    config = build_config({"knowledge": {"embeddings": {"base_url": "http://127.0.0.1:9/v1", "model": "m",
                                                        "api_key_env": "EMBED_KEY"}}}, env={"EMBED_KEY": "sk-embed-123456"})
    assert config.knowledge.embeddings.api_key.get_secret_value() == "sk-embed-123456"
    assert "sk-embed-123456" not in repr(config)


# -- history in PostgreSQL ------------------------------------------------------------------------
def test_history_url_chooses_postgresql_and_the_environment_overrides_it():
    assert build_config(None, env={}).history.url is None  # SQLite by default
    yaml_url = "postgresql://team:from-yaml-pw@db:5432/chat"
    config = build_config({"history": {"url": yaml_url, "pool_size": 4, "pool_min_size": 2}}, env={})
    assert config.history.url.get_secret_value() == yaml_url and (config.history.pool_size, config.history.pool_min_size) == (4, 2)
    assert "from-yaml-pw" not in repr(config) and "from-yaml-pw" not in str(config.history)
    env_url = "postgresql:///chat?host=/run/postgresql"
    assert build_config({"history": {"url": yaml_url}}, env={"CHUANHU_HISTORY_URL": env_url}).history.url \
        .get_secret_value() == env_url
    assert build_config({"history": {"url": ""}}, env={}).history.url is None


@pytest.mark.parametrize("url", ["mysql://root:Secret-pw-42@db/chat", "root:Secret-pw-42@db/chat",
                                 "sqlite:///data/history.sqlite3"])
def test_a_history_url_that_is_not_postgresql_names_the_key_and_never_echoes_it(url):
    with pytest.raises(ConfigError) as caught:
        build_config({"history": {"url": url}}, env={})
    assert caught.value.key == "history.url" and "postgresql://" in caught.value.problem
    assert "Secret-pw" not in str(caught.value) and "mysql" not in str(caught.value)


def test_the_pool_bounds_are_checked():
    with pytest.raises(ConfigError, match=r"history\.pool_min_size: 5 is more than history\.pool_size \(3\)"):
        build_config({"history": {"pool_size": 3, "pool_min_size": 5}}, env={})
    with pytest.raises(ConfigError, match=r"history\.pool_size"):
        build_config({"history": {"pool_size": 0}}, env={})
