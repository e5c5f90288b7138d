"""Checkpoint directories in the Hugging Face layout: atomic saves, and checks before reads.

Writing and reading the files themselves is transformers' business (``save_pretrained`` /
``from_pretrained``: shards, safetensors, variants). This module adds two things around it:

- :func:`atomic_save` runs a writer into a staging directory inside the target and moves the finished
  files in one by one (``os.replace``), in an order that keeps the directory loadable at every instant;
  the target directory itself is never renamed, deleted or chmod-ed.
- :func:`check_checkpoint_files` checks the JSON files that steer a read (``config.json``,
  ``generation_config.json``, weight indexes) before transformers opens anything: a malformed file
  gets a ``ValueError`` naming it, and no index may point outside the checkpoint directory.

``load_state_dict`` reads a checkpoint's raw state dict (the benchmark harness and tests use it).
"""

from __future__ import annotations

import contextlib
import errno
import json
import ntpath
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator

import torch

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"

# Staging directories of atomic_save: ".saving-<host>-<pid>-<random>" inside the target directory.
STAGING_PREFIX = ".saving-"
_STAGING_RE = re.compile(re.escape(STAGING_PREFIX) + r"(?P<host>.+)-(?P<pid>\d+)-(?P<random>[^-]+)")

# Weight files as transformers names them, with an optional variant ("model.fp16.safetensors"):
# single files, shards ("model-00001-of-00003.safetensors", "model.fp16-00001-of-00003.safetensors")
# and indexes ("model.safetensors.index.json", "model.safetensors.index.fp16.json"); the same for
# the legacy pickle layout ("pytorch_model.bin", ...).
_WEIGHTS_DATA_RE = re.compile(
    r"model(?:\.(?P<safe_variant>[^/]+?))?(?P<safe_shard>-\d{5}-of-\d{5})?\.safetensors"
    r"|pytorch_model(?:\.(?P<bin_variant>[^/]+?))?(?P<bin_shard>-\d{5}-of-\d{5})?\.bin"
)
_WEIGHTS_INDEX_RE = re.compile(r"(?:model\.safetensors|pytorch_model\.bin)\.index(?:\.(?P<variant>[^/]+?))?\.json")


# -- reading: checks before transformers opens anything ----------------------------------------------


def _read_json_object(path: str) -> dict:
    """The JSON object stored in ``path``; ``ValueError`` naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got a JSON {type(value).__name__}")
    return value


def _check_inside(name: object, path: str, field: str) -> str:
    """``name`` (a file named in ``path``'s ``field``) as a plain relative path that stays inside the
    directory of ``path``: no absolute path, no ``..`` component, no backslash (a separator on Windows).

    Lexical only: a file that is itself a symlink (the Hugging Face cache links snapshot files to blobs)
    is allowed; what an index may not do is name a path outside the directory."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{path}: {field} must be a non-empty string file name, got {name!r}")
    if "\\" in name or "\0" in name or os.path.isabs(name) or ntpath.isabs(name) or ntpath.splitdrive(name)[0]:
        raise ValueError(f"{path}: {field} {name!r} is not a relative path inside the checkpoint directory")
    if ".." in name.split("/"):
        raise ValueError(f"{path}: {field} {name!r} escapes the checkpoint directory")
    if os.path.normpath(name) == ".":
        raise ValueError(f"{path}: {field} {name!r} does not name a file")
    return name


def _read_weight_map(index_path: str) -> dict[str, str]:
    """The ``weight_map`` of a weight index (parameter name -> file inside the index's directory), checked."""
    index = _read_json_object(index_path)
    if "weight_map" not in index:
        raise ValueError(f"{index_path}: a weight index needs a 'weight_map' (parameter name -> file name)")
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path}: 'weight_map' must be a non-empty JSON object, got {weight_map!r:.80}")
    # transformers' get_checkpoint_shard_files reads index["metadata"] as a dict
    if not isinstance(index.get("metadata"), dict):
        raise ValueError(f"{index_path}: a weight index needs a 'metadata' JSON object (transformers reads it)")
    for parameter, file_name in weight_map.items():
        _check_inside(file_name, index_path, f"weight_map[{parameter!r}]")
    return weight_map


