"""Turning ``--model`` into a local folder: the embedded default, a directory, or a Hugging Face repo id.

Nothing is downloaded: a repo id must already be in the local Hugging Face cache, laid out the way
``huggingface_hub`` lays it out (``models--org--name/refs/main`` + ``snapshots/<commit>/...``).
"""

from __future__ import annotations

import os
from pathlib import Path


class ModelNotFound(FileNotFoundError):
    """``--model`` names neither a local folder nor a repo id present in the local Hugging Face cache."""


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, from the environment as it is *now*.

    ``huggingface_hub.constants`` reads the environment once at import; reading it here again honors an
    ``HF_HUB_CACHE`` / ``HF_HOME`` set later in the process (tests, launchers).
    """
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):  # the legacy name, still honored by huggingface_hub
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE).expanduser()


def resolve_model_path(model: str | os.PathLike[str] | None) -> Path:
    """The local folder holding ``config.json`` and the weights for ``model``.

    ``None`` gives the embedded default model (built on first use); an existing folder is returned as is;
    anything else is taken as a Hugging Face repo id and looked up in the local cache only.

    Raises:
        ModelNotFound: ``model`` is a file, an invalid repo id, or a repo id that is not cached locally.
    """
    if model is None:
        from dsv.model.default_model import ensure_default_model

        return ensure_default_model()
    local = Path(model).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise ModelNotFound(f"model {str(model)!r} is a file; give the folder that holds config.json")
    return _from_hub_cache(str(model))


def _from_hub_cache(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ModelNotFound(
            f"model {repo_id!r}: no such folder, and it is not a valid Hugging Face repo id (org/name)"
        ) from exc
    cache = hub_cache_dir()
    try:
        folder = Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError) as exc:
        raise ModelNotFound(
            f"model {repo_id!r} is not a local folder and was not found in the local Hugging Face cache "
            f"{cache} (set by HF_HUB_CACHE / HF_HOME); this machine cannot download it. Download it on a "
            "connected machine (hf download) and copy the cache here, or pass the checkpoint folder's path."
        ) from exc
    if not (folder / "config.json").is_file():
        raise ModelNotFound(f"{repo_id!r} is cached at {folder}, but that snapshot holds no config.json")
    return folder
