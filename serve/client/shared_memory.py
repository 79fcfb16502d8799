"""Send input tensors to a Triton server on the same machine through system shared memory
instead of the request body (what perf_analyzer's ``--shared-memory system`` does). The
client writes the pixels once into a POSIX shared-memory region that the server has
mapped; the request carries only the region's name, offset and size, so neither side
serializes, copies through the socket or parses ~600 KB per image.

Regions come from a bounded pool (``max_regions``, default 8): a request leases one for
its duration - waiting up to ``timeout`` seconds when all are busy - so a client shared
by many threads holds a fixed number of regions, not one per thread forever. A region
grows when a larger batch comes (up to ``max_bytes``). Regions are registered with the
server on creation and again after a server restart; ``close()`` unregisters and unlinks
them. Registration is a control-plane call: a server with restricted APIs wants the
admin key in ``headers``. Every failure is a :class:`~serve.core.errors.ClientError`.

Where the server keeps a private /dev/shm (``serve run``'s Triton lives in its own mount
namespace, so no other local user sees the python backend's IPC regions), ``shm_dir``
names that folder as this machine's owner reaches it (``/proc/<tritonserver>/root/dev/
shm``, found by :func:`serve.core.auth.shm_dir` from the file ``serve run`` writes): regions
are then files created there (mode 0600, ``mmap``), which Triton opens by the same key.
``shm_dir`` is a callable, asked again when a restarted server forgot a region (a new
namespace, a new folder). Otherwise regions are POSIX shared memory from tritonclient's
``tritonclient.utils.shared_memory``; no torch.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serve.backend.errors import UsageError
from serve.core.errors import ClientError


@dataclass
class Region:
    """One registered system shared-memory region."""

    name: str
    key: str
    size: int
    handle: Any
    path: Path | None = None  # a file region in a server's private /dev/shm


class FileRegion:
    """A region as a file in a server's private /dev/shm (mode 0600), mapped here."""

    def __init__(self, path: Path, size: int) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.path = path

    def write(self, array: np.ndarray) -> None:
        view = np.frombuffer(self.map, dtype=np.uint8, count=array.nbytes)
        view[:] = array.reshape(-1).view(np.uint8)

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.map.close()
        self.path.unlink(missing_ok=True)


