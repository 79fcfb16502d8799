"""Checkpoints: atomic writes under SIGKILL, no code execution on load, the card inside,
the previous format, and what a run does with an OUT that already holds one."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from serve.core.card import ModelCard
from tests.helpers import PY, ROOT, run_cli, wait_until
from train.models.archs import build_model
from train.models.checkpoint import (
    Checkpoint,
    checkpoint_from_model,
    load_checkpoint,
    save_checkpoint,
)


def _card(name: str = "m") -> ModelCard:
    return ModelCard.create(
        name=name, arch="resnet20", classes=["a", "b"], resize=32, crop=32,
        mean=[0.5] * 3, std=[0.25] * 3,
    )  # fmt: skip


def test_checkpoint_write_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"format": "x", "v": torch.ones(2)}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - an unpicklable object makes torch.save fail
        save_checkpoint({"format": "x", "bad": lambda: 0}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp files left


@pytest.mark.slow
def test_training_killed_during_checkpoint_write_keeps_previous(tmp_path: Path) -> None:
    """A process that keeps rewriting a large checkpoint is SIGKILLed at random moments
    after its first complete write; the file on disk is always the last complete one."""
    script = tmp_path / "writer.py"
    script.write_text(
        "import sys, torch\n"
        "from train.models.checkpoint import save_checkpoint\n"
        "i = 0\n"
        "while True:\n"
        "    save_checkpoint({'format': 'x', 'i': i, 'w': torch.full((4_000_000,), float(i))},"
        " sys.argv[1])\n"
        "    i += 1\n"
    )
    path = tmp_path / "checkpoint.pt"
    for delay in (0.05, 0.4, 0.9):
        path.unlink(missing_ok=True)
        proc = subprocess.Popen(
            [sys.executable, str(script), str(path)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            wait_until(path.is_file, 120, "the first complete checkpoint")
            time.sleep(delay)  # the random moment of the kill, not a wait for a condition
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        ckpt = torch.load(path, weights_only=True)
        assert float(ckpt["w"][0]) == ckpt["i"] and float(ckpt["w"][-1]) == ckpt["i"]


def test_checkpoints_load_without_running_code(tmp_path: Path) -> None:
    """weights_only loading refuses a pickle that would execute code."""

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"format": "trainserve.checkpoint/2", "x": Evil()}))
    with pytest.raises(ValueError, match="cannot load checkpoint"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_card_round_trips_and_bad_cards_are_named(tmp_path: Path) -> None:
    model = build_model("resnet20", 2)
    ckpt = checkpoint_from_model(model, _card(), config={"data": "x"})
    save_checkpoint(ckpt, tmp_path / "c.pt")
    back = load_checkpoint(tmp_path / "c.pt")
    assert back.card == ckpt.card and back.config == {"data": "x"}
    data = ckpt.to_dict()
    data["card"]["preprocessing"]["crop"] = 64  # crop > resize
    save_checkpoint(data, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad.pt: card.preprocessing.*crop \(64\) <= resize"):
        load_checkpoint(tmp_path / "bad.pt")
    del data["card"]["classes"]
    save_checkpoint(data, tmp_path / "bad2.pt")
    with pytest.raises(ValueError, match=r"card.classes is missing"):
        load_checkpoint(tmp_path / "bad2.pt")


@pytest.mark.slow
def test_previous_checkpoint_format_still_loads(tmp_path: Path) -> None:
    model = build_model("resnet20", 2)
    legacy = {
        "format": "trainserve.checkpoint/1",
        "model_name": "old",
        "arch": "resnet20",
        "arch_options": {"batchnorm": True},
        "num_classes": 2,
        "classes": ["a", "b"],
        "preprocess": {"resize": 32, "crop": 32, "mean": [0.5] * 3, "std": [0.5] * 3,
                       "interpolation": "bilinear", "augment": "pad-crop", "padding": 4},
        "pretrained": {"requested": "none", "arch": "resnet20", "source": "random init"},
        "metrics": {"best_val_acc": 0.5, "best_epoch": 3, "best": {"epoch": 3}},
        "state_dict": model.state_dict(),
        "epoch": 3,
        "config": {"data": "d"},
    }  # fmt: skip
    save_checkpoint(legacy, tmp_path / "old.pt")
    ckpt = load_checkpoint(tmp_path / "old.pt")
    assert isinstance(ckpt, Checkpoint)
    assert ckpt.card.name == "old" and ckpt.card.arch_options == {"batchnorm": True}
    assert ckpt.card.metrics.best_val_acc == 0.5 and ckpt.best == {"epoch": 3}
    assert ckpt.augment == {"augment": "pad-crop", "padding": 4}


def _train(out: Path, data: Path, *extra: str, check: bool = True):
    return run_cli(
        "train", "--recipe", "cifar10_resnet20", "--data", str(data), "--out", str(out),
        "--epochs", "1", "--train-subset", "64", "--val-subset", "32", "--batch-size", "32",
        "--workers", "0", *extra, check=check,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.long
def test_a_fresh_run_refuses_an_out_with_checkpoints(tmp_path: Path) -> None:
    """Run again with the same settings (`make train export` twice): the finished run is
    kept and nothing trains. With other settings, or over an unfinished run: refused."""
    from tests.helpers import CIFAR

    out = tmp_path / "run"
    _train(out, CIFAR)
    first = (out / "checkpoint.pt").read_bytes()
    metrics = (out / "metrics.jsonl").read_text()
    stale = out / f".last.pt.{2**22 + 7}.deadbeef.tmp"  # a killed writer's temp file
    stale.write_bytes(b"partial")
    proc = _train(out, CIFAR)
    assert "already holds a finished run of these exact settings" in proc.stderr
    assert "nothing to train" in proc.stderr and "--overwrite" in proc.stderr
    assert (out / "checkpoint.pt").read_bytes() == first
    assert (out / "metrics.jsonl").read_text() == metrics
    proc = _train(out, CIFAR, "--lr", "0.05", check=False)
    assert proc.returncode == 2 and "already holds checkpoint.pt, last.pt" in proc.stderr
    assert "other settings (lr: 0.1 -> 0.05)" in proc.stderr
    assert "--resume" in proc.stderr and "--overwrite" in proc.stderr
    assert (out / "checkpoint.pt").read_bytes() == first and stale.exists()
    (out / "summary.json").unlink()  # as if killed before the end: resume, not skip
    proc = _train(out, CIFAR, check=False)
    assert proc.returncode == 2 and "earlier run (unfinished)" in proc.stderr
    proc = _train(out, CIFAR, "--overwrite")
    assert not stale.exists()  # cleaned at start
    assert "removed" in proc.stderr
    assert load_checkpoint(out / "last.pt").epoch == 1


@pytest.mark.slow
def test_best_checkpoint_is_written_before_last(tmp_path: Path, monkeypatch) -> None:
    """On an improving epoch checkpoint.pt is saved first: a kill between the two writes
    leaves last.pt behind, never ahead of a missing best."""
    from train.run import outputs as run_outputs

    order: list[str] = []
    monkeypatch.setattr(run_outputs, "save_checkpoint", lambda c, p: order.append(Path(p).name))
    monkeypatch.setattr(run_outputs, "plot_curves", lambda *a, **k: None)
    outputs = run_outputs.RunOutputs(tmp_path, resuming=False, overwrite=False)
    outputs.start({}, [])
    ckpt = checkpoint_from_model(build_model("resnet20", 2), _card())
    outputs.epoch({"epoch": 1}, ckpt, improved=True, title="t")
    outputs.epoch({"epoch": 2}, ckpt, improved=False, title="t")
    assert order == ["checkpoint.pt", "last.pt", "last.pt"]


def _limit_file_size(limit: int):
    """preexec_fn: files may not grow past ``limit`` bytes (EFBIG, like a full disk) and
    the signal that would kill the writer is ignored, so it sees the error."""

    def apply() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_a_failing_checkpoint_write_is_one_clear_line(tmp_path: Path) -> None:
    """A checkpoint that cannot be written (the file-size limit stands in for a full
    disk, which works as root too) stops the run with exit 2, one line naming the file,
    no traceback, and no temp file left behind."""
    from tests.helpers import CIFAR

    out = tmp_path / "run"
    cmd = [PY, "-m", "train", "--recipe", "cifar10_resnet20", "--data", str(CIFAR), "--out",
           str(out), "--epochs", "1", "--train-subset", "64", "--val-subset", "32",
           "--batch-size", "32", "--workers", "0"]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
        preexec_fn=_limit_file_size(256 << 10),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot write" in proc.stderr and "checkpoint.pt" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
