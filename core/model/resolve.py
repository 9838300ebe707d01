"""Turning ``--model`` into a local folder: the embedded default, a directory, or a Hugging Face repo id.

Nothing is downloaded: a repo id must already be in the local Hugging Face cache (``HF_HUB_CACHE`` /
``HF_HOME``), laid out as ``huggingface_hub`` lays it out.
"""

from __future__ import annotations

from pathlib import Path


class ModelNotFound(FileNotFoundError):
    """``--model`` names neither a folder nor a repo id present in the local Hugging Face cache."""


def resolve_model_path(model: str | None) -> Path:
    """The local folder holding ``config.json`` and the weights for ``model``."""
    if model is None:
        from dsv.model.default_model import ensure_default_model

        return ensure_default_model()
    local = Path(model).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise ModelNotFound(f"--model {model!r} is a file; give the folder that holds config.json")
    if model.count("/") != 1 or model.startswith(("/", ".", "~")):
        raise ModelNotFound(
            f"--model {model!r}: no such folder, and it is not a Hugging Face repo id (org/name)"
        )
    return _from_hub_cache(model)


def _from_hub_cache(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as exc:
        raise ModelNotFound(
            f"{repo_id!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and this machine cannot "
            "download it. Put the checkpoint there (huggingface-cli download on a connected machine, then copy "
            "the cache), or pass --model /path/to/folder."
        ) from exc
