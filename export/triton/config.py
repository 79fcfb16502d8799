"""Triton model configs, generated through Triton's ModelConfig protobuf (tritonclient's
``model_config_pb2``) from the model card and the serving knobs, and parsed back strictly.

Three models per export: the classifier ``<name>`` for the target (python backend + ONNX
Runtime on CPU; ``tensorrt_plan`` or ``onnxruntime`` + TensorRT accelerator on GPU),
``<name>_preprocess`` (python backend: encoded image -> pixels, the card's geometry and
the per-image limits as parameters) and the ``<name>_image`` ensemble of the two.

Queues are bounded at the public front (serve/runtime/front.py: at most ``--max-inflight``
requests inside Triton, ``--max-queue`` waiting at the front), not in Triton: in Triton
2.51 any dynamic-batching queue policy (``max_queue_size``, a default timeout or
``allow_timeout_override``) turns off the batcher's payload prefetching, and the batcher
then wakes for a new request only if an instance is idle at that moment - otherwise it
sleeps its 500 ms default wait (core ``dynamic_batch_scheduler.cc``: ``Enqueue`` ->
``PayloadSlotAvailable(.., support_prefetching=false, force_non_blocking)``; measured:
p99 515 ms for one sequential client). ``max_queue_size`` / ``queue_timeout_us`` > 0 still
write a policy for servers reached without the front, at that cost.

Warmup: the classifier and the preprocess model carry ``model_warmup`` entries (one per
warmup batch size, each a real val image stored under ``<model>/warmup/``, where Triton
reads them; see export/triton/warmup.py), so the first client request does not pay for lazy
initialization. GPU lifecycle: a ``tensorrt_plan`` model maps each compute capability to
its own plan (``cc_model_filenames``: ``model.sm90.plan`` ...), with ``model.plan`` as the
fallback (a hardware-compatible engine when one was built); the ONNX Runtime GPU model
keeps TensorRT's engines in ``trt_engine_cache_path`` so a reload does not rebuild them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from tritonclient.grpc import model_config_pb2 as mc

from serve.backend.errors import UsageError
from serve.backend.preprocess import (
    DECODE_DEADLINE_S,
    DECODE_MEMORY_BYTES,
    MAX_ASPECT_RATIO,
    MAX_FAST_WORK,
    MAX_IMAGE_BYTES,
    MAX_PIXELS,
    MAX_REQUEST_WORK,
    MAX_RESIZED_PIXELS,
    REQUEST_DEADLINE_S,
    SLOW_LANE_SLOTS,
)
from serve.core.card import ModelCard
from serve.core.names import (
    IMAGE_INPUT,
    INPUT_NAME,
    OUTPUT_NAME,
    PARAM_CROP,
    PARAM_DECODE_DEADLINE,
    PARAM_DECODE_MEMORY,
    PARAM_INTERPOLATION,
    PARAM_MAX_ASPECT_RATIO,
    PARAM_MAX_FAST_WORK,
    PARAM_MAX_IMAGE_BYTES,
    PARAM_MAX_PIXELS,
    PARAM_MAX_REQUEST_WORK,
    PARAM_MAX_RESIZED_PIXELS,
    PARAM_PIXEL_RANGE,
    PARAM_REQUEST_DEADLINE,
    PARAM_RESIZE,
    PARAM_SLOW_LANE_SLOTS,
    PIXELS_OUTPUT,
    image_model_name,
    preprocess_model_name,
)

CPU_INSTANCES = 2  # classifier instances on CPU unless told (ServingConfig.instances)
KEEP_VERSIONS = 2  # the classifier's version policy: the latest 2 stay loaded
Target = Literal["cpu", "gpu"]
GpuBackend = Literal["tensorrt", "onnxruntime"]
TARGETS: tuple[str, ...] = get_args(Target)
GPU_BACKENDS: tuple[str, ...] = get_args(GpuBackend)
BACKEND_NAMES = {
    "cpu": "python (onnxruntime CPU)",
    "gpu-tensorrt": "tensorrt_plan",
    "gpu-onnxruntime": "onnxruntime + TensorRT accelerator (FP16)",
}


@dataclass
class ServingConfig:
    """Knobs of the generated Triton model configs."""

    max_batch_size: int = 64
    max_queue_delay_us: int = 500
    # 0: CPU_INSTANCES on CPU (two single-threaded ONNX Runtime sessions beat one with
    # two threads under load: measured, docs/benchmarks.md "Instances x threads"), 1 on GPU
    instances: int = 0
    # ONNX Runtime threads per CPU instance; 0: the cores the stub may use / instances
    intra_op_threads: int = 0
    target: Target = "cpu"
    gpu_backend: GpuBackend = "tensorrt"
    preferred_batch_sizes: list[int] = field(default_factory=list)
    # 0: no Triton queue policy (the front bounds the queue; a policy stalls Triton 2.51)
    max_queue_size: int = 0
    queue_timeout_us: int = 0
    warmup: bool = True  # model_warmup from real val images (export/triton/warmup.py)
    trt_engine_cache_path: str = "/tmp/triton_trt_cache"  # gpu-onnxruntime: engines kept here
    # <name>_preprocess instances; 0: instances + slow-lane slots (an expensive image in
    # every slot still leaves `instances` free for the cheap ones)
    preprocess_instances: int = 0
    slow_lane_slots: int = SLOW_LANE_SLOTS
    decode_deadline_s: float = DECODE_DEADLINE_S

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise UsageError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.gpu_backend not in GPU_BACKENDS:
            raise UsageError(f"gpu backend must be one of {GPU_BACKENDS}, got {self.gpu_backend!r}")
        if self.max_batch_size < 1 or self.instances < 0:
            raise UsageError("max_batch_size must be >= 1 and instances >= 0 (0: automatic)")
        if self.intra_op_threads < 0:
            raise UsageError("intra_op_threads must be >= 0 (0: cores / instances)")
        if self.preprocess_instances < 0 or self.slow_lane_slots < 1:
            raise UsageError("preprocess_instances must be >= 0 and slow_lane_slots >= 1")
        if self.decode_deadline_s <= 0:
            raise UsageError(f"decode deadline must be > 0 s, got {self.decode_deadline_s}")
        if self.max_queue_size < 0 or self.queue_timeout_us < 0:
            raise UsageError("max_queue_size and queue_timeout_us must be >= 0")
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if bad:
            raise UsageError(f"preferred batch sizes {bad} outside 1..{self.max_batch_size}")

    @property
    def kind(self) -> str:
        """``cpu``, ``gpu-tensorrt`` or ``gpu-onnxruntime``."""
        return "cpu" if self.target == "cpu" else f"gpu-{self.gpu_backend}"

    @property
    def instance_count(self) -> int:
        """Instances of the classifier (``instances``, or its automatic value)."""
        return self.instances or (CPU_INSTANCES if self.target == "cpu" else 1)

    @property
    def preprocess_instance_count(self) -> int:
        """Instances of ``<name>_preprocess`` (see ``preprocess_instances``)."""
        return self.preprocess_instances or self.instance_count + self.slow_lane_slots

    @property
    def warmup_batch_sizes(self) -> list[int]:
        """Batch 1 (a lone client's first request) and every preferred batch size."""
        return sorted({1, *self.preferred_batch_sizes}) if self.warmup else []


@dataclass(frozen=True)
class WarmupSample:
    """One ``model_warmup`` entry: an input file (one item, in ``<model>/warmup/``) that
    Triton sends ``batch_size`` times as one batch while the model loads."""

    batch_size: int
    input_data_file: str


def add_warmup(cfg: mc.ModelConfig, samples: list[WarmupSample]) -> mc.ModelConfig:
    """Append ``model_warmup`` entries for the config's (single) input."""
    (inp,) = cfg.input
    for s in samples:
        w = cfg.model_warmup.add(name=f"val_image_batch{s.batch_size}", batch_size=s.batch_size)
        w.inputs[inp.name].data_type = inp.data_type
        w.inputs[inp.name].dims.extend(inp.dims)
        w.inputs[inp.name].input_data_file = s.input_data_file
    return cfg


def set_plans(cfg: mc.ModelConfig, cc_files: dict[str, str], default: str = "model.plan") -> None:
    """``tensorrt_plan``: the plan per compute capability (``"9.0" -> "model.sm90.plan"``);
    a GPU not listed loads ``default`` (a hardware-compatible engine, where one exists)."""
    cfg.default_model_filename = default
    cfg.ClearField("cc_model_filenames")
    for cc, filename in sorted(cc_files.items()):
        cfg.cc_model_filenames[cc] = filename


def _dynamic_batching(cfg: mc.ModelConfig, serving: ServingConfig) -> None:
    db = cfg.dynamic_batching
    db.max_queue_delay_microseconds = serving.max_queue_delay_us
    db.preferred_batch_size.extend(serving.preferred_batch_sizes)
    if not (serving.max_queue_size or serving.queue_timeout_us):
        return  # no policy: see the module docstring (the front bounds the queue)
    policy = db.default_queue_policy
    policy.timeout_action = mc.ModelQueuePolicy.REJECT
    policy.default_timeout_microseconds = serving.queue_timeout_us
    policy.allow_timeout_override = bool(serving.queue_timeout_us)
    policy.max_queue_size = serving.max_queue_size


def _geometry(card: ModelCard) -> dict[str, str]:
    pre = card.preprocessing
    return {
        PARAM_RESIZE: str(pre.resize),
        PARAM_CROP: str(pre.crop),
        PARAM_INTERPOLATION: pre.interpolation,
    }


def classifier_config(name: str, card: ModelCard, serving: ServingConfig) -> mc.ModelConfig:
    """The classifier's model-level config for ``serving.target``."""
    cfg = mc.ModelConfig(name=name, max_batch_size=serving.max_batch_size)
    cfg.input.add(
        name=INPUT_NAME,
        data_type=mc.TYPE_FP32,
        format=mc.ModelInput.FORMAT_NCHW,
        dims=list(card.input.shape),
    )
    cfg.output.add(
        name=OUTPUT_NAME,
        data_type=mc.TYPE_FP32,
        dims=[card.num_classes],
        label_filename="labels.txt",
    )
    _dynamic_batching(cfg, serving)
    cfg.version_policy.latest.num_versions = KEEP_VERSIONS
    low, high = card.input.pixel_range
    params = {
        # What a client needs to turn an image into the input tensor (read via the API).
        **_geometry(card),
        PARAM_PIXEL_RANGE: f"{low:g}..{high:g} {card.input.color}",
        "arch": card.arch,
        "target": serving.kind,
    }
    if serving.target == "cpu":
        cfg.backend = "python"
        cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=serving.instance_count)
        params["onnx_file"] = "model.onnx"  # whatever its precision (see the version's card)
        params["intra_op_threads"] = str(serving.intra_op_threads)
    elif serving.gpu_backend == "tensorrt":
        cfg.platform = "tensorrt_plan"
        cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=serving.instance_count)
    else:
        cfg.backend = "onnxruntime"
        cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=serving.instance_count)
        accel = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(
            name="tensorrt"
        )
        accel.parameters["precision_mode"] = "FP16"
        accel.parameters["max_workspace_size_bytes"] = str(1 << 30)
        # Engines are built on the first load and reused by later loads on the same GPU
        # and TensorRT (ORT keys the cache by model, shapes and GPU).
        accel.parameters["trt_engine_cache_enable"] = "1"
        accel.parameters["trt_engine_cache_path"] = f"{serving.trt_engine_cache_path}/{name}"
    for key, value in params.items():
        cfg.parameters[key].string_value = value
    return cfg