def check_checkpoint_files(directory: str | os.PathLike, subfolder: str = "") -> None:
    """Check a local checkpoint directory before transformers reads it; ``ValueError`` naming the file.

    Checked when present: ``config.json`` and ``generation_config.json`` are JSON objects; a
    ``transformers_weights`` file named in the config stays inside the directory; every weight index
    (``model.safetensors.index*.json``, ``pytorch_model.bin.index*.json``, or the index the config names)
    is a JSON object with a ``metadata`` object and a non-empty ``weight_map`` object whose values are
    relative file names inside the directory (no absolute path, no ``..``). Weight files themselves are
    not opened (safetensors validates its header; ``.bin`` files are read with ``weights_only=True``).

    Does nothing when ``directory`` (joined with ``subfolder``) is not a local directory: a Hub id
    is transformers' to resolve. Wiring: ``check_checkpoint_files(path, kwargs.get("subfolder", ""))``
    before ``super().from_pretrained(path, ...)``.
    """
    base = os.path.join(os.fspath(directory), subfolder)
    if not os.path.isdir(base):
        return
    # A file missing (or gone by the time it is opened: a concurrent save retired it) is skipped: whatever
    # reads it next fails on its own terms; this check is about the content of the files that are there.
    index_names = set()
    config_path = os.path.join(base, CONFIG_NAME)
    with contextlib.suppress(FileNotFoundError):
        explicit = _read_json_object(config_path).get("transformers_weights")
        if explicit is not None:
            _check_inside(explicit, config_path, "transformers_weights")
            if explicit.endswith(".index.json"):
                index_names.add(explicit)
    with contextlib.suppress(FileNotFoundError):
        _read_json_object(os.path.join(base, GENERATION_CONFIG_NAME))
    index_names.update(name for name in os.listdir(base) if _WEIGHTS_INDEX_RE.fullmatch(name))
    for name in sorted(index_names):
        with contextlib.suppress(FileNotFoundError):
            _read_weight_map(os.path.join(base, name))


# -- legacy loader / saver of the pre-PreTrainedModel classes --------------------------------------


