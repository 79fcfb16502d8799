"""The export's closing steps: the card to publish, the published version through a real
tritonserver, the parity report, the gate, publishing and deploying. Each step takes what
it reads as arguments and returns what it makes (export/pipeline/release.py lists them)."""

from __future__ import annotations

import dataclasses
import logging
import platform
from pathlib import Path
from typing import Any

from export.checks.bundle import BUNDLE_DIR, Bundle, copy_bundle, write_bundle
from export.checks.report import write_histogram, write_json, write_markdown
from export.checks.stage_outputs import encoded_images
from export.checks.stages import REFERENCE, TRITON_STAGES
from export.formats.onnx_export import ExportedOnnx, exported_card, model_gflops
from export.formats.tensorrt_rtx import RtxBuild
from export.pipeline.job import ExportJob
from export.pipeline.ledger import Ledger
from export.pipeline.precision import Int8Export, precision_details, served_stage
from export.triton.publish import Published, publish
from export.triton.warmup import val_images
from serve.core.card import ModelCard, ParitySummary
from serve.core.errors import GateRefused
from serve.core.files import atomic_write_bytes

log = logging.getLogger(__name__)


class ParityFailed(GateRefused):
    """A gating stage missed its threshold and publishing was refused (exit 3)."""


def make_card(
    job: ExportJob,
    ledger: Ledger,
    int8: Int8Export,
    fallback: dict[str, list[str]],
    int8_speed: dict[str, Any] | None,
) -> ModelCard:
    """The card to publish: the checkpoint's, as exported, with provenance by name and
    hash (no machine-local path), cost per image and the precision's record."""
    card = exported_card(job.ckpt)
    provenance = dataclasses.replace(
        card.provenance,
        checkpoint=Path(job.cfg.checkpoint).name,
        checkpoint_sha256=job.checkpoint_sha256,
    )
    return card.replace(
        name=job.name,
        provenance=provenance,
        gflop_per_image=round(model_gflops(job.ckpt), 4),
        precision=job.precision,
        precision_details=precision_details(job, ledger, int8, fallback, int8_speed),
    )


def publish_into(job: ExportJob, repo: Path, card: ModelCard, engine: Path | None) -> Published:
    """Publish ``card``'s version (the served ONNX, its engine, warmup images) into ``repo``."""
    images = val_images(job.ckpt, job.data, job.cfg.split, len(job.cfg.serving.warmup_batch_sizes))
    return publish(
        repo, job.name, job.served_onnx, card, job.cfg.serving, engine, warmup_images=images
    )


def check_triton(job: ExportJob, ledger: Ledger, card: ModelCard, engine: Path | None) -> None:
    """The version as it would be published, through a real tritonserver over HTTP and
    gRPC, and the raw-image ensemble (CPU targets; the bundled server has only the python
    backend). The server runs the served model with ONNX Runtime: it must return exactly
    that stage's logits."""
    cfg = job.cfg
    served = served_stage(job.precision)
    if not cfg.triton_parity or cfg.serving.target != "cpu":
        reason = (
            "disabled (--no-triton-parity)"
            if not cfg.triton_parity
            else "the bundled tritonserver has only the python backend; serve the GPU "
            "repository with the NGC container (serve/deploy/docker-compose.gpu.yml)"
        )
        for stage_name in TRITON_STAGES:
            ledger.skip(stage_name, served, reason)
        return
    from export.runners.triton import served as served_by_triton

    images = encoded_images(job.ckpt, job.data, cfg.split, cfg.parity_limit)
    ledger.encoded = images
    pixels = dataclasses.replace(ledger.pixels, images=images)
    with served_by_triton(lambda repo: publish_into(job, repo, card, engine), job.name) as runners:
        outputs = {runner.stage: runner.logits(pixels) for runner in runners}
    for stage_name, logits in outputs.items():
        ledger.compare(stage_name, served, ledger.logits[served], logits, job.fp32_gate)


def write_reports(
    job: ExportJob,
    onnx: ExportedOnnx,
    ledger: Ledger,
    int8: Int8Export,
    rtx_builds: list[RtxBuild],
    card: ModelCard,
    engine: Path | None,
) -> dict[str, Any]:
    """parity.json, parity.md, parity.png in the run folder (local paths are fine there);
    returns the report."""
    cfg = job.cfg
    passed = ledger.passed(job.failed_required_builds(rtx_builds))
    report: dict[str, Any] = {
        "model": job.name,
        "checkpoint": str(cfg.checkpoint),
        "checkpoint_sha256": card.provenance.checkpoint_sha256,
        "onnx": str(job.onnx_path),
        "onnx_from_cache": onnx.key if onnx.cached else None,
        "onnx_fp16": str(job.fp16_path),
        "onnx_int8": str(job.int8_path) if int8.built else None,
        "onnx_int8_tensorrt": str(job.int8_trt_path) if int8.built else None,
        "precision": job.precision,
        "gates": {
            "fp32": dataclasses.asdict(job.fp32_gate),
            "reduced_precision": dataclasses.asdict(cfg.precision.gate),
            "reduced_precision_elementwise_advisory": dataclasses.asdict(job.fp16_gate),
        },
        "precision_details": card.precision_details,
        "engine": str(engine) if engine else None,
        "target": cfg.serving.kind,
        "data": job.data,
        "split": cfg.split,
        "images": ledger.pixels.count,
        "reference_top1": float((ledger.reference.argmax(1) == ledger.pixels.labels).mean()),
        "passed": passed,
        "forced": bool(cfg.force and not passed),
        "stages": [s.to_dict() for s in ledger.stages],
        "tensorrt_builds": [b.to_dict() for b in rtx_builds],
        "versions": _versions(),
    }
    bundle = write_bundle(
        job.out_dir / BUNDLE_DIR,
        model=job.name,
        pixels=ledger.pixels.batches,
        labels=ledger.pixels.labels,
        names=ledger.pixels.paths,
        classes=ledger.classes,
        stages=ledger.stages,
        logits={REFERENCE: ledger.reference, **ledger.logits},
        indices=ledger.indices,
        models=job.stage_models(engine),
        images=ledger.encoded,
        versions=report["versions"],
        where=str(job.out_dir / BUNDLE_DIR),
        checkpoint=str(cfg.checkpoint),
    )
    report["bundle"] = {"path": str(bundle), "replay": Bundle.load(bundle).meta["replay"]}
    write_json(report, job.out_dir / "parity.json")
    write_markdown(report, job.out_dir / "parity.md")
    write_histogram(ledger.stages, ledger.diffs, job.out_dir / "parity.png")
    log.info("wrote %s/parity.json, parity.md, parity.png and the bundle %s/", job.out_dir, bundle)
    return report


