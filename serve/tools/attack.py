"""What a stranger without a key does to lock the others out, and what a normal client
sees meanwhile (torch-free; the tests' attackers and ``make bench``'s lockout figure).

Each attack comes from its own loopback addresses (``127.X.Y.Z`` are all local, and each
``X.Y`` is a network of its own for the front's per-network shares), so the front sees
other clients than the normal one at ``127.0.0.1``:

- :class:`SlowSenders`: inference requests whose headers and first part of the body come
  at once and the rest a byte at a time (HTTP/1.1 and HTTP/2 gRPC, small and large
  bodies), reopened as the front cuts them;
- :class:`SilentConnections`: sockets opened and left silent, reopened as they close;
- :class:`HostileImageClients`: closed-loop clients sending the images of
  serve/tools/hostile_images.py to the raw-image endpoint;
- :func:`normal_client`: one client's sequential requests with their latencies.
"""

from __future__ import annotations

import contextlib
import json
import resource
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from serve.core.names import IMAGE_INPUT, INPUT_NAME, image_model_name

H2_PREFACE_PATH = "/inference.GRPCInferenceService/ModelInfer"


def attacker_addresses(count: int, first_network: int = 1) -> list[str]:
    """``count`` loopback addresses, each in a network (/24) of its own and none in the
    normal client's 127.0.0.0/24."""
    nets = range(first_network, first_network + count)
    return [f"127.{1 + k // 250}.{1 + k % 250}.7" for k in nets]


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit; the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def _connect(source: str, url: str, timeout: float = 5.0) -> socket.socket:
    host, port = url.rsplit(":", 1)
    s = socket.socket()
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect((host, int(port)))
    return s


def http_infer_request(model: str, pixels: np.ndarray) -> bytes:
    """A binary-tensor HTTP inference request for ``pixels`` (headers and body)."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": INPUT_NAME,
                    "shape": list(pixels.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": pixels.nbytes},
                }
            ]
        }
    ).encode()
    body = header + np.ascontiguousarray(pixels, np.float32).tobytes()
    head = (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        f"Inference-Header-Content-Length: {len(header)}\r\n\r\n"
    ).encode()
    return head + body


def grpc_infer_message(model: str, pixels: np.ndarray) -> bytes:
    """A framed gRPC ModelInfer message for ``pixels`` (the 5-byte header and protobuf)."""
    from tritonclient.grpc import service_pb2

    req = service_pb2.ModelInferRequest(model_name=model)
    req.inputs.add(name=INPUT_NAME, datatype="FP32", shape=list(pixels.shape))
    req.raw_input_contents.append(np.ascontiguousarray(pixels, np.float32).tobytes())
    raw = req.SerializeToString()
    return b"\x00" + struct.pack(">I", len(raw)) + raw


@dataclass
class Dripped:
    """One slow request's end: what the front answered and when."""

    protocol: str
    sent: int
    total: int
    seconds: float
    answer: str  # "408", "grpc-status 4", "reset", "closed", ...


def drip_http(
    source: str, url: str, request: bytes, first: int, interval: float, limit: float
) -> Dripped:
    """Send the first ``first`` bytes of ``request`` at once, then a byte per
    ``interval`` until the front answers or closes (or ``limit`` s pass)."""
    started = time.monotonic()
    sent, answer = 0, "no answer"
    try:
        s = _connect(source, url)
    except OSError as e:
        return Dripped("http", 0, len(request), 0.0, f"refused ({e.strerror})")
    with s:
        try:
            s.sendall(request[:first])
            sent = first
            while time.monotonic() - started < limit:
                ready, _, _ = select.select([s], [], [], interval)
                if ready:
                    data = s.recv(4096)
                    answer = data[9:12].decode(errors="replace") if data else "closed"
                    break
                if sent < len(request):
                    s.send(request[sent : sent + 1])
                    sent += 1
        except OSError:
            answer = "reset"
    return Dripped("http", sent, len(request), time.monotonic() - started, answer)


