"""Every image the server decodes is decoded apart, under a deadline and a memory cap.

:func:`preprocess_bounded` is what the server does with the encoded images of one
request: it reads each one's structure first (serve/backend/image_scan.py: the served
formats by their first bytes, the size, the estimated decode work, with the slow-per-byte
decoders counted), refuses what is over the limits - per image, and the request's
total - before any decoder runs, then decodes each image out of process:

- a cheap one (estimated work up to ``max_fast_work``) in this instance's
  :class:`DecodeWorker`, a forked process reused from image to image, with a deadline
  scaled to its estimate (a misestimated image is stopped early, the worker killed and
  forked again) and an address-space cap;
- an expensive one in a forked child at low priority (:func:`decode_isolated`), killed at
  ``decode_deadline_s``, and only in one of a few :class:`SlowLane` slots shared by all of
  a model's instances, so expensive images never occupy every instance: when the lane is
  full the next one is refused at once as "server busy" and the normal images go on.

No decoder's time or memory stays in the caller's process.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import gc
import math
import os
import resource
import select
import signal
import stat
import struct
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from . import image_scan as scanning
from . import preprocess as pre

# Decode speed used to turn an estimate into a deadline (pixel-passes per second;
# docs/benchmarks.md "Where the code's constants come from"), and the margin over it.
DECODE_RATE = 40_000_000
DEADLINE_MARGIN = 8.0
MIN_DEADLINE_S = 0.25  # the shortest deadline of a cheap image
# A cheap image's deadline is the worker's CPU time (a busy machine slows a decode, it
# does not make it more work); its wall-clock time is bounded at this many times that.
WALL_SLACK = 20.0
POLL_S = 0.02  # how often a decode's CPU time is read


def _die_with_parent() -> None:
    """Linux: SIGKILL this (forked) process when the process that forked it dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _cap_memory(cap_bytes: int) -> None:
    """Cap this process's address space at what it uses now plus ``cap_bytes`` (the soft
    limit, set again before each decode): a decode that needs more fails with MemoryError
    (reported as an ImageError). The cyclic garbage collector is off in a decoder: garbage
    inherited from the forking process, freed mid-decode, would widen the cap."""
    gc.disable()
    with contextlib.suppress(OSError, ValueError):
        status = Path("/proc/self/status").read_text()
        vm = int(status.split("VmSize:")[1].split()[0]) * 1024
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        soft = vm + cap_bytes if hard == resource.RLIM_INFINITY else min(vm + cap_bytes, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _private_bytes(pid: int) -> int:
    """Memory only ``pid`` holds (Private_Clean + Private_Dirty of smaps_rollup): what a
    forked decoder allocates or copies on write, which its resident size misses when it
    reuses pages inherited from its parent; its resident size where the kernel lacks
    smaps_rollup."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return _rss_bytes(pid)
    total = 0
    for line in text.splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1]) * 1024
    return total


def _rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of ``pid`` (this process by default; 0 if it is gone)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return 0


def _decode_payload(data: bytes, geometry: pre.ResizeCrop, limits: pre.Limits) -> bytes:
    """In a decoder process: b"K" + float32 pixels, or b"E" + the reason."""
    try:
        pixels = pre.preprocess(data, geometry, limits=limits)
        return b"K" + np.ascontiguousarray(pixels, np.float32).tobytes()
    except pre.ImageError as e:
        return b"E" + str(e).encode()
    except MemoryError:
        cap = limits.decode_memory_bytes >> 20
        return b"E" + f"{pre.describe(data)}: needs more than the {cap} MiB decode cap".encode()
    except BaseException as e:  # noqa: BLE001 - whatever failed, say it
        return b"E" + f"{pre.describe(data)}: cannot decode ({pre._reason(e)})".encode()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _read_until(
    fd: int, n: int, end: float, over: Callable[[], bool] | None = None
) -> bytes | None:
    """``n`` bytes from ``fd`` before the monotonic time ``end`` and while ``over()`` is
    false (checked every ``POLL_S``); None at either deadline, EOFError if the writer is
    gone."""
    chunks, left = [], n
    while left:
        wait = end - time.monotonic()
        if wait <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], wait if over is None else min(wait, POLL_S))
        if not ready:
            if over is not None and over():
                return None
            continue
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _kill(pid: int) -> int:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def _answer(payload: bytes, geometry: pre.ResizeCrop, name: str, why: str) -> np.ndarray:
    if payload[:1] == b"E":
        raise pre.ImageError(payload[1:].decode(errors="replace"))
    if payload[:1] != b"K" or len(payload) != 1 + 3 * geometry.crop * geometry.crop * 4:
        raise pre.ImageError(f"{name}: the decoder stopped ({why}: out of memory or time?)")
    return np.frombuffer(payload, np.float32, offset=1).reshape(3, geometry.crop, geometry.crop)


class DecodeWorker:
    """A forked decoder process, reused from image to image by one model instance: each
    decode under a deadline (past it the worker is killed and the next decode forks a new
    one) and the worker's address space capped at ``limits.decode_memory_bytes`` over its
    start; a worker that has grown past that cap in resident memory exits after its
    answer (a decoder's peak never stays)."""

    def __init__(self, geometry: pre.ResizeCrop, limits: pre.Limits) -> None:
        self.geometry, self.limits = geometry, limits
        self.pid = 0
        self._to = self._from = -1
        self.forks = 0  # how many workers this has started (a killed one is replaced)

    def _start(self) -> None:
        down_r, down_w = os.pipe()
        up_r, up_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker: only this thread exists here; never return
            try:
                os.close(down_w)
                os.close(up_r)
                _die_with_parent()
                self._serve(down_r, up_w)
            finally:
                os._exit(0)
        os.close(down_r)
        os.close(up_w)
        self.pid, self._to, self._from = pid, down_w, up_r
        self.forks += 1

    def _serve(self, read_fd: int, write_fd: int) -> None:
        """The worker's loop: a length-prefixed image in, a length-prefixed answer out."""
        start_rss = _rss_bytes()
        while True:
            try:
                (n,) = struct.unpack("<Q", _read_exact(read_fd, 8))
                data = _read_exact(read_fd, n)
            except EOFError:
                return
            _cap_memory(self.limits.decode_memory_bytes)
            payload = _decode_payload(data, self.geometry, self.limits)
            _write_all(write_fd, struct.pack("<Q", len(payload)) + payload)
            if _rss_bytes() - start_rss > self.limits.decode_memory_bytes:
                return  # grown: the next decode gets a fresh worker

    def decode(
        self, data: bytes, deadline_s: float, name: str, wall_s: float | None = None
    ) -> np.ndarray:
        """The pixels of ``data``, or :class:`ImageError` (the decoder's reason, its memory
        cap, or a deadline passed: the worker is killed). ``deadline_s`` is the worker's
        CPU time for this image; ``wall_s`` (default ``WALL_SLACK`` x that) its time."""
        wall = deadline_s * WALL_SLACK if wall_s is None else min(wall_s, deadline_s * WALL_SLACK)
        for attempt in (1, 2):  # a worker that exited since (grown, killed) is replaced
            if not self.pid:
                self._start()
            pid, cpu0, mem0 = self.pid, _cpu_s(self.pid), _private_bytes(self.pid)
            grown: list[int] = []

            # The address-space cap (set in the worker) misses what the worker reuses of
            # the free heap it inherited from a large parent; the memory it makes its own
            # is watched here too.
            def over(
                pid: int = pid, cpu0: float = cpu0, mem0: int = mem0, grown: list = grown
            ) -> bool:
                if _private_bytes(pid) - mem0 > self.limits.decode_memory_bytes:
                    grown.append(1)
                    return True
                return _cpu_s(pid) - cpu0 > deadline_s

            try:
                _write_all(self._to, struct.pack("<Q", len(data)) + data)
                end = time.monotonic() + wall
                head = _read_until(self._from, 8, end, over)
                payload = (
                    None
                    if head is None
                    else _read_until(self._from, struct.unpack("<Q", head)[0], end, over)
                )
            except (EOFError, BrokenPipeError):
                status = self.close()
                if attempt == 1:
                    continue
                why = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else "exited"
                raise pre.ImageError(f"{name}: the decoder stopped ({why})") from None
            if payload is None:
                cpu = _cpu_s(pid) - cpu0
                self.close()
                if grown:
                    cap = self.limits.decode_memory_bytes >> 20
                    raise pre.ImageError(f"{name}: needs more than the {cap} MiB decode memory cap")
                if cpu > deadline_s:
                    raise pre.ImageError(
                        f"{name}: decoding took more than {deadline_s:.2g} s of CPU time, far "
                        "more than its size and format need (stopped)"
                    )
                raise pre.ImageError(
                    f"{name}: decoding took longer than {wall:.2g} s (the server is too busy "
                    "or the request's deadline came first; stopped)"
                )
            return _answer(payload, self.geometry, name, "no result")
        raise AssertionError("unreachable")

    def close(self) -> int:
        """Stop the worker (if any); its exit status."""
        if not self.pid:
            return 0
        for fd in (self._to, self._from):
            with contextlib.suppress(OSError):
                os.close(fd)
        pid, self.pid = self.pid, 0
        return _kill(pid)


def decode_isolated(
    data: bytes,
    geometry: pre.ResizeCrop,
    limits: pre.Limits = pre.DEFAULT_LIMITS,
    info: scanning.Scan | None = None,
) -> np.ndarray:
    """:func:`preprocess` in a forked child (at nice ``DECODE_NICE``, its address space
    capped), killed after ``limits.decode_deadline_s``: the caller gets the pixels or an
    :class:`ImageError` (the child's, or the deadline's), and no memory the decoder
    touched stays in the caller's process."""
    name = pre.describe(data) if info is None else f"{pre.describe(data)} ({info})"
    deadline = limits.decode_deadline_s
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only this thread exists here; never return into the caller
        try:
            os.close(read_fd)
            _die_with_parent()
            with contextlib.suppress(OSError):
                os.nice(pre.DECODE_NICE)
            signal.alarm(max(1, math.ceil(deadline) + 1))  # its own deadline too
            _cap_memory(limits.decode_memory_bytes)
            _write_all(write_fd, _decode_payload(data, geometry, limits))
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
        status = _kill(pid) if timed_out else os.waitpid(pid, 0)[1]
    if timed_out:
        raise pre.ImageError(
            f"{name}: decoding took longer than the {deadline:g} s deadline (stopped)"
        )
    why = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else "no result"
    return _answer(b"".join(chunks), geometry, name, why)


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


def fast_deadline(work: int, limits: pre.Limits) -> float:
    """The deadline of a cheap image: its estimated work at ``DECODE_RATE``, times
    ``DEADLINE_MARGIN``, at least ``MIN_DEADLINE_S``, at most the slow lane's."""
    return min(limits.decode_deadline_s, max(MIN_DEADLINE_S, DEADLINE_MARGIN * work / DECODE_RATE))


def scan_all(items: Sequence[bytes], limits: pre.Limits) -> list[scanning.Scan]:
    """Every item's structure (ImageError ``item k: ...`` for the first bad one), then the
    request's total work against ``limits.max_request_work``."""
    scans = []
    for i, data in enumerate(items):
        try:
            scans.append(pre.inspect(data, limits))
        except pre.ImageError as e:
            raise pre.ImageError(f"item {i}: {e}") from e
    total = sum(s.work for s in scans)
    if total > limits.max_request_work:
        raise pre.ImageError(
            f"the request's {len(items)} images would take {total / 1e6:.0f} M pixel-passes "
            f"to decode, over the {limits.max_request_work / 1e6:.0f} M a request may "
            "(send fewer or smaller images per request)"
        )
    return scans


def preprocess_bounded(
    data: bytes,
    geometry: pre.ResizeCrop,
    limits: pre.Limits,
    lane: SlowLane | None,
    worker: DecodeWorker | None = None,
    info: scanning.Scan | None = None,
    budget_s: float | None = None,
) -> np.ndarray:
    """What the server does with one encoded image: its structure read and checked
    (``info``, if the caller did), then decoded out of process - a cheap one in
    ``worker`` (a fresh one if None) under a deadline scaled to its estimate, an
    expensive one in a :class:`SlowLane` slot by :func:`decode_isolated` (no lane:
    isolated, without the cross-process bound). ``budget_s``: what is left of the
    request's own deadline (the image's deadline is never longer)."""
    info = info or pre.inspect(data, limits)
    name = f"{pre.describe(data)} ({info})"
    if info.work <= limits.max_fast_work:
        deadline = fast_deadline(info.work, limits)
        wall = None if budget_s is None else max(0.01, budget_s)
        own = worker is None
        worker = worker or DecodeWorker(geometry, limits)
        try:
            return worker.decode(data, deadline, name, wall)
        finally:
            if own:
                worker.close()
    if lane is None:
        return decode_isolated(data, geometry, limits, info)
    with lane.slot(f"a {info} image ({info.work / 1e6:.0f} M pixel-passes)"):
        return decode_isolated(data, geometry, limits, info)


def preprocess_request(
    items: Sequence[bytes],
    geometry: pre.ResizeCrop,
    limits: pre.Limits,
    lane: SlowLane | None,
    worker: DecodeWorker | None,
    cancelled: Callable[[], bool] = lambda: False,
) -> np.ndarray:
    """A request's images -> pixels [n, 3, crop, crop]: all of them checked first (the
    request's total work bounded), then decoded one by one within
    ``limits.request_deadline_s`` in all; a request whose client has gone (``cancelled``)
    or whose deadline passed stops being decoded. ImageError ``item k: ...`` names the
    first bad item; DecodeBusy when the slow lane is full."""
    scans = scan_all(items, limits)
    end = time.monotonic() + limits.request_deadline_s
    out = []
    for i, (data, info) in enumerate(zip(items, scans, strict=True)):
        left = end - time.monotonic()
        if cancelled():
            raise pre.ImageError(f"item {i}: the client cancelled the request (not decoded)")
        if left <= 0:
            raise pre.ImageError(
                f"item {i}: the request's {limits.request_deadline_s:g} s decode deadline "
                "passed (send fewer or smaller images per request)"
            )
        try:
            out.append(preprocess_bounded(data, geometry, limits, lane, worker, info, left))
        except pre.DecodeBusy:
            raise
        except pre.ImageError as e:
            raise pre.ImageError(f"item {i}: {e}") from e
    return np.stack(out)
