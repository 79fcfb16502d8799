"""The front's limits: the knobs ``serve run`` exposes (:class:`FrontLimits`), what the
repository's models need (:func:`repository_models`: names, inputs, the largest valid
body) and the :class:`~serve.runtime.front_options.FrontOptions` rendered from both."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from serve.backend.errors import UsageError
from serve.core.names import PARAM_MAX_IMAGE_BYTES, PREPROCESS_SUFFIX
from serve.runtime.front_options import FrontOptions, Replica
from serve.runtime.server_options import LOOPBACK

log = logging.getLogger(__name__)


DTYPE_BYTES = {"TYPE_FP32": 4, "TYPE_FP16": 2, "TYPE_UINT8": 1, "TYPE_INT8": 1, "TYPE_INT64": 8}
PRIVATE_PORTS = (8000, 8001, 8002)  # Triton's ports inside its own namespace (replica r0;
REPLICA_PORT_STEP = 100  # replica rK listens on these + K x REPLICA_PORT_STEP)
# the front's owner listeners (HTTP, gRPC) inside that namespace: every call there is the
# owner's without a key (only the owner can enter the namespace; perf_analyzer runs there)
OWNER_PORTS = (8010, 8011)


Private = Literal["auto", "namespace", "loopback"]  # where Triton listens


@dataclass
class FrontLimits:
    """The front's knobs that ``serve run`` exposes (see serve/runtime/front.py)."""

    max_body_bytes: int = 0  # 0: sized from the repository (max batch x input size)
    max_json_bytes: int = 32 << 10
    max_json_depth: int = 32
    max_connections: int = 2000
    max_per_client: int = 64
    max_conns_per_client: int = 128
    max_conns_per_network: int = 512
    network_v4: int = 24
    network_v6: int = 64
    max_queue: int = 256
    max_queue_bytes: int = 512 << 20
    idle_timeout_s: float = 60.0
    header_timeout_s: float = 5.0
    body_timeout_s: float = 10.0
    min_body_rate: int = 256 << 10
    request_timeout_s: float = 120.0
    tls_cert: str = ""
    tls_key: str = ""
    inference_key: str = ""
    private: Private = "auto"

    def __post_init__(self) -> None:
        if self.private not in get_args(Private):
            raise UsageError("private must be auto, namespace or loopback")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise UsageError("TLS needs both --tls-cert and --tls-key")


@dataclass(frozen=True)
class RepositoryModels:
    """What the front needs to know of a model repository."""

    public: list[str]
    internal: list[str]
    max_request_bytes: int
    single_input: bool = False  # every model has exactly one input


def repository_models(repo: Path) -> RepositoryModels:
    """Public and internal model names and the largest valid request body, from the
    ``config.pbtxt`` files (parsed with Triton's ModelConfig protobuf)."""
    from tritonclient.grpc import model_config_pb2 as mc

    from serve.core.model_config import read_config

    public: list[str] = []
    internal: list[str] = []
    largest = 1 << 20
    configs = [(p, read_config(p)) for p in sorted(repo.glob("*/config.pbtxt"))]
    # encoded images: the preprocess model's per-image byte limit (an ensemble has none)
    image_limits = [
        int(c.parameters[PARAM_MAX_IMAGE_BYTES].string_value)
        for _, c in configs
        if PARAM_MAX_IMAGE_BYTES in c.parameters
    ]
    image_bytes = max(image_limits) if image_limits else 16 << 20
    for cfg_path, cfg in configs:
        name = cfg.name or cfg_path.parent.name
        (internal if name.endswith(PREPROCESS_SUFFIX) else public).append(name)
        batch = max(1, cfg.max_batch_size)
        for inp in cfg.input:
            dtype = mc.DataType.Name(inp.data_type)
            if dtype == "TYPE_STRING":
                # encoded images: a request up to one image of the largest allowed size
                # (a batch of them must share that; the preprocess model checks each)
                largest = max(largest, image_bytes + 4)
                continue
            item = DTYPE_BYTES.get(dtype, 4)
            for d in inp.dims:
                item *= max(1, d)
            largest = max(largest, batch * item)
    if not public:
        raise FileNotFoundError(f"no models in {repo} (run `make export`)")
    single = all(len(cfg.input) == 1 for _, cfg in configs)
    return RepositoryModels(public, internal, largest + (64 << 10), single)


def local_replica(index: int, ports: tuple[int, int, int]) -> Replica:
    """Replica ``r<index>`` of this stack, its Triton on loopback ``ports``."""
    return Replica(f"r{index}", LOOPBACK, *ports)


def replica_ports(index: int) -> tuple[int, int, int]:
    """The private ports (HTTP, gRPC, metrics) of local replica ``index`` in the namespace."""
    step = index * REPLICA_PORT_STEP
    return (PRIVATE_PORTS[0] + step, PRIVATE_PORTS[1] + step, PRIVATE_PORTS[2] + step)


def _port_of(fd: int) -> int:
    """The port a listening socket (an inherited file descriptor) is bound to."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            return int(sock.getsockname()[1])
    except (OSError, IndexError, TypeError, ValueError):
        return 0


def front_options(
    limits: FrontLimits,
    models: RepositoryModels,
    fds: list[int],
    replicas: list[Replica],
    **extra: Any,
) -> FrontOptions:
    """The front for the Tritons ``replicas``, serving the inherited public sockets
    ``fds`` with ``limits``."""
    return FrontOptions(
        public_ports=(_port_of(fds[0]), _port_of(fds[1]), _port_of(fds[2])),
        http_bind=f"fd@{fds[0]}",
        grpc_bind=f"fd@{fds[1]}",
        metrics_bind=f"fd@{fds[2]}",
        replicas=replicas,
        public_models=models.public,
        internal_models=models.internal,
        single_input=models.single_input,
        inference_key=limits.inference_key,
        max_body_bytes=limits.max_body_bytes or models.max_request_bytes,
        max_json_bytes=limits.max_json_bytes,
        max_json_depth=limits.max_json_depth,
        max_connections=limits.max_connections,
        max_per_client=limits.max_per_client,
        max_conns_per_client=limits.max_conns_per_client,
        max_conns_per_network=limits.max_conns_per_network,
        network_v4=limits.network_v4,
        network_v6=limits.network_v6,
        max_queue=limits.max_queue,
        max_queue_bytes=limits.max_queue_bytes,
        idle_timeout_s=limits.idle_timeout_s,
        header_timeout_s=limits.header_timeout_s,
        body_timeout_s=limits.body_timeout_s,
        min_body_rate=limits.min_body_rate,
        request_timeout_s=limits.request_timeout_s,
        **extra,
    )
