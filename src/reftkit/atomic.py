"""Atomic writes of folders and files, and recovery from a write that was killed half-way.

A folder `NAME` is written into a private temporary sibling `.NAME.tmp-PID-<random suffix>` and swapped in by renames, each
of which (`os.replace` on one file system) is atomic:

1. the finished temporary folder is renamed to `.NAME.new`: from here on a complete new copy has a known name;
2. the current `NAME`, if any, is renamed to `.NAME.old`;
3. `.NAME.new` is renamed to `NAME`;
4. `.NAME.old` is deleted.

Wherever a process is killed, a complete folder exists under a name `recover_folder` knows: before step 1 `NAME`
is untouched (the temporary folder is garbage and is deleted once its process is gone); between steps 1 and 3
`.NAME.new` is complete and newer, so recovery finishes the swap; after step 3 only the deletion of `.NAME.old`
is left. Every writer, and every reader of resumable state (training checkpoints), calls `recover_folder` first.

A failed write (disk full, no permission) raises `OutputError` naming the folder, and the previous contents stay
as they were. Safety is against a killed process, not a power cut (nothing is fsync'ed). One folder has one
writer at a time: concurrent writers to the same `NAME` are not supported.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import OutputError

log = logging.getLogger(__name__)


def _sibling(target: Path, role: str) -> Path:
    return target.with_name(f".{target.name}.{role}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def output_error(target: "str | os.PathLike", exc: OSError, doing: str = "write") -> OutputError:
    """An `OutputError` for an `OSError` met while writing `target`: what failed and how to fix it."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno == errno.ENOSPC:
        fix = "free some disk space or choose an output folder on another disk"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make the folder writable or choose another output folder"
    else:
        fix = "check the folder and the disk, or choose another output folder"
    kept = "; its previous contents are unchanged" if doing == "write" else ""
    return OutputError(f"could not {doing} {target}: {reason}{kept}; {fix}")


def _remove_stale_temporaries(target: Path) -> None:
    """Delete `.NAME.tmp-PID-*` siblings of `target` whose writing process PID is gone."""
    if not target.parent.is_dir():
        return
    prefix = f".{target.name}.tmp-"
    for tmp in target.parent.glob(f"{prefix}*"):
        pid = tmp.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(tmp)


def recover_folder(target: "str | os.PathLike") -> Path:
    """Finish or undo an interrupted `write_folder`/`replace_folder` of `target` (see the module docstring) and
    delete the temporary folders of writers that are no longer running. Returns `target`."""
    target = Path(target)
    new, old = _sibling(target, "new"), _sibling(target, "old")
    try:
        if new.is_dir():  # a complete copy, newer than `target`: finish its swap
            if target.exists():
                _remove(old)
                os.replace(target, old)
            os.replace(new, target)
            log.warning("completed an interrupted write of %s", target)
        elif not target.exists() and old.is_dir():  # never reached by the write order; a folder is still never lost
            os.replace(old, target)
            log.warning("restored %s from an interrupted write", target)
        if target.exists():
            _remove(old)
        _remove_stale_temporaries(target)
    except OSError as e:
        raise output_error(target, e, "recover") from e
    return target


def replace_folder(source: "str | os.PathLike", target: "str | os.PathLike") -> Path:
    """Move the complete folder `source` (a sibling of `target`, on the same file system) to `target`, replacing
    what was there by the renames of the module docstring."""
    source, target = Path(source), Path(target)
    new, old = _sibling(target, "new"), _sibling(target, "old")
    try:
        recover_folder(target)
        os.replace(source, new)
        if target.exists():
            os.replace(target, old)
        os.replace(new, target)
        _remove(old)
    except OSError as e:
        raise output_error(target, e) from e
    return target


def write_folder(target: "str | os.PathLike", texts: dict[str, str] | None = None,
                 tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write `texts` (name -> text) and `tensors` (name -> safetensors state dict) as the folder `target`.
    Files already in `target` that are not rewritten are kept (sub-folders of other adapters survive)."""
    from safetensors.torch import save_file

    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        recover_folder(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    except OSError as e:
        raise output_error(target, e) from e
    umask = os.umask(0)
    os.umask(umask)
    try:
        if target.is_dir():
            for item in target.iterdir():
                if item.name not in (texts or {}) and item.name not in (tensors or {}):
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        for name, text in (texts or {}).items():
            (tmp / name).write_text(text)
        for name, state in (tensors or {}).items():
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / name))
        # mkdtemp makes a private folder; give the result the permissions a plain mkdir/open would have
        os.chmod(tmp, 0o777 & ~umask)
        for item in tmp.iterdir():
            if item.is_file():
                os.chmod(item, 0o666 & ~umask)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise output_error(target, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace_folder(tmp, target)


def write_file(path: "str | os.PathLike", data: "str | bytes") -> Path:
    """Write one file atomically: into a temporary sibling, then renamed over `path`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
        tmp = Path(name)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise output_error(path, e) from e
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def check_writable(folder: "str | os.PathLike") -> Path:
    """Fail now, with an `OutputError` naming `folder`, if files cannot be written there: a path component is a
    file, a folder is read-only, the disk is full. Probes by creating (and removing) a small file; creates
    `folder` if it is missing."""
    folder = Path(folder)
    for part in (folder, *folder.parents):
        if part.exists() or part.is_symlink():
            if not part.is_dir():
                what = "the output folder" if part == folder else f"{part}, a folder above it,"
                raise OutputError(f"cannot write to {folder}: {what} is a file, not a folder; choose another "
                                  "output folder or move the file away")
            break
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".reftkit-probe-", dir=folder)
        tmp = Path(name)
        with os.fdopen(fd, "wb") as f:
            f.write(b"probe\n" * 512)
            f.flush()
            os.fsync(f.fileno())
        tmp.unlink()
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write to {folder}: {e.strerror or e}; make it writable, free disk space or "
                          "choose another output folder") from e
    return folder
