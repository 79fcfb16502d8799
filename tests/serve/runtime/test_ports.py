"""Ports for the servers we start: free, distinct, and out of the kernel's own range."""

from __future__ import annotations

import socket

from serve.runtime.handle import _ephemeral_range, free_port


def test_free_ports_are_distinct_bindable_and_not_ephemeral():
    """A port from ``free_port`` must not be one the kernel can give an outgoing
    connection or a ``bind(0)`` meanwhile, and two calls never return the same one."""
    low, high = _ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert not any(low <= p <= high for p in ports)
    for p in ports[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_a_port_in_use_is_skipped(monkeypatch):
    """A port another process listens on is checked by binding and passed over."""
    from serve.runtime import handle

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        spare = next(p for p in range(12000, 13000) if handle._bindable("127.0.0.1", p))
        picks = iter([taken, spare])
        monkeypatch.setattr(handle._rng, "randrange", lambda a, b: next(picks))
        monkeypatch.setattr(handle, "_ephemeral_range", lambda: (32768, 60999))
        assert free_port() == spare
