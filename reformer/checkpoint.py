"""Checkpoint files in the Hugging Face layout: ``config.json`` + ``model.safetensors``.

Reading prefers ``model.safetensors``, then a sharded ``model.safetensors.index.json``, then
``pytorch_model.bin`` (and its sharded index), the latter only through ``torch.load(weights_only=True)``.
Writing is atomic: everything goes into a temporary directory next to the target, which then replaces
the target with ``rename``; files of an existing target that are not part of a model checkpoint
(tokenizer files, a README, ...) are carried over. If anything fails, the target is left as it was and
the temporary directory is removed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable

import torch

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
CONFIG_NAME = "config.json"


def _is_checkpoint_file(name: str) -> bool:
    """Files a new checkpoint replaces (weights in any layout, their indexes, the config)."""
    if name in (CONFIG_NAME, SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME):
        return True
    # shards: model-00001-of-00002.safetensors, pytorch_model-00001-of-00002.bin
    return (name.startswith("model-") and name.endswith(".safetensors")) or (
        name.startswith("pytorch_model-") and name.endswith(".bin")
    )


def _load_one(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_sharded(directory: str, index_name: str) -> dict[str, torch.Tensor]:
    with open(os.path.join(directory, index_name), encoding="utf-8") as handle:
        weight_map = json.load(handle)["weight_map"]
    state_dict: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state_dict.update(_load_one(os.path.join(directory, shard)))
    return state_dict


def load_state_dict(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The raw state dict stored in a checkpoint directory (CPU tensors, keys as written)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"checkpoint directory {directory!r} does not exist (only local directories are supported)"
        )
    if os.path.isfile(os.path.join(directory, SAFE_WEIGHTS_NAME)):
        return _load_one(os.path.join(directory, SAFE_WEIGHTS_NAME))
    if os.path.isfile(os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME)):
        return _load_sharded(directory, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(os.path.join(directory, WEIGHTS_NAME)):
        return _load_one(os.path.join(directory, WEIGHTS_NAME))
    if os.path.isfile(os.path.join(directory, WEIGHTS_INDEX_NAME)):
        return _load_sharded(directory, WEIGHTS_INDEX_NAME)
    raise FileNotFoundError(
        f"no weights in {directory!r}: expected {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME}, {WEIGHTS_NAME} or "
        f"{WEIGHTS_INDEX_NAME}"
    )


def save_state_dict(state_dict: dict[str, torch.Tensor], directory: str, safe_serialization: bool = True) -> str:
    """Write the weights file into ``directory`` (which must exist); returns the file name."""
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state_dict.items()}
    if safe_serialization:
        from safetensors.torch import save_file

        # transformers refuses safetensors files without the "format" metadata
        save_file(tensors, os.path.join(directory, SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
        return SAFE_WEIGHTS_NAME
    torch.save(tensors, os.path.join(directory, WEIGHTS_NAME))
    return WEIGHTS_NAME


def _fsync(path: str) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _carry_over(source: str, target: str) -> None:
    """Bring the non-checkpoint files of an existing directory into the new one (hard links when possible)."""
    for name in os.listdir(source):
        if _is_checkpoint_file(name) or os.path.lexists(os.path.join(target, name)):
            continue
        src, dst = os.path.join(source, name), os.path.join(target, name)
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True)
            continue
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:
            shutil.copy2(src, dst, follow_symlinks=False)


def atomic_write_directory(directory: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Run ``write(tmp_dir)`` and then make ``tmp_dir`` become ``directory`` by rename.

    ``tmp_dir`` lives in the parent of ``directory`` (same file system, so the rename is atomic). An
    existing ``directory`` is moved aside, replaced, and deleted only once the new one is in place.
    """
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"cannot save a checkpoint to {directory!r}: it exists and is not a directory")
    parent, base = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{base}.saving-", dir=parent)
    try:
        os.chmod(staging, 0o777 & ~_current_umask())
        write(staging)
        if os.path.isdir(directory):
            _carry_over(directory, staging)
        for name in os.listdir(staging):
            if os.path.isfile(os.path.join(staging, name)):
                _fsync(os.path.join(staging, name))
        _fsync(staging)
        if os.path.isdir(directory):
            retired = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
            os.rmdir(retired)
            os.rename(directory, retired)
            try:
                os.rename(staging, directory)
            except BaseException:
                os.rename(retired, directory)
                raise
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, directory)
        _fsync(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def atomic_save(directory: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write a checkpoint into ``directory`` through ``write(staging_directory)`` (interim: the directory swap)."""
    atomic_write_directory(directory, write)


def check_checkpoint_files(path: str | os.PathLike) -> None:
    """Checks of a local checkpoint directory before it is read (interim: none)."""


__all__ = [
    "CONFIG_NAME",
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "atomic_write_directory",
    "load_state_dict",
    "save_state_dict",
]