def _versions() -> dict[str, str]:
    """What computed the stages: the libraries' versions ("" when not installed)."""
    from importlib import metadata

    import onnx
    import onnxruntime
    import torch

    def installed(*dists: str) -> str:
        for dist in dists:
            try:
                return f"{dist} {metadata.version(dist)}"
            except metadata.PackageNotFoundError:
                continue
        return ""

    return {
        "torch": str(torch.__version__),
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "tensorrt": installed("tensorrt", "tensorrt_cu12", "tensorrt_rtx_cu12", "tensorrt_rtx"),
        "triton": installed("nvidia-pytriton"),
        "tritonclient": installed("tritonclient"),
        "python": platform.python_version(),
    }


def gate(job: ExportJob, ledger: Ledger, rtx_builds: list[RtxBuild]) -> None:
    """Refuse to publish when a gating stage or a required build failed (unless --force)."""
    failed_builds = job.failed_required_builds(rtx_builds)
    if ledger.passed(failed_builds) or job.cfg.force:
        return
    failed = [s for s in ledger.stages if s.status == "failed"]
    reasons = "; ".join(
        [f"{s.name}: {s.reason}" for s in failed]
        + [
            f"TensorRT-RTX build of {b.onnx} ({b.precision}) failed: {b.reason}"
            for b in failed_builds
        ]
    )
    raise ParityFailed(
        f"parity failed, not publishing ({reasons}); see {job.out_dir / 'parity.md'}"
    )


def publish_release(
    job: ExportJob, card: ModelCard, report: dict[str, Any], engine: Path | None
) -> Published | None:
    """The next version in the repository, its card holding the parity summary (None with
    ``--no-publish``)."""
    if not job.cfg.publish:
        return None
    summary = ParitySummary(
        passed=report["passed"],
        forced=report["forced"],
        images=report["images"],
        reference_accuracy=report["reference_top1"],
        stages=report["stages"],
    )
    published = publish_into(job, Path(job.cfg.repository), card.replace(parity=summary), engine)
    target = published.classifier
    keep_report(job.out_dir, target / "report")
    log.info(
        "published %s version %s (%s) -> %s", job.name, target.name, job.cfg.serving.kind, target
    )
    if report["forced"]:
        log.warning("WARNING: published despite failed parity (--force); recorded in the card")
    return published


REPORT_FILES = ("parity.json", "parity.md", "parity.png")


def keep_report(run_dir: Path, record: Path) -> None:
    """The version's own copy of its parity report (``<version>/report/``), so an older
    version's report survives the next export (the run folder keeps only the latest)."""
    record.mkdir(exist_ok=True)
    for name in REPORT_FILES:
        if (run_dir / name).is_file():
            atomic_write_bytes(record / name, (run_dir / name).read_bytes())
    for found in run_dir.glob("localize-*"):  # a failed stage's layer-by-layer report
        atomic_write_bytes(record / found.name, found.read_bytes())
    copy_bundle(run_dir / BUNDLE_DIR, record / BUNDLE_DIR)


def deploy_release(
    job: ExportJob, published: Published | None, report: dict[str, Any]
) -> dict[str, Any] | None:
    """With ``--deploy URL``: load the new version on that server and measure its served
    accuracy (recorded in the card). Never implied by a port that happens to answer."""
    if not job.cfg.deploy or published is None:
        return None
    from export.triton.deploy import deploy_and_measure

    served = deploy_and_measure(
        job.cfg.deploy,
        job.name,
        published.classifier,
        job.data,
        job.cfg.split,
        report["reference_top1"],
        job.cfg.admin_key_file or None,
    )
    log.info("deployed to %s: %s", job.cfg.deploy, served.get("note") or served["status"])
    return served


def summary(
    report: dict[str, Any], published: Published | None, served: dict[str, Any] | None
) -> dict[str, Any]:
    """What :func:`export.pipeline.release.run_export` returns: the parity report, plus
    where the version went (``published``) and what the server measured (``served``)."""
    result = dict(report)
    if published is not None:
        result["published"] = str(published.classifier)
    if served is not None:
        result["served"] = served
    return result