def drip_grpc(
    source: str, url: str, message: bytes, first: int, interval: float, limit: float
) -> Dripped:
    """The same over HTTP/2 (a raw client: gRPC libraries send a message whole)."""
    import h2.config
    import h2.connection
    import h2.events

    started = time.monotonic()
    try:
        s = _connect(source, url)
    except OSError as e:
        return Dripped("grpc", 0, len(message), 0.0, f"refused ({e.strerror})")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.increment_flow_control_window(1 << 30)
    sid = conn.get_next_available_stream_id()
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", H2_PREFACE_PATH),
        (":authority", "x"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    conn.send_headers(sid, headers)
    state = {"pos": 0, "target": first}

    def send() -> None:
        while state["pos"] < state["target"]:
            room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            n = min(state["target"] - state["pos"], room)
            if n <= 0:
                break
            chunk = message[state["pos"] : state["pos"] + n]
            conn.send_data(sid, chunk, end_stream=state["pos"] + n == len(message))
            state["pos"] += n
        s.sendall(conn.data_to_send())

    answer = "no answer"
    with s:
        try:
            send()
            while answer == "no answer" and time.monotonic() - started < limit:
                ready, _, _ = select.select([s], [], [], interval)
                if not ready:
                    state["target"] = min(len(message), state["target"] + 1)
                    send()
                    continue
                data = s.recv(65536)
                if not data:
                    answer = "closed"
                    break
                for ev in conn.receive_data(data):
                    if answer != "no answer":  # the first word is the answer
                        break
                    if isinstance(ev, h2.events.StreamReset):
                        answer = "reset"
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        answer = "closed"
                    elif isinstance(ev, h2.events.ResponseReceived | h2.events.TrailersReceived):
                        got = {k.decode(): v.decode() for k, v in ev.headers}
                        if "grpc-status" in got:
                            answer = f"grpc-status {got['grpc-status']}"
                s.sendall(conn.data_to_send())
                send()
        except (OSError, h2.exceptions.ProtocolError):
            answer = "reset"
    return Dripped("grpc", state["pos"], len(message), time.monotonic() - started, answer)


@dataclass
class SlowSenders:
    """``per_address`` slow requests from each of ``addresses``, each reopened as the
    front ends it, until :meth:`stop`: alternately HTTP and gRPC, bodies of ``pixels``
    (held whole by the front) or, one in four, a batch too big to hold."""

    http_url: str
    grpc_url: str
    model: str
    pixels: np.ndarray
    addresses: list[str]
    per_address: int = 4
    interval: float = 1.0
    results: list[Dripped] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> SlowSenders:
        small = (
            http_infer_request(self.model, self.pixels),
            grpc_infer_message(self.model, self.pixels),
        )
        big = np.repeat(self.pixels, 3, axis=0)
        large = (http_infer_request(self.model, big), grpc_infer_message(self.model, big))
        n = 0
        for source in self.addresses:
            for _ in range(self.per_address):
                grpc = n % 2 == 1
                body = (large if n % 8 >= 6 else small)[grpc]
                t = threading.Thread(target=self._run, args=(source, grpc, body), daemon=True)
                self._threads.append(t)
                n += 1
        for t in self._threads:
            t.start()
        return self

    def _run(self, source: str, grpc: bool, body: bytes) -> None:
        while not self._stop.is_set():
            first = len(body) * 2 // 3
            if grpc:
                r = drip_grpc(source, self.grpc_url, body, first, self.interval, 600)
            else:
                r = drip_http(source, self.http_url, body, first, self.interval, 600)
            self.results.append(r)
            if r.seconds < 0.05:
                self._stop.wait(0.2)  # refused at once: do not spin

    def stop(self) -> list[Dripped]:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        return self.results


class SilentConnections:
    """Up to ``total`` sockets from ``addresses`` opened and left silent, those the front
    closed reopened every ``reopen_s``, until :meth:`stop`."""

    def __init__(self, url: str, addresses: list[str], total: int, reopen_s: float = 2.0) -> None:
        self.url, self.addresses, self.total, self.reopen_s = url, addresses, total, reopen_s
        self.opened = self.refused = 0
        self.held_max = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> SilentConnections:
        raise_fd_limit()
        self._thread.start()
        return self

    def _run(self) -> None:
        host, port = self.url.rsplit(":", 1)
        per = max(1, self.total // len(self.addresses))
        held: dict[str, list[socket.socket]] = {a: [] for a in self.addresses}
        try:
            while not self._stop.is_set():
                for a in self.addresses:
                    alive = []
                    for s in held[a]:
                        try:
                            if s.recv(1, socket.MSG_PEEK) == b"":
                                s.close()
                                continue
                        except BlockingIOError:
                            pass
                        except OSError:
                            s.close()
                            continue
                        alive.append(s)
                    while len(alive) < per and not self._stop.is_set():
                        try:
                            s = socket.socket()
                        except OSError:  # out of descriptors: hold what is open
                            break
                        s.setblocking(False)
                        try:
                            s.bind((a, 0))
                            s.connect_ex((host, int(port)))
                        except OSError:
                            s.close()
                            self.refused += 1
                            break
                        alive.append(s)
                        self.opened += 1
                    held[a] = alive
                self.held_max = max(self.held_max, sum(len(v) for v in held.values()))
                self._stop.wait(self.reopen_s)
        finally:
            for socks in held.values():
                for s in socks:
                    s.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


class HostileImageClients:
    """``clients`` closed-loop gRPC clients, each from its own address, sending batches of
    the hostile corpus to ``<model>_image`` until :meth:`stop`; their outcomes counted."""

    def __init__(self, grpc_url: str, model: str, clients: int = 3, batch: int = 4) -> None:
        from serve.tools.hostile_images import corpus

        self.url, self.model, self.batch = grpc_url, image_model_name(model), batch
        self.images = [make() for make in corpus().values()]
        self.outcomes: dict[str, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)
        ]

    def start(self) -> HostileImageClients:
        for t in self._threads:
            t.start()
        return self

    def _run(self, k: int) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(self.url)
        i = k
        try:
            while not self._stop.is_set():
                items = [self.images[(i + j) % len(self.images)] for j in range(self.batch)]
                i += 1
                inp = grpcclient.InferInput(IMAGE_INPUT, [1, len(items)], "BYTES")
                inp.set_data_from_numpy(np.array([items], dtype=object))
                try:
                    client.infer(self.model, [inp], client_timeout=60)
                    what = "answered"
                except InferenceServerException as e:
                    what = "busy" if "busy" in str(e) else "refused"
                with self._lock:
                    self.outcomes[what] = self.outcomes.get(what, 0) + 1
        finally:
            client.close()

    def stop(self) -> dict[str, int]:
        self._stop.set()
        for t in self._threads:
            t.join(120)
        return self.outcomes


@dataclass
class ClientRun:
    """A normal client's requests over a while: successes, failures, latencies (ms)."""

    ok: int
    failed: int
    latencies_ms: list[float]
    errors: list[str]

    @property
    def success(self) -> float:
        return self.ok / max(1, self.ok + self.failed)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


def normal_client(
    call: Callable[[], object], seconds: float, stop: threading.Event | None = None
) -> ClientRun:
    """``call()`` again and again for ``seconds``: how many succeeded, how long each took."""
    lat: list[float] = []
    errors: list[str] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end and not (stop and stop.is_set()):
        started = time.monotonic()
        try:
            call()
            lat.append((time.monotonic() - started) * 1e3)
        except Exception as e:  # noqa: BLE001 - a failure of any kind counts
            errors.append(str(e)[:200])
    return ClientRun(len(lat), len(errors), lat, errors)


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def main(argv: list[str] | None = None) -> int:
    """``python -m serve.tools.attack slow|silent|images ...``: one attack in a process of
    its own (so the measured client shares no interpreter with it), until SIGTERM; prints
    ``ready`` once under way and a JSON summary at the end."""
    import argparse
    import signal
    import sys

    p = argparse.ArgumentParser(prog="python -m serve.tools.attack", description=main.__doc__)
    sub = p.add_subparsers(dest="attack", required=True)
    slow = sub.add_parser("slow", help="slow senders (SlowSenders)")
    slow.add_argument("--http", required=True)
    slow.add_argument("--grpc", required=True)
    slow.add_argument("--model", required=True)
    slow.add_argument("--shape", type=_shape, default=(1, 3, 224, 224))
    slow.add_argument("--addresses", type=int, default=4)
    slow.add_argument("--per-address", type=int, default=4)
    slow.add_argument("--first-network", type=int, default=1)
    silent = sub.add_parser("silent", help="silent connections (SilentConnections)")
    silent.add_argument("--url", required=True)
    silent.add_argument("--addresses", type=int, default=20)
    silent.add_argument("--total", type=int, default=10_000)
    silent.add_argument("--first-network", type=int, default=100)
    images = sub.add_parser("images", help="hostile image clients (HostileImageClients)")
    images.add_argument("--grpc", required=True)
    images.add_argument("--model", required=True)
    images.add_argument("--clients", type=int, default=3)
    a = p.parse_args(argv)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    summary: dict[str, object]
    if a.attack == "slow":
        pixels = np.zeros(a.shape, np.float32)
        addresses = attacker_addresses(a.addresses, a.first_network)
        senders = SlowSenders(a.http, a.grpc, a.model, pixels, addresses, a.per_address).start()
        print("ready", flush=True)
        stop.wait()
        cut = senders.stop()
        summary = {
            "attacker_requests": len(cut),
            "longest_hold_s": max((r.seconds for r in cut), default=0.0),
            "answers": {k: sum(r.answer == k for r in cut) for k in {r.answer for r in cut}},
        }
    elif a.attack == "silent":
        conns = SilentConnections(a.url, attacker_addresses(a.addresses, a.first_network), a.total)
        conns.start()
        print("ready", flush=True)
        stop.wait()
        conns.stop()
        summary = {"opened": conns.opened, "held_max": conns.held_max}
    else:
        clients = HostileImageClients(a.grpc, a.model, a.clients).start()
        print("ready", flush=True)
        stop.wait()
        summary = dict(clients.stop())
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