def preprocess_config(name: str, card: ModelCard, serving: ServingConfig) -> mc.ModelConfig:
    """Python backend (CPU): encoded image bytes -> the classifier's input pixels."""
    cfg = mc.ModelConfig(
        name=preprocess_model_name(name), backend="python", max_batch_size=serving.max_batch_size
    )
    cfg.input.add(name=IMAGE_INPUT, data_type=mc.TYPE_STRING, dims=[1])
    cfg.output.add(name=PIXELS_OUTPUT, data_type=mc.TYPE_FP32, dims=list(card.input.shape))
    cfg.instance_group.add(
        kind=mc.ModelInstanceGroup.KIND_CPU, count=serving.preprocess_instance_count
    )
    # No dynamic batching: each request is decoded alone, so an expensive image never
    # delays the cheap requests it would have been batched with (decoding gains nothing
    # from batches; the classifier behind it keeps its own batcher).
    cfg.version_policy.latest.num_versions = 1
    params = {
        **_geometry(card),
        PARAM_MAX_PIXELS: str(MAX_PIXELS),
        PARAM_MAX_RESIZED_PIXELS: str(MAX_RESIZED_PIXELS),
        PARAM_MAX_ASPECT_RATIO: f"{MAX_ASPECT_RATIO:g}",
        PARAM_MAX_IMAGE_BYTES: str(MAX_IMAGE_BYTES),
        PARAM_MAX_FAST_WORK: str(MAX_FAST_WORK),
        PARAM_DECODE_DEADLINE: f"{serving.decode_deadline_s:g}",
        PARAM_SLOW_LANE_SLOTS: str(serving.slow_lane_slots),
        PARAM_DECODE_MEMORY: str(DECODE_MEMORY_BYTES),
        PARAM_MAX_REQUEST_WORK: str(MAX_REQUEST_WORK),
        PARAM_REQUEST_DEADLINE: f"{REQUEST_DEADLINE_S:g}",
    }
    for key, value in params.items():
        cfg.parameters[key].string_value = value
    return cfg


