"""One perf_analyzer run described and read back (torch-free): a :class:`Profile` (one
load level against one model) and its argv, the rows of its CSV report, and the
``--input-data`` JSON of real samples. Run by serve/tools/perf_analyzer.py."""

from __future__ import annotations

import base64
import csv
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

from serve.backend.errors import UsageError
from serve.tools.perf_analyzer_install import PerfAnalyzerError

US_PER_MS = 1000.0
MIN_REQUESTS_PER_WINDOW = 10  # request-rate runs: windows long enough for this many


@dataclass
class Profile:
    """One perf_analyzer invocation: a single load level against one model."""

    model: str
    url: str  # HOST:PORT of the protocol's endpoint
    protocol: str = "grpc"  # grpc | http
    batch: int = 1
    concurrency: int = 0  # closed loop with this many outstanding requests, or
    request_rate: float = 0.0  # open loop at this many requests/s
    distribution: str = "poisson"  # request-rate arrivals: poisson | constant
    shared_memory: str = "none"  # none | system
    input_data: str = ""  # JSON file (real images); "" -> perf_analyzer's random data
    measurement_interval_ms: int = 1000
    measurement_mode: str = "time_windows"  # time_windows | count_windows
    measurement_request_count: int = 50  # count_windows only
    stability_percentage: float = 10.0
    max_trials: int = 10
    # run inside the network and mount namespaces of this PID (serve run's private
    # Triton, where the front's owner listeners need no key): no secret in the argv
    netns_pid: int = 0
    extra: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if (self.concurrency > 0) == (self.request_rate > 0):
            raise UsageError("give exactly one of concurrency and request_rate")
        if self.protocol not in ("grpc", "http"):
            raise UsageError(f"protocol must be grpc or http, got {self.protocol!r}")

    def window_ms(self) -> int:
        """The measurement window; a request-rate run's holds about
        :data:`MIN_REQUESTS_PER_WINDOW` requests at least."""
        if not self.request_rate:
            return self.measurement_interval_ms
        needed = math.ceil(MIN_REQUESTS_PER_WINDOW / self.request_rate * 1000)
        return max(self.measurement_interval_ms, needed)

    def command(self, binary: Path, csv_path: Path) -> list[str]:
        """perf_analyzer's argv for this profile, its CSV report going to ``csv_path``."""
        cmd = [
            str(binary),
            "-m",
            self.model,
            "-u",
            self.url,
            "-i",
            self.protocol,
            "-b",
            str(self.batch),
            f"--measurement-mode={self.measurement_mode}",
            f"--measurement-interval={self.window_ms()}",
            f"--stability-percentage={self.stability_percentage:g}",
            f"--max-trials={self.max_trials}",
            f"--shared-memory={self.shared_memory}",
            "-f",
            str(csv_path),
        ]
        if self.measurement_mode == "count_windows":
            cmd.append(f"--measurement-request-count={self.measurement_request_count}")
        if self.concurrency:
            cmd.append(f"--concurrency-range={self.concurrency}:{self.concurrency}")
        else:
            rate = f"{self.request_rate:g}"
            cmd.append(f"--request-rate-range={rate}:{rate}")
            cmd.append(f"--request-distribution={self.distribution}")
        if self.input_data:
            cmd.append(f"--input-data={self.input_data}")
        return cmd + list(self.extra)


@dataclass
class Row:
    """One line of perf_analyzer's CSV report, latencies in ms."""

    concurrency: int
    request_rate: float | None
    throughput: float  # inferences (images)/s
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    avg_ms: float
    server_queue_ms: float
    server_compute_ms: float  # input + infer + output
    client_send_ms: float
    client_recv_ms: float


def _ms(row: dict[str, str], key: str) -> float:
    value = row.get(key, "")
    return float(value) / US_PER_MS if value not in ("", None) else 0.0


def parse_csv(path: Path) -> list[Row]:
    """The rows of a ``-f`` CSV report (latencies there are in microseconds)."""
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if any(v for v in r.values())]
    if not rows:
        raise PerfAnalyzerError(f"{path}: no rows")
    out = []
    for r in rows:
        if "Inferences/Second" not in r or "p99 latency" not in r:
            raise PerfAnalyzerError(f"{path}: unexpected columns {sorted(r)}")
        rate = r.get("Request Rate")
        out.append(
            Row(
                concurrency=int(float(r.get("Concurrency") or 0)),
                request_rate=float(rate) if rate else None,
                throughput=float(r["Inferences/Second"]),
                p50_ms=_ms(r, "p50 latency"),
                p90_ms=_ms(r, "p90 latency"),
                p95_ms=_ms(r, "p95 latency"),
                p99_ms=_ms(r, "p99 latency"),
                avg_ms=_ms(r, "Avg latency"),
                server_queue_ms=_ms(r, "Server Queue"),
                server_compute_ms=_ms(r, "Server Compute Input")
                + _ms(r, "Server Compute Infer")
                + _ms(r, "Server Compute Output"),
                client_send_ms=_ms(r, "Client Send"),
                client_recv_ms=_ms(r, "Client Recv"),
            )
        )
    return out


@dataclass
class Result:
    """A finished perf_analyzer run: its rows, whether it found a stable measurement,
    and its output (for the log)."""

    rows: list[Row]
    stable: bool
    output: str
    command: list[str]


def input_data_json(name: str, samples: list[bytes], shape: list[int] | None = None) -> dict:
    """perf_analyzer's ``--input-data`` JSON: one step per sample of input ``name``, each
    the sample's bytes in base64 (an FP32 tensor's raw little-endian bytes, or the 4-byte
    length-prefixed element of a BYTES tensor, see :func:`bytes_element`)."""
    steps = []
    for raw in samples:
        tensor: dict[str, object] = {"b64": base64.b64encode(raw).decode("ascii")}
        if shape is not None:
            tensor["shape"] = list(shape)
        steps.append({name: tensor})
    return {"data": steps}


def bytes_element(data: bytes) -> bytes:
    """One element of a Triton BYTES tensor as serialized on the wire (length prefix)."""
    return struct.pack("<I", len(data)) + data