class SharedMemoryPool:
    """At most ``max_regions`` input regions of one client (gRPC or HTTP)."""

    def __init__(
        self,
        client: Any,
        *,
        max_regions: int = 8,
        min_bytes: int = 1 << 20,
        max_bytes: int = 256 << 20,
        timeout: float = 30.0,
        call_kwargs: dict[str, Any] | None = None,
        shm_dir: Callable[[], str | None] | None = None,
        replicas: Callable[[], list[str]] | None = None,
    ) -> None:
        if max_regions < 1:
            raise UsageError("max_regions must be >= 1")
        self.client = client
        self.max_regions, self.min_bytes, self.max_bytes = max_regions, min_bytes, max_bytes
        self.timeout = timeout
        self.call_kwargs = dict(call_kwargs or {})  # headers=..., client_timeout=...
        self.shm_dir = shm_dir or (lambda: None)
        # the local replicas behind a front (each must know a region: the owner's
        # requests naming it go to any of them); [] for a single server
        self.replicas = replicas or (lambda: [])
        self._cond = threading.Condition()
        self._free: list[Region] = []
        self._count = 0  # regions that exist or are being created (<= max_regions)
        self._closed = False

    @property
    def size(self) -> int:
        """Regions that exist now (free + leased)."""
        with self._cond:
            return self._count

    def _create(self, nbytes: int) -> Region:
        import tritonclient.utils.shared_memory as shm

        # The registered name is a secret capability: an inference request may name any
        # registered region as its input or output, so a name another client could guess
        # (the /dev/shm key is visible to every local user) would let it read or
        # overwrite this client's tensors. The key (the /dev/shm file, mode 0600) differs.
        name = f"trainserve_{secrets.token_hex(16)}"
        key = f"/trainserve_{os.getpid()}_{uuid.uuid4().hex[:12]}"
        size = max(nbytes, self.min_bytes)
        folder = self.shm_dir()
        try:
            if folder:
                path = Path(folder) / key.lstrip("/")
                region = Region(name, key, size, FileRegion(path, size), path)
            else:
                handle = shm.create_shared_memory_region(name, key, size, create_only=True)
                region = Region(name, key, size, handle)
        except Exception as e:  # noqa: BLE001
            raise ClientError(f"cannot create shared-memory region {key}: {e}") from e
        try:
            self._register(region)
        except ClientError:
            self._free_memory(region)
            raise
        return region

    @staticmethod
    def _free_memory(region: Region) -> None:
        import tritonclient.utils.shared_memory as shm

        if isinstance(region.handle, FileRegion):
            region.handle.destroy()
            return
        with contextlib.suppress(Exception):
            shm.destroy_shared_memory_region(region.handle)

    def _each_replica(self) -> list[dict[str, Any]]:
        """The call kwargs for each local replica (one replica header each), or as they
        are for a single server."""
        names = self.replicas()
        if not names:
            return [self.call_kwargs]
        base = dict(self.call_kwargs.get("headers") or {})
        return [{**self.call_kwargs, "headers": {**base, "trainserve-replica": n}} for n in names]

    def _register(self, region: Region) -> None:
        try:
            for kwargs in self._each_replica():
                self.client.register_system_shared_memory(
                    region.name, region.key, region.size, **kwargs
                )
        except Exception as e:  # noqa: BLE001
            why = e.message() if hasattr(e, "message") and callable(e.message) else str(e)
            raise ClientError(
                f"the server refused shared-memory region {region.key}: {why} (it must run "
                "on this machine, share /dev/shm, and get the admin key if its "
                "shared-memory API is restricted)"
            ) from e

    def _destroy(self, region: Region) -> None:

        for kwargs in self._each_replica():
            with contextlib.suppress(Exception):
                self.client.unregister_system_shared_memory(region.name, **kwargs)
        self._free_memory(region)

    def _acquire(self, nbytes: int) -> Region | None:
        """A free region (the smallest that fits, else any), or None when a new one may be
        created; waits while all ``max_regions`` are leased."""
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while True:
                if self._closed:
                    raise ClientError("the shared-memory pool is closed")
                if self._free:
                    fitting = sorted(
                        (r for r in self._free if r.size >= nbytes), key=lambda r: r.size
                    )
                    region = fitting[0] if fitting else self._free[0]
                    self._free.remove(region)
                    return region
                if self._count < self.max_regions:
                    self._count += 1
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ClientError(
                        f"no shared-memory region free within {self.timeout:.0f} s "
                        f"({self.max_regions} in use)"
                    )
                self._cond.wait(left)

    def _release(self, region: Region | None) -> None:
        with self._cond:
            keep = region is not None and not self._closed
            if keep and region is not None:
                self._free.append(region)
            else:
                self._count -= 1
            self._cond.notify()
        if region is not None and not keep:
            self._destroy(region)

    @contextlib.contextmanager
    def lease(self, nbytes: int) -> Iterator[Region]:
        """A registered region of at least ``nbytes``, leased for the ``with`` block."""
        if nbytes > self.max_bytes:
            raise ClientError(
                f"{nbytes} bytes is over the shared-memory limit of {self.max_bytes} per request"
            )
        region = self._acquire(nbytes)
        try:
            if region is not None and region.size < nbytes:  # grow: replace it
                old, region = region, None
                self._destroy(old)
            if region is None:
                region = self._create(nbytes)
            yield region
        finally:
            self._release(region)

    def attach(self, inp: Any, array: np.ndarray, region: Region) -> None:
        """Write ``array`` into ``region`` and point the input ``inp`` at it."""
        import tritonclient.utils.shared_memory as shm

        array = np.ascontiguousarray(array)
        try:
            if isinstance(region.handle, FileRegion):
                region.handle.write(array)
            else:
                shm.set_shared_memory_region(region.handle, [array])
        except Exception as e:  # noqa: BLE001
            raise ClientError(f"cannot write shared-memory region {region.key}: {e}") from e
        inp.set_shared_memory(region.name, array.nbytes)

    def reregister(self, region: Region) -> Region:
        """Tell the server about ``region`` again (after a server restart); a file region
        whose folder went with the old server is made anew where the server is now.
        Returns the region to use (the same one, or its replacement)."""
        for kwargs in self._each_replica():
            with contextlib.suppress(Exception):
                self.client.unregister_system_shared_memory(region.name, **kwargs)
        if region.path is not None and (
            not region.path.exists() or str(region.path.parent) != self.shm_dir()
        ):
            self._free_memory(region)
            new = self._create(region.size)
            region.name, region.key, region.handle, region.path = (
                new.name,
                new.key,
                new.handle,
                new.path,
            )
            return region
        self._register(region)
        return region

    def close(self) -> None:
        """Unregister and unlink every region (leased ones when their lease ends)."""
        with self._cond:
            self._closed = True
            free, self._free = self._free, []
            self._count -= len(free)
            self._cond.notify_all()
        for region in free:
            self._destroy(region)


def is_unknown_region(message: str) -> bool:
    """True when the server does not know the region a request named."""
    text = message.lower()
    return "shared memory" in text and ("unable to find" in text or "not registered" in text)
