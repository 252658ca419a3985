"""Hub ids (org/name): the HF cache layout, HF_HUB_OFFLINE, revisions, download_dir, tokens, refusals.

No network: each test builds a hub cache in the documented layout
(`models--org--name/snapshots/<commit>/` + `refs/<name>`), and the online call, where a test needs
one, is a stand-in for huggingface_hub.snapshot_download.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError

from kvloom import LLM, SamplingParams
from kvloom.engine.arg_utils import IGNORED_VLLM_ARGS, EngineArgs
from kvloom.engine.model_loader.hub import is_hub_id
from kvloom.engine.model_loader.resolve import resolve_model, resolve_tokenizer

from kvloom_testing import build_tiny_model, peft_greedy

MAIN = "a" * 40
V1 = "b" * 40
PICKLED = "c" * 40
REPO = "org/tiny"
HF_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "HF_TOKEN")


def _snapshot(cache: Path, repo: str, commit: str, refs: tuple[str, ...] = ()) -> Path:
    storage = cache / f"models--{repo.replace('/', '--')}"
    snap = storage / "snapshots" / commit
    snap.mkdir(parents=True)
    for ref in refs:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(commit)  # huggingface_hub writes the hash without a newline
    return snap


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory) -> Path:
    """HF_HOME with hub/: org/tiny at main (seed 0) and at tag v1 (seed 1), org/pickled with a .bin only."""
    home = tmp_path_factory.mktemp("hf-home")
    cache = home / "hub"
    build_tiny_model(str(_snapshot(cache, REPO, MAIN, ("main",))), seed=0)
    build_tiny_model(str(_snapshot(cache, REPO, V1, ("v1",))), seed=1)
    pickled = _snapshot(cache, "org/pickled", PICKLED, ("main",))
    shutil.copy(cache / f"models--org--tiny/snapshots/{MAIN}/config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    return home


@pytest.fixture
def offline(hub_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE at the test cache, set after huggingface_hub was imported."""
    for name in HF_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_home / "hub"))
    return hub_home / "hub"


@pytest.fixture
def online(hub_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Not offline (in the environment nor in huggingface_hub's import-time constant); cache via HF_HOME."""
    for name in HF_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(hub_home))
    return hub_home / "hub"


def snap(cache: Path, commit: str = MAIN, repo: str = REPO) -> str:
    return str(cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit)


def _fake_online(monkeypatch: pytest.MonkeyPatch, online_call) -> list[dict]:
    """Replace the online snapshot_download with `online_call`; the cache look-up stays the real one."""
    real = huggingface_hub.snapshot_download
    calls: list[dict] = []

    def fake(**kwargs):
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            return real(**kwargs)
        return online_call(**kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return calls


def _http_error(cls, message: str):
    exc = cls.__new__(cls)  # without a real HTTP response, which differs across huggingface_hub versions
    Exception.__init__(exc, message)
    return exc


def test_hub_id_loads_and_matches_transformers(offline: Path, caplog: pytest.LogCaptureFixture) -> None:
    from transformers import AutoTokenizer

    env_before = dict(os.environ)
    with caplog.at_level(logging.INFO, logger="kvloom.engine.model_loader"):
        llm = LLM(REPO, num_gpu_blocks_override=64, dtype="float32")
    try:
        assert llm.llm_engine.model_dir == snap(offline)
        assert f"resolved {REPO}: revision main (commit {MAIN}) at {snap(offline)}" in caplog.text
        texts = ["The quick brown fox", "Paged attention stores keys"]
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        outs = llm.generate(texts, params, use_tqdm=False)
        tok = AutoTokenizer.from_pretrained(snap(offline))
        for text, out in zip(texts, outs):
            assert out.prompt_token_ids == tok(text)["input_ids"]
            assert out.outputs[0].token_ids == peft_greedy(snap(offline), None, out.prompt_token_ids, 12)
    finally:
        llm.shutdown()
    assert dict(os.environ) == env_before  # kvloom reads the HF variables, never writes them


def test_revision_commit_and_named_ref(offline: Path) -> None:
    assert resolve_model(REPO) == snap(offline)
    assert resolve_model(REPO, revision="main") == snap(offline)
    assert resolve_model(REPO, revision="v1") == snap(offline, V1)
    assert resolve_model(REPO, revision=V1) == snap(offline, V1)
    llm = LLM(REPO, revision="v1", num_gpu_blocks_override=16)
    try:
        assert llm.llm_engine.model_dir == snap(offline, V1)
    finally:
        llm.shutdown()


@pytest.mark.parametrize(("model", "revision"), [(REPO, "no-such-tag"), (REPO, "d" * 40), ("org/uncached", None)])
def test_not_cached_explains_how_to_fetch(offline: Path, model: str, revision: str | None) -> None:
    with pytest.raises(ValueError, match="is not in the Hugging Face cache") as err:
        resolve_model(model, revision=revision)
    msg = str(err.value)
    assert f"hf download {model}" in msg and "huggingface-cli download" in msg and "local" in msg
    assert "HF_HUB_OFFLINE is set" in msg and str(offline) in msg
    assert (f"--revision {revision}" in msg) == (revision is not None)
    assert "'*.bin'" not in msg and "'*.safetensors'" in msg


def test_cache_location_is_read_at_call_time(hub_home: Path, offline: Path, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="hf download"):
        resolve_model(REPO)
    # download_dir (vLLM's engine argument) is the cache, whatever the environment says.
    assert resolve_model(REPO, str(offline)) == snap(offline)
    # HF_HOME/hub when HF_HUB_CACHE is unset.
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(hub_home))
    assert resolve_model(REPO) == snap(offline)


def test_download_dir_reaches_the_resolver_from_the_engine(offline: Path, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    llm = LLM(REPO, download_dir=str(offline), num_gpu_blocks_override=16)
    try:
        assert llm.llm_engine.model_dir == snap(offline)
    finally:
        llm.shutdown()


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(lambda: OfflineModeIsEnabled("offline"), id="OfflineModeIsEnabled"),
        pytest.param(lambda: LocalEntryNotFoundError("no connection"), id="LocalEntryNotFoundError"),
        pytest.param(lambda: ConnectionError("refused"), id="ConnectionError"),
        pytest.param(lambda: __import__("requests").ConnectionError("refused"), id="requests"),
        pytest.param(lambda: __import__("httpx").ConnectError("refused"), id="httpx"),
    ],
)
def test_connection_failure_falls_back_to_the_cache(online: Path, monkeypatch, error) -> None:
    def unreachable(**kwargs):
        raise error()

    calls = _fake_online(monkeypatch, unreachable)
    assert resolve_model(REPO, revision="v1") == snap(online, V1)
    assert [c.get("local_files_only", False) for c in calls] == [False, True]
    assert calls[0]["revision"] == "v1" and calls[0]["cache_dir"] == str(online)


