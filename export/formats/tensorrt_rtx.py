"""TensorRT for RTX (``import tensorrt_rtx``): NVIDIA's builder and ONNX parser that run
without a GPU, targeting a list of compute capabilities
(``IBuilderConfig.set_compute_capability``). The export builds every ONNX it produces
with it and records each build (:class:`RtxBuild`). It calls the TensorRT API directly
rather than through Polygraphy: Polygraphy picks ``tensorrt`` or ``tensorrt_rtx`` once per
process (``POLYGRAPHY_USE_TENSORRT_RTX``, read when ``polygraphy.config`` is first
imported), which would pin the GPU path (export/formats/tensorrt_engine.py) to one of
them, and the record needs the parsed network's layers and the parser's own first error.
Networks are strongly typed: the engine computes in the precision its ONNX carries."""

from __future__ import annotations

import importlib
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from export.formats.tensorrt_engine import (
    PRECISIONS,
    EngineProfile,
    TensorRTUnavailable,
    layer_types,
    strong_typing_flags,
)
from serve.backend.errors import UsageError, UserError
from serve.core.files import atomic_write_bytes

RTX_MODULE = "tensorrt_rtx"
DEFAULT_RTX_TARGETS = ("8.6", "8.9", "12.0")


class OnnxParseFailed(UserError, RuntimeError):
    """TensorRT's ONNX parser refused the graph (the message is the parser's first error)."""


class EngineBuildFailed(UserError, RuntimeError):
    """The builder returned no engine (the message is its first error)."""


_LOGGERS: dict[str, Any] = {}


def _logger(trt: Any) -> Any:
    """One recording logger per TensorRT module (TensorRT wants one per process): keeps
    the errors of the current build, so a failure can name the builder's first one."""
    if trt.__name__ not in _LOGGERS:

        class Recording(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity: Any, msg: str) -> None:
                if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                    self.errors.append(msg)

        _LOGGERS[trt.__name__] = Recording()
    return _LOGGERS[trt.__name__]


def import_rtx() -> Any:
    """``tensorrt_rtx`` (``pip install tensorrt_rtx_cu12``; in the lock)."""
    try:
        return importlib.import_module(RTX_MODULE)
    except ImportError as e:
        raise TensorRTUnavailable(
            f"import {RTX_MODULE} failed ({e}): `make setup` installs tensorrt_rtx_cu12"
        ) from e


