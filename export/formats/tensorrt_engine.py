"""TensorRT engines, strongly typed: the engine computes in the precision its ONNX graph
carries. There is no FP16 or INT8 builder flag and no implicit INT8 calibration anywhere:
an FP16 engine is built from the accuracy-gated FP16 ONNX (with the nodes the precision
fallback kept in FP32), an INT8 engine from an explicit Q/DQ ONNX. TensorRT 10 gets the
``STRONGLY_TYPED`` network flag, TensorRT 11 and TensorRT-RTX (``import tensorrt_rtx``),
whose networks are always strongly typed, get it where the enum still has it.

Two builders:

* :func:`build_engine` (GPU hosts, ``import tensorrt``): Polygraphy's loader chain
  ``NetworkFromOnnxPath(strongly_typed=...)`` -> ``CreateConfig(profiles=[one profile over
  the batch axis], load_timing_cache=...)`` -> ``EngineFromNetwork(...)`` -> ``SaveEngine``.
  Beside ``model.plan`` goes ``model.plan.json``: TensorRT version, GPU name and compute
  capability, precision (read from the network), profile and compatibility flags. A plain
  engine only runs on the TensorRT version and GPU generation it was built for, so loading
  checks that file first and refuses a mismatch by name. TensorRT 10 can relax both
  (``CreateConfig(version_compatible=..., hardware_compatibility_level=...)``): a
  version-compatible engine also runs on later releases of the same major version (Triton
  needs ``--backend-config=tensorrt,version-compatible=true``), a hardware-compatible one
  (``ampere_plus``) on every GPU from Ampere (sm80) on, at some speed cost.
* :func:`export.formats.tensorrt_rtx.rtx_build` (any host, ``import tensorrt_rtx``):
  NVIDIA's TensorRT for RTX, whose builder and ONNX parser run without a GPU
  (export/formats/tensorrt_rtx.py).

In a model repository each version holds one plan per compute capability,
``model.sm<major><minor>.plan`` (+ its ``.json``), listed in the config's
``cc_model_filenames``; a hardware-compatible plan is ``model.plan``, the config's
``default_model_filename``, used on any GPU without its own plan
(:func:`plan_filename`, :func:`repository_plans`).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from serve.backend.errors import UsageError, UserError
from serve.core.files import atomic_write_text

EnginePrecision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = get_args(EnginePrecision)


class TensorRTUnavailable(UserError, RuntimeError):
    """No ``tensorrt`` module or no CUDA GPU here."""


class EngineMismatch(UserError, RuntimeError):
    """The engine was built for another TensorRT version or GPU."""


@dataclass(frozen=True)
class EngineProfile:
    """One optimization profile over the batch axis (the other dims are fixed). No
    precision here: a strongly typed engine computes in its ONNX graph's types."""

    min_batch: int = 1
    opt_batch: int = 16
    max_batch: int = 64
    version_compatible: bool = False  # runs on later TensorRT 10.x too (lean runtime inside)
    hardware_compatibility: HardwareLevel = "none"  # "ampere_plus": one engine for sm80 and later

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise UsageError(
                f"need 1 <= min ({self.min_batch}) <= opt ({self.opt_batch}) "
                f"<= max ({self.max_batch}) batch"
            )
        if self.hardware_compatibility not in HARDWARE_LEVELS:
            raise UsageError(
                f"hardware compatibility must be one of {HARDWARE_LEVELS}, "
                f"got {self.hardware_compatibility!r}"
            )


HardwareLevel = Literal["none", "ampere_plus"]
HARDWARE_LEVELS: tuple[str, ...] = get_args(HardwareLevel)
DEFAULT_PLAN = "model.plan"  # the config's default_model_filename


def plan_filename(meta: dict[str, Any]) -> str:
    """A plan's name in a version folder: ``model.sm90.plan`` for an engine tied to
    compute capability 9.0, ``model.plan`` for a hardware-compatible one (or unknown)."""
    cc = str(meta.get("compute_capability", ""))
    if meta.get("hardware_compatibility_level", "none") != "none" or not cc:
        return DEFAULT_PLAN
    return f"model.sm{cc.replace('.', '')}.plan"


def repository_plans(model_dir: str | Path) -> dict[str, str]:
    """Compute capability -> plan file name, over every version of a ``tensorrt_plan``
    model (from the plans' ``.json`` files): the config's ``cc_model_filenames``."""
    found: dict[str, str] = {}
    for meta_file in sorted(Path(model_dir).glob("[0-9]*/model.sm*.plan.json")):
        meta = json.loads(meta_file.read_text())
        found[str(meta["compute_capability"])] = meta_file.name[: -len(".json")]
    return found


def tensorrt_status() -> tuple[bool, str]:
    """(True, "") where TensorRT and a CUDA GPU are present, else (False, the reason)."""
    if importlib.util.find_spec("tensorrt") is None:
        return (
            False,
            "TensorRT is not installed (import tensorrt fails; NVIDIA's wheels "
            "need their download host)",
        )
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # the PyPI stub raises when its real package is missing
        return False, f"import tensorrt failed: {e}"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU visible"
    return True, ""


def require_tensorrt() -> None:
    ok, why = tensorrt_status()
    if not ok:
        raise TensorRTUnavailable(why)


def current_platform() -> dict[str, Any]:
    """TensorRT version and the GPU an engine built now would be for."""
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return {
        "tensorrt_version": trt.__version__,
        "gpu_name": torch.cuda.get_device_name(0),
        "compute_capability": f"{major}.{minor}",
    }


