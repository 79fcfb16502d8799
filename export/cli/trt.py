"""``python -m export trt``: a strongly typed TensorRT engine with Polygraphy (GPU hosts)."""

from __future__ import annotations

import argparse
from pathlib import Path

from export.cli.options import add_engine_arguments, profile_from
from serve.backend.errors import UsageError
from serve.core.cli_common import add_model_repository


def add_trt_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--onnx", default="", help="build an engine from this ONNX file")
    p.add_argument("--out", default="", help="engine path (default: beside the ONNX, model.plan)")
    g = p.add_argument_group("add this GPU's plan to a published tensorrt_plan version")
    g.add_argument("--name", default="", help="the model (instead of --onnx)")
    add_model_repository(g)
    g.add_argument("--version", type=int, default=0, help="the version (default: the latest)")
    g.add_argument("--data", default="", help="ImageFolder root: its val images check the engine")
    g.add_argument(
        "--split", default="val", help="the folder of --data whose images check the engine"
    )
    g.add_argument("--parity-limit", type=int, default=256, help="images to compare (0: all)")
    g.add_argument(
        "--tolerance",
        type=float,
        default=1e-2,
        help="engine parity: median |diff| vs ONNX Runtime FP32, absolute or relative",
    )
    add_engine_arguments(p)


def run_trt(a: argparse.Namespace) -> int:
    import onnx

    from export.formats.tensorrt_engine import build_engine, require_tensorrt

    require_tensorrt()  # the blocker first, before reading anything
    if a.name:
        from export.triton.engine_add import AddPlan, add_plan

        done = add_plan(
            AddPlan(
                repository=a.model_repository,
                name=a.name,
                data=a.data,
                version=a.version,
                split=a.split,
                limit=a.parity_limit,
                tolerance=a.tolerance,
                profile=profile_from(a),
                timing_cache=a.timing_cache,
            )
        )
        print(f"added {done['plan']}: {done['metadata']['parity']['status']}")
        return 0
    if not a.onnx:
        raise UsageError("give --onnx FILE (build an engine) or --name MODEL (add to a version)")
    proto = onnx.load(a.onnx, load_external_data=False)
    inp = proto.graph.input[0]
    item = [d.dim_value for d in inp.type.tensor_type.shape.dim][1:]
    out = a.out or str(Path(a.onnx).with_name("model.plan"))
    profile = profile_from(a)
    meta = build_engine(a.onnx, out, profile, inp.name, item, a.timing_cache or None)
    print(f"wrote {out} and {out}.json: {meta}")
    return 0