def parse_targets(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Compute capabilities as ``("8.6", "12.0")`` from ``"8.6,12.0"`` / a list; ``none``
    or empty -> no TensorRT-RTX builds. A malformed entry is an error naming it."""
    items = text.split(",") if isinstance(text, str) else [p for t in text for p in t.split(",")]
    items = [i.strip() for i in items if i.strip()]
    if items in ([], ["none"]):
        return ()
    for item in items:
        major, _, minor = item.partition(".")
        if not (major.isdigit() and minor.isdigit()):
            raise UsageError(f"compute capability {item!r}: expected MAJOR.MINOR such as 8.6")
    return tuple(dict.fromkeys(items))


def rtx_capabilities(trt: Any, targets: tuple[str, ...]) -> list[Any]:
    """``trt.ComputeCapability`` members for ``("8.6", ...)``; an unknown one is an error
    listing what this TensorRT-RTX can target."""
    out = []
    for cc in targets:
        name = "SM" + cc.replace(".", "")
        if not hasattr(trt.ComputeCapability, name):
            known = sorted(
                (f"{m[2:-1]}.{m[-1]}" for m in dir(trt.ComputeCapability) if m[2:].isdigit()),
                key=lambda v: tuple(int(p) for p in v.split(".")),
            )
            raise UsageError(
                f"{trt.__name__} {trt.__version__} cannot target compute capability {cc} "
                f"(it knows {', '.join(known)})"
            )
        out.append(getattr(trt.ComputeCapability, name))
    return out


def parse_network(trt: Any, onnx_path: str | Path) -> tuple[Any, Any, Any]:
    """(builder, strongly typed network, parser) of ``onnx_path``; raises
    :class:`OnnxParseFailed` with the parser's first error (node: description)."""
    logger = _logger(trt)
    logger.errors.clear()
    builder = trt.Builder(logger)
    network = builder.create_network(strong_typing_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        if parser.num_errors:
            err = parser.get_error(0)
            first = _parser_message(str(err.node_name()), str(err.desc()))
        else:
            first = logger.errors[0] if logger.errors else "the parser gave no reason"
        raise OnnxParseFailed(first)
    return builder, network, parser


def _parser_message(node: str, desc: str) -> str:
    """``node: what is wrong`` from a parser error, whose description wraps the builder's
    message (``Invalid Node - ...``, ``... API Usage Error (node: message. In f at
    file)``) and may add unrelated CUDA-runtime noise on a host without a GPU."""
    if node:
        found = re.search(re.escape(node) + r": (.+?)(?:\. In \S+ at |\)?$)", desc, re.M)
        if found:
            return f"{node}: {found.group(1).strip()}"
    lines = [ln for ln in desc.splitlines() if ln.strip() and "catchCudaError" not in ln]
    text = lines[-1] if lines and lines[0].startswith("Invalid Node") else " ".join(lines)
    return f"{node}: {text}" if node else text


def network_layers(network: Any) -> list[dict[str, str]]:
    """Every layer's name, type and output data type (in network order)."""
    return [
        {
            "name": layer.name,
            "type": layer.type.name,
            "dtype": layer.get_output(0).dtype.name,
        }
        for layer in (network.get_layer(i) for i in range(network.num_layers))
    ]


@dataclass
class RtxBuild:
    """One TensorRT-RTX build, as ``parity.json``'s ``tensorrt_builds`` records it."""

    onnx: str
    precision: str
    builder: str
    compute_capabilities: list[str]
    status: str = "failed"  # built | failed
    reason: str = ""
    engine_bytes: int | None = None
    seconds: float | None = None
    layers: int | None = None
    layer_types: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rtx_build(
    onnx_path: str | Path,
    precision: str,
    targets: tuple[str, ...],
    profile: EngineProfile,
    input_name: str,
    item_shape: list[int],
    engine_path: str | Path | None = None,
) -> RtxBuild:
    """Parse and build ``onnx_path`` with TensorRT-RTX for ``targets`` (compute
    capabilities); the engine goes to ``engine_path`` (atomically) when given. Never
    raises for a graph or build problem: a failure is recorded with the parser's or
    builder's first error."""
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    record = RtxBuild(Path(onnx_path).name, precision, RTX_MODULE, list(targets))
    t0 = time.perf_counter()
    try:
        trt = import_rtx()
        record.builder = f"{RTX_MODULE} {trt.__version__}"
        capabilities = rtx_capabilities(trt, targets)
        builder, network, _parser = parse_network(trt, onnx_path)
        record.layers = network.num_layers
        record.layer_types = layer_types(network)
        config = builder.create_builder_config()
        shape = tuple(int(d) for d in item_shape)
        opt = builder.create_optimization_profile()
        opt.set_shape(
            input_name,
            (profile.min_batch, *shape),
            (profile.opt_batch, *shape),
            (profile.max_batch, *shape),
        )
        config.add_optimization_profile(opt)
        config.num_compute_capabilities = len(capabilities)
        for i, cc in enumerate(capabilities):
            config.set_compute_capability(cc, i)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            errors = _logger(trt).errors
            raise EngineBuildFailed(errors[0] if errors else "the builder returned no engine")
        data = bytes(serialized)
        record.engine_bytes = len(data)
        if engine_path is not None:
            Path(engine_path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(Path(engine_path), data)
        record.status = "built"
    except (TensorRTUnavailable, OnnxParseFailed, EngineBuildFailed, ValueError) as e:
        record.reason = str(e)
    except Exception as e:  # noqa: BLE001 - whatever the bindings raise is this build's failure
        record.reason = f"{type(e).__name__}: {e}"
    record.seconds = round(time.perf_counter() - t0, 2)
    return record
