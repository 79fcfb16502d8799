"""Send input tensors to a Triton server on the same machine through system shared
memory instead of the request body (what perf_analyzer's ``--shared-memory system``
does). The client writes the pixels once into a POSIX shared-memory region that the
server has mapped; the request carries only the region's name, offset and size, so
neither side serializes, copies through the socket or parses ~600 KB per image.

Each client thread gets its own region (grown when a larger batch comes), so one
:class:`~serve.client.Classifier` may be shared by threads. Regions are registered with
the server on first use and again after a server restart; ``close()`` unregisters and
unlinks them (Python's resource tracker unlinks what a crashed process leaves behind).
Uses tritonclient's ``tritonclient.utils.shared_memory``; no torch.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Region:
    """One registered system shared-memory region."""

    name: str
    key: str
    size: int
    handle: Any


class SharedMemoryInputs:
    """Per-thread input regions of one client (gRPC or HTTP ``InferenceServerClient``)."""

    def __init__(self, client: Any, min_bytes: int = 1 << 20) -> None:
        self.client = client
        self.min_bytes = min_bytes
        self._local = threading.local()
        self._lock = threading.Lock()
        self._regions: list[Region] = []

    def _create(self, nbytes: int) -> Region:
        import tritonclient.utils.shared_memory as shm

        name = f"trainserve_{os.getpid()}_{uuid.uuid4().hex[:12]}"
        size = max(nbytes, self.min_bytes)
        handle = shm.create_shared_memory_region(name, f"/{name}", size, create_only=True)
        region = Region(name, f"/{name}", size, handle)
        try:
            self.client.register_system_shared_memory(name, region.key, size)
        except Exception:
            shm.destroy_shared_memory_region(handle)
            raise
        with self._lock:
            self._regions.append(region)
        return region

    def _release(self, region: Region) -> None:
        import tritonclient.utils.shared_memory as shm

        with contextlib.suppress(Exception):
            self.client.unregister_system_shared_memory(region.name)
        with contextlib.suppress(Exception):
            shm.destroy_shared_memory_region(region.handle)
        with self._lock:
            if region in self._regions:
                self._regions.remove(region)

    def attach(self, inp: Any, array: np.ndarray) -> None:
        """Write ``array`` into this thread's region and point ``inp`` at it."""
        import tritonclient.utils.shared_memory as shm

        array = np.ascontiguousarray(array)
        region: Region | None = getattr(self._local, "region", None)
        if region is None or region.size < array.nbytes:
            if region is not None:
                self._release(region)
            region = self._local.region = self._create(array.nbytes)
        shm.set_shared_memory_region(region.handle, [array])
        inp.set_shared_memory(region.name, array.nbytes)

    def reregister(self) -> None:
        """Tell the server about this thread's region again (after a server restart)."""
        region: Region | None = getattr(self._local, "region", None)
        if region is None:
            return
        with contextlib.suppress(Exception):
            self.client.unregister_system_shared_memory(region.name)
        self.client.register_system_shared_memory(region.name, region.key, region.size)

    def close(self) -> None:
        """Unregister and unlink every region this object made."""
        with self._lock:
            regions = list(self._regions)
        for region in regions:
            self._release(region)
        self._local = threading.local()


def is_unknown_region(message: str) -> bool:
    """True when the server does not know the region a request named."""
    text = message.lower()
    return "shared memory" in text and ("unable to find" in text or "not registered" in text)