def ensemble_config(name: str, card: ModelCard, serving: ServingConfig) -> mc.ModelConfig:
    """``<name>_image``: IMAGE bytes -> preprocess -> classifier -> labelled logits. The
    classifier keeps its own dynamic batching and version policy."""
    cfg = mc.ModelConfig(
        name=image_model_name(name), platform="ensemble", max_batch_size=serving.max_batch_size
    )
    cfg.input.add(name=IMAGE_INPUT, data_type=mc.TYPE_STRING, dims=[1])
    cfg.output.add(
        name=OUTPUT_NAME,
        data_type=mc.TYPE_FP32,
        dims=[card.num_classes],
        label_filename="labels.txt",
    )
    pre = cfg.ensemble_scheduling.step.add(model_name=preprocess_model_name(name), model_version=-1)
    pre.input_map[IMAGE_INPUT] = IMAGE_INPUT
    pre.output_map[PIXELS_OUTPUT] = "pixels"
    clf = cfg.ensemble_scheduling.step.add(model_name=name, model_version=-1)
    clf.input_map[INPUT_NAME] = "pixels"
    clf.output_map[OUTPUT_NAME] = OUTPUT_NAME
    cfg.parameters["classifier"].string_value = name
    return cfg


def signature(cfg: mc.ModelConfig) -> tuple:
    """What clients see: inputs and outputs with shapes and types."""
    return (
        [(i.name, list(i.dims), i.data_type) for i in cfg.input],
        [(o.name, list(o.dims), o.data_type) for o in cfg.output],
    )


def geometry(cfg: mc.ModelConfig) -> dict[str, str]:
    """The preprocessing parameters all versions served by ``cfg`` share."""
    keys = (PARAM_RESIZE, PARAM_CROP, PARAM_INTERPOLATION)
    return {k: cfg.parameters[k].string_value for k in keys if k in cfg.parameters}


def target_of(cfg: mc.ModelConfig) -> str:
    return cfg.parameters["target"].string_value if "target" in cfg.parameters else "cpu"