def strong_typing_flags(trt: Any) -> int:
    """``create_network`` flags for a strongly typed network: ``STRONGLY_TYPED`` where the
    module has it (TensorRT 10, TensorRT-RTX); 0 where networks are always strongly typed
    and the flag is gone."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def layer_types(network: Any) -> dict[str, int]:
    """The network's layers counted by the data type of their (first) output."""
    counts = Counter(
        network.get_layer(i).get_output(0).dtype.name for i in range(network.num_layers)
    )
    return dict(sorted(counts.items()))


def network_precision(types: dict[str, int]) -> str:
    """What a strongly typed network computes in: ``int8`` with Q/DQ, ``fp16`` with half
    layers, else ``fp32``."""
    if types.get("INT8") or types.get("UINT8"):
        return "int8"
    return "fp16" if types.get("HALF") else "fp32"


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    profile: EngineProfile,
    input_name: str,
    item_shape: list[int],
    timing_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Build ``plan_path`` from ``onnx_path`` with TensorRT on this GPU, strongly typed
    (precision: the graph's); returns (and writes) the engine's metadata."""
    require_tensorrt()
    import tensorrt as trt
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineFromNetwork,
        NetworkFromOnnxPath,
        Profile,
        SaveEngine,
    )

    shape = tuple(int(d) for d in item_shape)
    profiles = [
        Profile().add(
            input_name,
            min=(profile.min_batch, *shape),
            opt=(profile.opt_batch, *shape),
            max=(profile.max_batch, *shape),
        )
    ]
    cache = str(timing_cache) if timing_cache else None
    compat: dict[str, Any] = {}
    if profile.version_compatible:
        compat["version_compatible"] = True
    if profile.hardware_compatibility != "none":
        compat["hardware_compatibility_level"] = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    config = CreateConfig(profiles=profiles, load_timing_cache=cache, **compat)
    t0 = time.perf_counter()
    strongly_typed = bool(strong_typing_flags(trt))
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=strongly_typed)()
    types = layer_types(network[1])
    engine = EngineFromNetwork(network, config=config, save_timing_cache=cache)
    plan_path = Path(plan_path)
    tmp = plan_path.with_name(f".{plan_path.name}.tmp")
    SaveEngine(engine, path=str(tmp))()
    tmp.replace(plan_path)  # atomic: a failed build never leaves half an engine
    meta = {
        **current_platform(),
        "builder": f"tensorrt {trt.__version__}",
        "strongly_typed": True,
        "precision": network_precision(types),
        "layer_types": types,
        "profile": asdict(profile),
        "input": {"name": input_name, "shape": list(shape)},
        "version_compatible": profile.version_compatible,
        "hardware_compatibility_level": profile.hardware_compatibility,
        "onnx": str(onnx_path),
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write_text(metadata_path(plan_path), json.dumps(meta, indent=2) + "\n")
    return meta


def metadata_path(plan_path: str | Path) -> Path:
    return Path(f"{plan_path}.json")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in str(text).split(".")[:3] if p.isdigit())


def _compatible(key: str, meta: dict[str, Any], here: dict[str, Any]) -> bool:
    built, now = meta.get(key), here[key]
    if built == now:
        return True
    if key == "tensorrt_version" and meta.get("version_compatible"):
        b, n = _version(str(built)), _version(str(now))
        return bool(b) and b[0] == n[0] and n >= b  # later releases of the same major
    if key == "compute_capability" and meta.get("hardware_compatibility_level") == "ampere_plus":
        return _version(str(now)) >= (8, 0)
    return False


def mismatches(meta: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """What differs between where an engine was built (``meta``) and here: TensorRT
    version and GPU compute capability (the GPU name is reported alongside), allowing
    what a version- or hardware-compatible engine tolerates."""
    return [
        f"{key} {meta.get(key)!r} (here {here[key]!r}; built on {meta.get('gpu_name')!r}, "
        f"here {here.get('gpu_name')!r})"
        for key in ("tensorrt_version", "compute_capability")
        if not _compatible(key, meta, here)
    ]


def check_compatible(plan_path: str | Path) -> dict[str, Any]:
    """The engine's metadata, after checking it matches this TensorRT and GPU."""
    require_tensorrt()
    meta_file = metadata_path(plan_path)
    if not meta_file.is_file():
        raise EngineMismatch(f"{meta_file} is missing: cannot tell what {plan_path} was built for")
    meta = json.loads(meta_file.read_text())
    problems = mismatches(meta, current_platform())
    if problems:
        raise EngineMismatch(
            f"{plan_path} was built for another platform: "
            + ", ".join(problems)
            + "; rebuild it with `python -m export trt`"
        )
    return meta


def tensorrt_logits(
    plan_path: str | Path, batches: list[np.ndarray], input_name: str, output_name: str
) -> np.ndarray:
    """Run the engine on pixel batches (split to fit the profile's max batch)."""
    meta = check_compatible(plan_path)
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    max_batch = int(meta["profile"]["max_batch"])
    runtime = None
    if meta.get("version_compatible"):
        import tensorrt as trt

        runtime = trt.Runtime(trt.Logger())
        runtime.engine_host_code_allowed = True  # the engine carries its lean runtime
    outs = []
    with TrtRunner(EngineFromBytes(BytesFromPath(str(plan_path)), runtime=runtime)) as runner:
        for batch in batches:
            for i in range(0, len(batch), max_batch):
                result = runner.infer(feed_dict={input_name: batch[i : i + max_batch]})
                outs.append(np.asarray(result[output_name], dtype=np.float32))
    return np.concatenate(outs)
