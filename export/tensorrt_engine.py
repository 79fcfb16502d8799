"""TensorRT FP16 engines, built and run with Polygraphy (GPU hosts with TensorRT only).

Build: ``NetworkFromOnnxPath`` -> ``CreateConfig(fp16=..., profiles=[one profile over the
batch axis], load_timing_cache=...)`` -> ``EngineFromNetwork(..., save_timing_cache=...)``
-> ``SaveEngine`` (Polygraphy's documented loader chain). Beside ``model.plan`` goes
``model.plan.json``: TensorRT version, GPU name and compute capability, precision and
profile. An engine only runs on the TensorRT
version and GPU generation it was built for, so loading checks that file first and
refuses a mismatch by name.
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


class TensorRTUnavailable(RuntimeError):
    """No ``tensorrt`` module or no CUDA GPU here."""


class EngineMismatch(RuntimeError):
    """The engine was built for another TensorRT version or GPU."""


@dataclass(frozen=True)
class EngineProfile:
    """One optimization profile over the batch axis (the other dims are fixed)."""

    min_batch: int = 1
    opt_batch: int = 16
    max_batch: int = 64
    fp16: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(
                f"need 1 <= min ({self.min_batch}) <= opt ({self.opt_batch}) "
                f"<= max ({self.max_batch}) batch"
            )


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


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    profile: EngineProfile,
    input_name: str,
    item_shape: list[int],
    timing_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Build ``plan_path`` from ``onnx_path``; returns (and writes) the engine's metadata."""
    require_tensorrt()
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
    config = CreateConfig(fp16=profile.fp16, profiles=profiles, load_timing_cache=cache)
    t0 = time.perf_counter()
    engine = EngineFromNetwork(
        NetworkFromOnnxPath(str(onnx_path)), config=config, save_timing_cache=cache
    )
    plan_path = Path(plan_path)
    tmp = plan_path.with_name(f".{plan_path.name}.tmp")
    SaveEngine(engine, path=str(tmp))()
    tmp.replace(plan_path)  # atomic: a failed build never leaves half an engine
    meta = {
        **current_platform(),
        "precision": "fp16" if profile.fp16 else "fp32",
        "profile": asdict(profile),
        "input": {"name": input_name, "shape": list(shape)},
        "onnx": str(onnx_path),
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    metadata_path(plan_path).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def metadata_path(plan_path: str | Path) -> Path:
    return Path(f"{plan_path}.json")


def mismatches(meta: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """What differs between where an engine was built (``meta``) and here: TensorRT
    version and GPU compute capability (the GPU name is reported alongside)."""
    return [
        f"{key} {meta.get(key)!r} (here {here[key]!r}; built on {meta.get('gpu_name')!r}, "
        f"here {here.get('gpu_name')!r})"
        for key in ("tensorrt_version", "compute_capability")
        if meta.get(key) != here[key]
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
    outs = []
    with TrtRunner(EngineFromBytes(BytesFromPath(str(plan_path)))) as runner:
        for batch in batches:
            for i in range(0, len(batch), max_batch):
                result = runner.infer(feed_dict={input_name: batch[i : i + max_batch]})
                outs.append(np.asarray(result[output_name], dtype=np.float32))
    return np.concatenate(outs)
