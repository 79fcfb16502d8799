"""Expensive images decoded apart: :func:`decode_isolated` runs :func:`preprocess` in a
forked child at low priority that is killed at its deadline (the decoder's memory goes
with it), :class:`SlowLane` lets only a few such decodes run at once across a model's
instances, and :func:`preprocess_bounded` is what the server does with one encoded
image (cheap ones in place, expensive ones through the lane).

Copied, like serve/core/preprocess.py (``image_preprocess.py``), into each Triton
preprocess model as ``image_isolated_decode.py``, where no ``serve`` package exists: there
it imports its sibling copy.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import math
import os
import select
import signal
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

if __package__:  # serve.core.isolated_decode
    import serve.core.preprocess as pre
else:  # image_isolated_decode.py beside image_preprocess.py in a Triton preprocess model
    import image_preprocess as pre  # type: ignore[no-redef]


def _die_with_parent() -> None:
    """Linux: SIGKILL this (forked) process when the process that forked it dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _decode_child(write_fd: int, data: bytes, geometry: pre.ResizeCrop, limits: pre.Limits) -> None:
    """In the forked child: decode, send b"K" + float32 pixels or b"E" + the reason."""
    try:
        pixels = pre.preprocess(data, geometry, limits=limits)
        payload = b"K" + np.ascontiguousarray(pixels, np.float32).tobytes()
    except pre.ImageError as e:
        payload = b"E" + str(e).encode()
    except BaseException as e:  # noqa: BLE001 - whatever failed, say it
        payload = b"E" + f"{pre.describe(data)}: cannot decode ({pre._reason(e)})".encode()
    view = memoryview(payload)
    while view:
        view = view[os.write(write_fd, view) :]


def decode_isolated(
    data: bytes,
    geometry: pre.ResizeCrop,
    limits: pre.Limits = pre.DEFAULT_LIMITS,
    info: pre.ImageInfo | None = None,
) -> np.ndarray:
    """:func:`preprocess` in a forked child (at nice ``DECODE_NICE``), killed after
    ``limits.decode_deadline_s``: the caller gets the pixels or an :class:`ImageError`
    (the child's, or the deadline's), and no memory the decoder touched stays in the
    caller's process."""
    name = pre.describe(data) if info is None else f"{pre.describe(data)} ({info})"
    deadline = limits.decode_deadline_s
    expected = 1 + 3 * geometry.crop * geometry.crop * 4
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only this thread exists here; never return into the caller
        try:
            os.close(read_fd)
            _die_with_parent()
            with contextlib.suppress(OSError):
                os.nice(pre.DECODE_NICE)
            signal.alarm(max(1, math.ceil(deadline) + 1))  # its own deadline too
            _decode_child(write_fd, data, geometry, limits)
        finally:
            os._exit(0)
    os.close(write_fd)
    chunks: list[bytes] = []
    end = time.monotonic() + deadline
    timed_out = False
    try:
        while True:
            left = end - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([read_fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(read_fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        if timed_out:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    if timed_out:
        raise pre.ImageError(
            f"{name}: decoding took longer than the {deadline:g} s deadline (stopped)"
        )
    payload = b"".join(chunks)
    if payload[:1] == b"E":
        raise pre.ImageError(payload[1:].decode(errors="replace"))
    if payload[:1] != b"K" or len(payload) != expected:
        why = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else "no result"
        raise pre.ImageError(f"{name}: the decoder stopped ({why}: out of memory or time?)")
    return np.frombuffer(payload, np.float32, offset=1).reshape(3, geometry.crop, geometry.crop)


class SlowLane:
    """``slots`` places for expensive decodes, shared by every process that opens the
    same ``directory`` (the instances of one model): ``flock`` on one file per slot, so a
    slot held by a process that dies is free again. ``directory`` must be the caller's
    own (0700): another user who could hold the files could close the lane."""

    def __init__(self, directory: str | Path, slots: int = pre.SLOW_LANE_SLOTS) -> None:
        if slots < 1:
            raise pre.UsageError(f"slow lane slots must be >= 1, got {slots}")
        self.directory = Path(directory)
        self.slots = slots
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(self.directory)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise PermissionError(
                f"{self.directory} is not a private folder of this user (0700): refusing "
                "to share its lock files"
            )

    @classmethod
    def for_model(cls, model: str, slots: int = pre.SLOW_LANE_SLOTS) -> SlowLane:
        """The lane of ``model`` in ``$TRAINSERVE_RUNTIME_DIR`` (``serve run`` sets its own
        0700 folder), else in a per-user folder under /dev/shm (or the temporary folder)."""
        shared = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        base = os.environ.get("TRAINSERVE_RUNTIME_DIR") or os.path.join(
            shared, f"trainserve-{os.getuid()}"
        )
        return cls(Path(base) / "slow-lane" / model, slots)

    @contextlib.contextmanager
    def slot(self, what: str = "an expensive image") -> Iterator[int]:
        """Hold a free slot for the block, or raise :class:`DecodeBusy` at once."""
        for i in range(self.slots):
            fd = os.open(self.directory / f"slot-{i}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                yield i
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            return
        raise pre.DecodeBusy(
            f"server busy: {what} needs the slow-image lane ({self.slots} at a time, shared "
            "by the model's instances) and it is full; retry later"
        )


def preprocess_bounded(
    data: bytes, geometry: pre.ResizeCrop, limits: pre.Limits, lane: SlowLane | None
) -> np.ndarray:
    """What the server does with one encoded image: cheap ones (``ImageInfo.work`` up to
    ``limits.max_fast_work``) decoded here; expensive ones in a :class:`SlowLane` slot by
    :func:`decode_isolated` (no lane: isolated, without the cross-process bound)."""
    info = pre.inspect(data, limits)
    if info.work <= limits.max_fast_work:
        return pre.resize_crop(
            pre.load_image(data, limits=limits), geometry, limits, pre.describe(data)
        )
    if lane is None:
        return decode_isolated(data, geometry, limits, info)
    with lane.slot(f"a {info} image ({info.work / 1e6:.0f} M pixel-passes)"):
        return decode_isolated(data, geometry, limits, info)
