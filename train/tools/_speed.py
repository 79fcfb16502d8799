"""What the training-speed measurements share (``python -m train bench`` and ``modules``):
the machine they ran on, and images/s of training and inference steps."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn


def torch_machine() -> dict[str, Any]:
    """The machine a training benchmark ran on: CPU, cores, torch and its threads, GPU,
    and the load average (over the core count: other work shared the CPU)."""
    from serve.core.machine import cpu_model

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": str(torch.__version__),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_1m": round(os.getloadavg()[0], 2),  # > cores: other work shares the CPU
    }


def throughput(
    model: nn.Module, shape: tuple[int, ...], batch: int, steps: int, classes: int = 0
) -> dict[str, float]:
    """Training (forward, backward, SGD step) and inference images/s after one warm-up
    step each. ``classes``: cross-entropy on random labels; 0: the mean square of the
    output (a module alone)."""
    x = torch.randn(batch, *shape)
    y = torch.randint(0, max(classes, 1), (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)

    def loss_of(out: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, y) if classes else out.square().mean()

    model.train()
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        opt.zero_grad()
        loss_of(model(x)).backward()
        opt.step()
    train = batch * steps / (time.perf_counter() - t0)
    model.eval()
    with torch.inference_mode():
        model(x)
        t0 = time.perf_counter()
        for _ in range(steps):
            model(x)
        infer = batch * steps / (time.perf_counter() - t0)
    return {"train_images_per_s": round(train, 2), "infer_images_per_s": round(infer, 2)}