def test_unreachable_and_uncached_explains(online: Path, monkeypatch) -> None:
    def unreachable(**kwargs):
        raise ConnectionError("refused")

    _fake_online(monkeypatch, unreachable)
    with pytest.raises(ValueError, match=r"the hub cannot be reached \(ConnectionError\)") as err:
        resolve_model("org/uncached")
    assert "hf download org/uncached" in str(err.value)


def test_online_download_asks_for_safetensors_only(online: Path, monkeypatch, caplog) -> None:
    calls = _fake_online(monkeypatch, lambda **kwargs: snap(online))
    with caplog.at_level(logging.INFO, logger="kvloom.engine.model_loader"):
        assert resolve_model(REPO, revision="main", token="hf_secret") == snap(online)
    (call,) = calls
    assert call["repo_id"] == REPO and call["revision"] == "main" and call["token"] == "hf_secret"
    assert call["cache_dir"] == str(online) and not call.get("local_files_only")

    def fetched(name: str) -> bool:
        allowed = any(fnmatch.fnmatch(name, p) for p in call["allow_patterns"])
        return allowed and not any(fnmatch.fnmatch(name, p) for p in call["ignore_patterns"])

    wanted = ["model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json"]
    wanted += ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    wanted += ["special_tokens_map.json", "tokenizer.model", "vocab.txt", "merges.txt", "chat_template.jinja"]
    unwanted = ["pytorch_model.bin", "model.pt", "original/consolidated.00.pth", "consolidated.safetensors"]
    unwanted += ["onnx/model.safetensors", "model.gguf", "modeling_custom.py"]
    assert [n for n in wanted if not fetched(n)] == []
    assert [n for n in unwanted if fetched(n)] == []
    assert f"resolved {REPO}: revision main (commit {MAIN})" in caplog.text
    assert "hf_secret" not in caplog.text


def test_hf_token_reaches_the_download(online: Path, monkeypatch) -> None:
    calls = _fake_online(monkeypatch, lambda **kwargs: snap(online))
    llm = LLM(REPO, hf_token="hf_engine_token", num_gpu_blocks_override=16)
    llm.shutdown()
    assert calls and all(c["token"] == "hf_engine_token" for c in calls)
    assert "hf_engine_token" not in repr(llm.llm_engine.args)


def test_missing_repo_online_names_the_token(online: Path, monkeypatch) -> None:
    def not_found(**kwargs):
        raise _http_error(RepositoryNotFoundError, "404")

    _fake_online(monkeypatch, not_found)
    with pytest.raises(ValueError, match="has no repo 'org/private'.*HF_TOKEN") as err:
        resolve_model("org/private")
    assert "local" in str(err.value)


def test_pickle_only_repo_is_refused_offline(offline: Path) -> None:
    with pytest.raises(ValueError, match=r"only pickle weights \(pytorch_model\.bin\)"):
        resolve_model("org/pickled")


