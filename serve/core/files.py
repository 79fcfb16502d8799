"""Files every stage writes the same way (torch-free): atomic writes, staged folders that
appear in one rename, hashes, version folders, and a per-model publishing lock.

A reader (Triton polling the repository, a user, the next stage) never sees half a file
or half a version: data goes to a temp name beside the target, is fsynced, renamed over
the target, and the directory is fsynced so the rename survives a crash. Any OSError (a
full disk, a read-only folder) surfaces as :class:`WriteError` naming the path, with the
temp files removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from serve.backend.errors import UserError

TEMP_MARK = ".tmp"
STAGING_PREFIX = ".staging-"


class WriteError(UserError, OSError):
    """Writing ``path`` failed (disk full, permissions...); nothing half-written remains."""


def fsync_dir(path: Path) -> None:
    """Persist a rename/create inside ``path`` (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TEMP_MARK}")


def _describe(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return e.strerror or str(e)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(fileobj)`` on a temp file beside ``path``, fsync, rename over ``path``,
    fsync the directory. The temp file is created with the process umask (unlike mkstemp's
    0600), so the result is readable by a server running as another user."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(e.errno, f"cannot write {path}: {_describe(e)}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (with a final newline) atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def remove_stale_temp_files(folder: str | Path, older_than_s: float = 0.0) -> list[Path]:
    """Delete temp files that killed writers left in ``folder`` (``.<name>.<pid>.<id>.tmp``
    whose process is gone, or older than ``older_than_s`` when > 0). Returns what was
    removed."""
    removed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    now = time.time()
    for p in folder.iterdir():
        if not (p.name.startswith(".") and p.name.endswith(TEMP_MARK) and p.is_file()):
            continue
        parts = p.name.split(".")
        pid = int(parts[-3]) if len(parts) >= 4 and parts[-3].isdigit() else None
        alive = pid is not None and _pid_alive(pid)
        old = older_than_s > 0 and now - p.stat().st_mtime > older_than_s
        if not alive or old:
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions(model_dir: str | Path) -> list[int]:
    """Numeric version folders of a model directory, ascending (Triton's layout)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def latest_version(model_dir: str | Path) -> Path:
    """The newest numeric version folder; FileNotFoundError naming the model if none."""
    found = versions(model_dir)
    if not found:
        raise FileNotFoundError(
            f"no published version of {Path(model_dir).name} in "
            f"{Path(model_dir).parent} (run `make export`)"
        )
    return Path(model_dir) / str(found[-1])


@contextlib.contextmanager
def staged_dir(parent: str | Path) -> Iterator[Path]:
    """A hidden, non-numeric staging folder in ``parent`` (Triton ignores those); removed
    unless the caller renamed it away. Use :func:`publish_dir` to move it into place."""
    parent = Path(parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=parent))
    except OSError as e:
        raise WriteError(
            e.errno, f"cannot create a staging folder in {parent}: {_describe(e)}"
        ) from e
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def publish_dir(staging: Path, target: Path) -> Path:
    """fsync every file of ``staging``, make it world-readable, and rename it to ``target``
    (atomic; fails rather than replace an existing folder); fsync the parent."""
    try:
        for f in staging.rglob("*"):
            if f.is_file():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
        os.chmod(staging, 0o755)
        fsync_dir(staging)
        os.rename(staging, target)
        fsync_dir(target.parent)
    except OSError as e:
        raise WriteError(e.errno, f"cannot publish {target}: {_describe(e)}") from e
    return target


def copy_into(src: str | Path, dst: Path) -> None:
    """Copy a file into a staging folder, naming both paths if it fails."""
    try:
        shutil.copyfile(src, dst)
    except OSError as e:
        raise WriteError(e.errno, f"cannot copy {src} to {dst}: {_describe(e)}") from e


@contextlib.contextmanager
def locked(folder: str | Path, timeout: float = 600.0, what: str = "") -> Iterator[None]:
    """An exclusive advisory lock on ``folder`` (``flock`` on ``folder/.lock``): concurrent
    publishers of one model run one after the other. Waits up to ``timeout`` seconds."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / ".lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{folder} is locked by another {what or 'writer'} for more than "
                        f"{timeout:.0f} s ({lock_path})"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
