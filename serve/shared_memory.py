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
admin key in ``headers``. Every failure is a :class:`~serve.errors.ClientError`.
Uses tritonclient's ``tritonclient.utils.shared_memory``; no torch.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from serve.errors import ClientError


@dataclass
class Region:
    """One registered system shared-memory region."""

    name: str
    key: str
    size: int
    handle: Any


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
    ) -> None:
        if max_regions < 1:
            raise ValueError("max_regions must be >= 1")
        self.client = client
        self.max_regions, self.min_bytes, self.max_bytes = max_regions, min_bytes, max_bytes
        self.timeout = timeout
        self.call_kwargs = dict(call_kwargs or {})  # headers=..., client_timeout=...
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

        name = f"trainserve_{os.getpid()}_{uuid.uuid4().hex[:12]}"
        size = max(nbytes, self.min_bytes)
        try:
            handle = shm.create_shared_memory_region(name, f"/{name}", size, create_only=True)
        except Exception as e:  # noqa: BLE001
            raise ClientError(f"cannot create shared-memory region {name}: {e}") from e
        region = Region(name, f"/{name}", size, handle)
        try:
            self._register(region)
        except ClientError:
            with contextlib.suppress(Exception):
                shm.destroy_shared_memory_region(handle)
            raise
        return region

    def _register(self, region: Region) -> None:
        try:
            self.client.register_system_shared_memory(
                region.name, region.key, region.size, **self.call_kwargs
            )
        except Exception as e:  # noqa: BLE001
            why = e.message() if hasattr(e, "message") and callable(e.message) else str(e)
            raise ClientError(
                f"the server refused shared-memory region {region.name}: {why} (it must run "
                "on this machine, share /dev/shm, and get the admin key if its "
                "shared-memory API is restricted)"
            ) from e

    def _destroy(self, region: Region) -> None:
        import tritonclient.utils.shared_memory as shm

        with contextlib.suppress(Exception):
            self.client.unregister_system_shared_memory(region.name, **self.call_kwargs)
        with contextlib.suppress(Exception):
            shm.destroy_shared_memory_region(region.handle)

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
            if keep:
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
            shm.set_shared_memory_region(region.handle, [array])
        except Exception as e:  # noqa: BLE001
            raise ClientError(f"cannot write shared-memory region {region.name}: {e}") from e
        inp.set_shared_memory(region.name, array.nbytes)

    def reregister(self, region: Region) -> None:
        """Tell the server about ``region`` again (after a server restart)."""
        with contextlib.suppress(Exception):
            self.client.unregister_system_shared_memory(region.name, **self.call_kwargs)
        self._register(region)

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