def _load_one(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_sharded(directory: str, index_name: str) -> dict[str, torch.Tensor]:
    # read (and check) the index again: it may have been replaced since check_checkpoint_files saw it
    weight_map = _read_weight_map(os.path.join(directory, index_name))
    state_dict: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state_dict.update(_load_one(os.path.join(directory, shard)))
    return state_dict


def load_state_dict(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The raw state dict stored in a checkpoint directory (CPU tensors, keys as written).

    Prefers ``model.safetensors``, then ``model.safetensors.index.json``, then ``pytorch_model.bin`` and
    its index (pickles only through ``torch.load(weights_only=True)``). The directory passes
    :func:`check_checkpoint_files` first, so no index can make it read a file outside the directory."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"checkpoint directory {directory!r} does not exist (only local directories are supported)"
        )
    check_checkpoint_files(directory)
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


# -- writing: atomic_save ----------------------------------------------------------------------------


def _weights_variant(name: str) -> tuple[str, str] | None:
    """``("data" | "index", variant)`` for a top-level weight file name (variant "" for none), else None."""
    match = _WEIGHTS_INDEX_RE.fullmatch(name)
    if match:
        return "index", match["variant"] or ""
    match = _WEIGHTS_DATA_RE.fullmatch(name)
    if match:
        return "data", match["safe_variant"] or match["bin_variant"] or ""
    return None


def _move_rank(relative: str) -> tuple[int, str]:
    """Order in which staged files enter the target: weight data (single files and shards), then weight
    indexes, then other files (generation config, tokenizer files, anything in a subdirectory), then
    ``config.json`` last."""
    if "/" in relative:
        return 2, relative
    if relative == CONFIG_NAME:
        return 3, relative
    kind = _weights_variant(relative)
    if kind is None:
        return 2, relative
    return (0 if kind[0] == "data" else 1), relative


def _retire_rank(name: str) -> tuple[int, str]:
    """Order in which stale weight files leave: indexes, then single files, then shards (a reader picks
    an entry point first and the shards it names afterwards)."""
    kind, _ = _weights_variant(name)
    if kind == "index":
        return 0, name
    match = _WEIGHTS_DATA_RE.fullmatch(name)
    return (2 if match["safe_shard"] or match["bin_shard"] else 1), name


def _staging_host() -> str:
    return re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname()) or "localhost"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_dead_staging(directory: str) -> None:
    """Remove staging directories left by saves on this host whose process no longer exists (a kill)."""
    host = _staging_host()
    for name in os.listdir(directory):
        match = _STAGING_RE.fullmatch(name)
        if match and match["host"] == host and not _pid_alive(int(match["pid"])):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(path: str) -> None:
    """Make renames into ``path`` durable. Skipped where directories cannot be opened or synced
    (Windows, some network file systems); any other error is raised."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def _directory_lock(path: str) -> Iterator[None]:
    """An exclusive ``flock`` on the directory: two saves into one directory commit one after the other
    (their ``write`` still runs in parallel). Best effort: without ``fcntl`` or where the file system
    refuses ``flock`` on a directory, saves are not serialized."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _default_file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` less the umask (read from ``/proc`` on Linux:
    ``os.umask`` can only be read by setting it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            mask = next(int(line.split()[1], 8) for line in handle if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        # meanwhile another thread creates private files, never world-writable ones
        mask = os.umask(0o077)
        os.umask(mask)
    return 0o666 & ~mask


def _staged_entries(staging: str) -> tuple[list[str], list[str]]:
    """Relative paths (``/``-separated) of the files (symlinks included) and subdirectories in ``staging``."""
    files, directories = [], []
    for root, dir_names, file_names in os.walk(staging):
        prefix = os.path.relpath(root, staging).replace(os.sep, "/")
        prefix = "" if prefix == "." else prefix + "/"
        for name in list(dir_names):
            if os.path.islink(os.path.join(root, name)):  # moved as a link, not walked
                dir_names.remove(name)
                files.append(prefix + name)
            else:
                directories.append(prefix + name)
        files.extend(prefix + name for name in file_names)
    return files, directories


def _make_directories(path: str) -> list[str]:
    """``os.makedirs(path)``; returns the directories it created, outermost first."""
    missing = []
    while not os.path.isdir(path):
        if os.path.lexists(path):
            raise NotADirectoryError(f"cannot save a checkpoint into {path!r}: it exists and is not a directory")
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    created = []
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:  # a concurrent save created it
            continue
        created.append(directory)
    return created


def _backup(path: str, backup: str) -> None:
    """Keep the file at ``path`` under ``backup`` for a rollback: a hard link (no copy), else a copy."""
    if not os.path.isdir(os.path.dirname(backup)):  # a file in a subdirectory
        os.makedirs(os.path.dirname(backup))
    try:
        os.link(path, backup, follow_symlinks=False)
    except OSError:
        shutil.copy2(path, backup, follow_symlinks=False)


def _stale_weight_files(target: str, new_names: set[str]) -> list[str]:
    """The weight files and indexes in ``target`` of the variants among ``new_names`` that are not in
    ``new_names``, in the order to remove them. Nothing when ``new_names`` has no weight file."""
    variants = {kind[1] for kind in map(_weights_variant, new_names) if kind is not None}
    stale = []
    for name in os.listdir(target):
        kind = _weights_variant(name)
        path = os.path.join(target, name)
        if name not in new_names and kind is not None and kind[1] in variants and not os.path.isdir(path):
            stale.append(name)
    return sorted(stale, key=_retire_rank)


def _commit(target: str, staging: str, backups: str) -> list[str]:
    """Move the files of ``staging`` into ``target`` (see :func:`atomic_save`); returns their relative paths.

    Every step that changes ``target`` is journaled; on any exception the journal is undone in reverse
    (replaced files come back from their hard-link backups, added files go, retired files come back)."""
    files, directories = _staged_entries(staging)
    if not files:
        return []  # nothing written (e.g. save_pretrained(is_main_process=False)): nothing to change
    check_checkpoint_files(staging)
    for relative in directories:
        existing = os.path.join(target, relative)
        if os.path.lexists(existing) and not os.path.isdir(existing):
            raise NotADirectoryError(f"cannot save {relative!r}/ into {target!r}: {existing!r} is not a directory")
    for relative in files:
        existing = os.path.join(target, relative)
        if os.path.isdir(existing) and not os.path.islink(existing):
            raise IsADirectoryError(f"cannot save {relative!r} into {target!r}: {existing!r} is a directory")
        if not os.path.islink(os.path.join(staging, relative)):
            _fsync_file(os.path.join(staging, relative))
    order = sorted(files, key=_move_rank)
    default_mode = _default_file_mode()
    touched = {target} | {os.path.join(target, relative) for relative in directories}

    journal: list[tuple[str, str]] = []  # ("mkdir" | "added" | "replaced" | "retired", relative path)
    with _directory_lock(target):
        try:
            os.mkdir(backups)
            for relative in directories:
                if not os.path.isdir(os.path.join(target, relative)):
                    os.mkdir(os.path.join(target, relative))
                    journal.append(("mkdir", relative))
            for relative in order:
                source, destination = os.path.join(staging, relative), os.path.join(target, relative)
                try:
                    previous = os.lstat(destination)
                except FileNotFoundError:
                    previous = None
                if not os.path.islink(source):
                    # the mode of the file it replaces, else the umask default (safetensors writes 0o600)
                    keep = previous is not None and stat.S_ISREG(previous.st_mode)
                    mode = stat.S_IMODE(previous.st_mode) if keep else default_mode
                    if stat.S_IMODE(os.stat(source).st_mode) != mode:
                        os.chmod(source, mode)
                if previous is None:
                    journal.append(("added", relative))
                else:
                    _backup(destination, os.path.join(backups, relative))
                    journal.append(("replaced", relative))
                os.replace(source, destination)
            for directory in touched:
                _fsync_directory(directory)

            # the new checkpoint is complete and durable: retire the previous checkpoint's weight files
            # of the variants just written that the new one does not have (stale shards, an old index,
            # pytorch_model.bin after a safetensors save)
            stale = _stale_weight_files(target, {relative for relative in files if "/" not in relative})
            for name in stale:
                os.replace(os.path.join(target, name), os.path.join(backups, name))
                journal.append(("retired", name))
            if stale:
                _fsync_directory(target)
        except BaseException:
            _rollback(target, backups, journal)
            raise
    return order


def _rollback(target: str, backups: str, journal: list[tuple[str, str]]) -> None:
    """Undo a partial commit (best effort: a step that fails is skipped, the others still run)."""
    for action, relative in reversed(journal):
        path = os.path.join(target, relative)
        with contextlib.suppress(OSError):
            if action in ("replaced", "retired"):
                os.replace(os.path.join(backups, relative), path)
            elif action == "added":
                os.unlink(path)
            elif action == "mkdir":
                os.rmdir(path)
    with contextlib.suppress(OSError):
        _fsync_directory(target)


def atomic_save(save_directory: str | os.PathLike, write: Callable[[str], None]) -> list[str]:
    """Save a checkpoint into ``save_directory`` atomically, file by file; returns the relative paths written.

    ``write(staging)`` writes a complete checkpoint (any files: ``config.json``, ``model.safetensors`` or
    shards and their index, ``generation_config.json``, tokenizer files, subdirectories) into ``staging``,
    an empty hidden directory ``.saving-<host>-<pid>-<random>/new`` inside the target (same file system,
    so moves are renames). Wiring for a ``PreTrainedModel`` subclass::

        parent_save = super().save_pretrained  # zero-argument super() does not work inside the lambda
        atomic_save(save_directory, lambda staging: parent_save(staging, **kwargs))

    (``push_to_hub`` must not go through ``write``: it would upload the staging directory.)

    Then, holding an ``flock`` on the target (concurrent saves into one directory commit in turn):
    every staged file is fsynced and moved in with ``os.replace``: weight data (single files and
    shards) first, then weight indexes, then other files, then ``config.json``; the directory is
    fsynced; then the previous checkpoint's weight files that the new one does not have (of the
    variants it wrote: stale shards, an old index, ``pytorch_model.bin``) are removed and the directory
    fsynced again. Files that are not weight files of those variants (``README.md``, tokenizer files the
    new save did not write, user files, other variants, ``generation_config.json``) are kept. If
    ``write`` writes nothing (``is_main_process=False``), the target is not touched at all.

    The target: created if missing (parents too), never renamed, never deleted, its mode never changed;
    a symlink is resolved once, at the start (the link stays a link, the files land in the directory
    it points to, created if missing); ``"."`` works. A file that replaces one of the same name takes
    that file's mode bits; a new file gets the umask default (``0o666 & ~umask``, what ``open`` gives;
    safetensors itself creates its files ``0o600``). Owners and ACLs are not carried over.

    Failure: on any exception (in ``write`` or while moving, ``KeyboardInterrupt`` included), the moves
    made so far are undone (replaced files come back from hard-link backups, copies where the file
    system has no hard links), the staging directory is removed, directories this call created are
    removed if still empty, and the exception propagates: the target holds its previous files. The one
    exception: a ``KeyboardInterrupt`` during the final removal of the staging directory propagates with
    the new checkpoint in place (an ``OSError`` there is ignored; the leftover goes with a later save).
    A process killed mid-save leaves every file either old or new (each move is one rename) and its
    staging directory, which the next save into that directory removes once that process no longer
    exists (same host; staging directories of other hosts are left alone).

    What a concurrent reader (``from_pretrained`` in another process), or the directory after a crash,
    shows. Every file is complete, old or new, never torn. A first save: ``config.json`` arrives last,
    so the directory is no checkpoint until it is a complete one. Same layout as before (the usual case:
    a training loop saving one single-file checkpoint over and over): at every instant the directory
    loads, with the old or the new weights; a reader may pair the new weights with the old config
    (harmless when the architecture is unchanged). Layout switches (single file <-> sharded, ``.bin`` ->
    safetensors, another shard count): the new shards arrive before the index naming them and the old
    entry point (``model.safetensors`` over an index) wins until it is removed, so the directory loads
    at every instant, old or new weights (with the new config in between); but a reader that chose an
    old file's name just before its removal and opens it just after gets ``FileNotFoundError`` (a retry
    sees the new layout). Sharded over sharded with the same shard names: the shards are replaced one
    by one, so a reader or a crash can combine shards of both saves (each shard whole).
    Not for Windows (``os.replace`` fails over files a reader holds open).
    """
    target = os.path.realpath(os.fspath(save_directory))
    created = _make_directories(target)
    _remove_dead_staging(target)
    root = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{_staging_host()}-{os.getpid()}-", dir=target)
    try:
        for directory in created:  # make the new directories' entries durable before anything lands in them
            _fsync_directory(os.path.dirname(directory))
        staging = os.path.join(root, "new")
        os.mkdir(staging)
        write(staging)
        written = _commit(target, staging, os.path.join(root, "old"))
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        for directory in reversed(created):
            try:
                os.rmdir(directory)
            except OSError:  # not empty: someone else uses it
                break
        raise
    shutil.rmtree(root, ignore_errors=True)
    return written


__all__ = [
    "CONFIG_NAME",
    "GENERATION_CONFIG_NAME",
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "STAGING_PREFIX",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "atomic_save",
    "check_checkpoint_files",
    "load_state_dict",
]