def test_pickle_only_repo_is_refused_online(online: Path, monkeypatch) -> None:
    # Online, the filtered download holds config.json only; the repo's file list names the pickle.
    only_config = online.parent / "only-config"
    only_config.mkdir(exist_ok=True)
    fake_snap = only_config / PICKLED
    fake_snap.mkdir(exist_ok=True)
    (fake_snap / "config.json").write_text("{}")
    _fake_online(monkeypatch, lambda **kwargs: str(fake_snap))

    class FakeApi:
        def __init__(self, token=None):
            pass

        def list_repo_files(self, repo_id, revision=None):
            assert (repo_id, revision) == ("org/pickled", PICKLED)
            return ["config.json", "pytorch_model.bin", "README.md"]

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    with pytest.raises(ValueError, match=r"only pickle weights \(pytorch_model\.bin\)"):
        resolve_model("org/pickled")


def test_tokenizer_resolution(offline: Path, tiny_llama: str) -> None:
    main, v1 = snap(offline), snap(offline, V1)
    assert resolve_tokenizer(None, main, REPO) == main
    assert resolve_tokenizer(None, v1, REPO, revision="v1", tokenizer_revision="v1") == v1
    # tokenizer_revision defaults to revision; set apart, the tokenizer comes from its own snapshot.
    assert resolve_tokenizer(None, main, REPO, tokenizer_revision="v1") == v1
    assert resolve_tokenizer(REPO, tiny_llama, tiny_llama) == main
    assert resolve_tokenizer(tiny_llama, main, REPO) == str(Path(tiny_llama).resolve())
    with pytest.raises(ValueError, match="tokenizer_revision='v1' applies to a hub id"):
        resolve_tokenizer(None, tiny_llama, tiny_llama, tokenizer_revision="v1")
    with pytest.raises(ValueError, match="tokenizer_revision='v1' applies to Hugging Face hub ids"):
        resolve_tokenizer(tiny_llama, main, REPO, tokenizer_revision="v1")
    with pytest.raises(ValueError, match="is not in the Hugging Face cache"):
        resolve_tokenizer(None, main, REPO, tokenizer_revision="no-such-tag")


def test_engine_loads_the_tokenizer_revision(offline: Path) -> None:
    llm = LLM(REPO, tokenizer_revision="v1", num_gpu_blocks_override=16)
    try:
        assert llm.llm_engine.model_dir == snap(offline)
        assert Path(llm.llm_engine.tokenizer.name_or_path) == Path(snap(offline, V1))
    finally:
        llm.shutdown()


def test_revision_of_a_local_model_is_refused(offline: Path, tiny_llama: str) -> None:
    with pytest.raises(ValueError, match="revision='v1' applies to Hugging Face hub ids"):
        resolve_model(tiny_llama, revision="v1")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Qwen/Qwen2.5-0.5B-Instruct", True),
        ("gpt2", True),
        ("meta-llama/Llama-3.1-8B-Instruct", True),
        ("a/b/c", False),
        ("/abs/path", False),
        ("./rel", False),
        ("org--x/y", False),
        ("org/x..y", False),
        ("", False),
    ],
)
def test_is_hub_id(name: str, expected: bool) -> None:
    assert is_hub_id(name) is expected


def test_hub_args_are_engine_args_not_ignored() -> None:
    assert not {"revision", "tokenizer_revision", "hf_token"} & IGNORED_VLLM_ARGS
    args = EngineArgs.from_kwargs(model=REPO, revision="v1", tokenizer_revision="t1", hf_token="hf_x")
    assert (args.revision, args.tokenizer_revision, args.hf_token) == ("v1", "t1", "hf_x")
    assert "hf_x" not in repr(args)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_cli_passes_hub_flags(command: str, monkeypatch, tmp_path: Path) -> None:
    import kvloom
    import kvloom.integrations.openai.server
    import kvloom.serving  # noqa: F401  (imported before the patch: they bind AsyncLLM/LLM at import)
    from kvloom import async_llm, cli

    seen: dict = {}

    def capture(*args, **kwargs):
        # AsyncLLM(engine_args) for serve, LLM(model, **engine_kwargs) for generate.
        seen.update(vars(args[0]) if isinstance(args[0], EngineArgs) else dict(kwargs, model=args[0]))
        raise _Stop

    monkeypatch.setattr(async_llm, "AsyncLLM", capture)
    monkeypatch.setattr(kvloom, "LLM", capture)
    head = ["serve", REPO] if command == "serve" else ["generate", "hi", "--model", REPO]
    flags = ["--revision", "v1", "--tokenizer-revision", "t1", "--download-dir", str(tmp_path)]
    with pytest.raises(_Stop):
        cli.main([*head, *flags, "--hf-token", "hf_cli"])
    assert seen["model"] == REPO
    assert (seen["revision"], seen["tokenizer_revision"]) == ("v1", "t1")
    assert (seen["download_dir"], seen["hf_token"]) == (str(tmp_path), "hf_cli")
    seen.clear()
    with pytest.raises(_Stop):
        cli.main([*head, "--hf-token"])  # no value: the stored login, as vLLM's --hf-token
    assert seen["hf_token"] is True and seen["revision"] is None
