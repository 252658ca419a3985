"""Hugging Face hub ids: fetch (or find in the cache) a repo's snapshot, as transformers and vLLM do.

The environment (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN) is read when a model is resolved,
not when huggingface_hub was imported, and is never written: kvloom passes cache_dir, token and
local_files_only to huggingface_hub explicitly.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

logger = logging.getLogger("kvloom.engine.model_loader")

# Safetensors weights, configs, tokenizer files and chat templates: never pickle (*.bin, *.pt, *.pth).
TOKENIZER_PATTERNS = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja")
MODEL_PATTERNS = ("*.safetensors", *TOKENIZER_PATTERNS)
# The loader reads top-level safetensors only; Mistral repos also ship a second copy of the weights
# as consolidated.safetensors, and some repos keep other formats' weights in subfolders.
IGNORE_PATTERNS = ("*/*.safetensors", "consolidated*.safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

_TRUE = {"1", "ON", "YES", "TRUE"}
# A repo id is `name` or `owner/name` (huggingface_hub's REPO_ID_REGEX, without `--` or `..`).
_REPO_ID = re.compile(r"^(?:[\w\-.]+/)?[\w\-.]+$")


def is_hub_id(name: str) -> bool:
    """Whether `name` can be a hub repo id (`org/name` or a legacy top-level `name`)."""
    return (
        bool(_REPO_ID.match(name))
        and "--" not in name
        and ".." not in name
        and not name.startswith((".", "-"))
        and not name.endswith((".", "-", ".git"))
        and len(name) <= 96
    )


def hub_cache_dir(download_dir: str | os.PathLike[str] | None = None) -> Path:
    """The hub cache: download_dir, else $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if download_dir:
        return Path(download_dir).expanduser()
    env = os.environ
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return Path(os.path.expandvars(cache)).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def is_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, or as huggingface_hub saw it at import."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return (env or "").upper() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def download_snapshot(
    repo_id: str,
    revision: str | None = None,
    download_dir: str | os.PathLike[str] | None = None,
    token: bool | str | None = None,
    tokenizer_only: bool = False,
) -> Path:
    """The local snapshot directory of `repo_id` at `revision`: downloaded, or from the cache when offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    cache = hub_cache_dir(download_dir)
    patterns = TOKENIZER_PATTERNS if tokenizer_only else MODEL_PATTERNS
    kwargs = dict(
        repo_id=repo_id,
        revision=revision,
        cache_dir=str(cache),
        token=token,
        allow_patterns=list(patterns),
        ignore_patterns=list(IGNORE_PATTERNS),
    )
    what = f"{repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    path = None
    reason = "HF_HUB_OFFLINE is set"
    if not is_offline():
        try:
            path = snapshot_download(**kwargs)
        except GatedRepoError as exc:
            raise ValueError(
                f"{what} is a gated repo on the Hugging Face hub: accept its terms at "
                f"https://huggingface.co/{repo_id} and pass a token (HF_TOKEN, `hf auth login`, or hf_token=)"
            ) from exc
        except RepositoryNotFoundError as exc:
            raise ValueError(
                f"model {repo_id!r} is not a local directory or file, and the Hugging Face hub has no repo "
                f"{repo_id!r} that this token can read (a private repo needs HF_TOKEN or hf_token=). "
                f"{LOCAL_ALTERNATIVE}"
            ) from exc
        except RevisionNotFoundError as exc:
            raise ValueError(f"the Hugging Face repo {repo_id!r} has no revision {revision!r}") from exc
        except (*_connection_errors(), *_not_cached_errors()) as exc:
            logger.warning("the Hugging Face hub cannot be reached (%s); looking for %s in %s", exc, what, cache)
            reason = f"the hub cannot be reached ({type(exc).__name__})"
    reached = path is not None
    if path is None:
        try:
            path = snapshot_download(**kwargs, local_files_only=True)
        except _not_cached_errors() as exc:
            raise ValueError(_not_cached_message(repo_id, revision, download_dir, cache, reason, patterns)) from exc
    path = Path(path).absolute()
    logger.info(
        "resolved %s%s: revision %s (commit %s) at %s",
        "the tokenizer of " if tokenizer_only else "",
        repo_id,
        revision or "main",
        path.name,
        path,
    )
    if not tokenizer_only:
        _check_model_files(repo_id, path, token, reached)
    return path


LOCAL_ALTERNATIVE = (
    "Or pass `model=` a local Hugging Face-format directory (config.json + *.safetensors + tokenizer files) "
    "or a .gguf file."
)


def _not_cached_message(
    repo_id: str,
    revision: str | None,
    download_dir: str | os.PathLike[str] | None,
    cache: Path,
    reason: str,
    patterns: tuple[str, ...],
) -> str:
    args = [repo_id]
    if revision:
        args += ["--revision", revision]
    args += ["--include", *(f"'{p}'" for p in patterns)]
    if download_dir:
        args += ["--cache-dir", str(download_dir)]
    cmd = " ".join(args)
    rev = f" at revision {revision!r}" if revision else ""
    kind = "tokenizer" if patterns == TOKENIZER_PATTERNS else "model"
    return (
        f"{kind} {repo_id!r} is not a local path, and the hub repo {repo_id!r}{rev} is not in the Hugging Face "
        f"cache at {cache} and {reason}. "
        f"Fetch it where the hub is reachable with `hf download {cmd}` "
        f"(`huggingface-cli download {cmd}` with older huggingface_hub), into this cache "
        "(HF_HUB_CACHE / HF_HOME, or download_dir=). " + LOCAL_ALTERNATIVE
    )


def _check_model_files(repo_id: str, path: Path, token: bool | str | None, reached: bool) -> None:
    """Refuse a snapshot kvloom cannot load: no config.json, or no safetensors weights (pickle only)."""
    if not (path / "config.json").is_file():
        raise ValueError(
            f"the Hugging Face repo {repo_id!r} has no config.json at the top level ({path}); kvloom loads "
            f"transformers-format checkpoints. {LOCAL_ALTERNATIVE}"
        )
    if any(path.glob("*.safetensors")):
        return
    names = [p.name for p in path.iterdir()]
    if reached:
        try:
            from huggingface_hub import HfApi

            names = HfApi(token=token).list_repo_files(repo_id, revision=path.name)
        except Exception as exc:  # only to name the files in the message; the refusal stands regardless
            logger.debug("could not list the files of %s: %s", repo_id, exc)
    pickled = sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))
    ggufs = sorted(n for n in names if n.lower().endswith(".gguf"))
    if pickled:
        found = f"it has only pickle weights ({', '.join(pickled[:4])}), refused: loading pickle can run code"
    elif ggufs:
        found = f"it has GGUF files ({', '.join(ggufs[:4])}): download one and pass that .gguf file as `model=`"
    elif reached:
        found = "it has no weights kvloom can load"
    else:
        found = "the cached snapshot lacks them (an interrupted or filtered download?)"
    raise ValueError(
        f"the Hugging Face repo {repo_id!r} (commit {path.name}) has no *.safetensors weights: {found}. "
        "Use a revision or repo with safetensors weights (many repos have a converted one in a `refs/pr/N` "
        f"revision). {LOCAL_ALTERNATIVE}"
    )


def _connection_errors() -> tuple[type[BaseException], ...]:
    """What a failed connection raises, in whichever HTTP stack this huggingface_hub uses."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    errors: list[type[BaseException]] = [LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError]
    for module, names in (
        ("httpx", ("TransportError",)),
        ("httpx2", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        errors += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return tuple(errors)


def _not_cached_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub import errors

    found = [errors.LocalEntryNotFoundError, FileNotFoundError]
    incomplete = getattr(errors, "IncompleteSnapshotError", None)  # huggingface_hub >= 1.x
    if isinstance(incomplete, type):
        found.append(incomplete)
    return tuple(found)
