"""``python -m train probe-cv``: cross-validate the linear-probe choices in seconds.

The frozen offline backbone's features of the TRAINING images (eval view + 2 augmented
views, RandomResizedCrop scale (0.25, 1)) are computed once; then each candidate head
(random init or the ImageNet ant/bee rows; lr; epochs) is scored by stratified 3-fold
cross-validation on them, over 3 seeds. Val is only reported for the record (each
candidate trained on all training images), never used to choose. This is how the
default recipe's ``head_init`` and ``lp_lr`` were chosen (docs/results.md); ``python -m train cv``
does the same for whole training runs (slower).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from serve.core.files import atomic_write_json
from train.data.datasets import image_folder
from train.data.preprocess import Preprocess
from train.models.archs import build_model, get_head
from train.models.pretrained import OFFLINE_MEAN, OFFLINE_STD, efficientnet_lite0_state_dict
from train.tools.kfold import stratified_indices

log = logging.getLogger(__name__)
ANT_BEE = [310, 309]  # ImageNet "ant", "bee" in class order (ants, bees)
CANDIDATES: dict[str, dict[str, Any]] = {
    "zero-shot (ImageNet rows)": {"init": True, "lr": 0.01, "epochs": 0},
    "LP random init, lr 0.01": {"init": False, "lr": 0.01, "epochs": 10},
    "LP random init, lr 0.03, 20 ep": {"init": False, "lr": 0.03, "epochs": 20},
    "LP ImageNet rows, lr 0.01": {"init": True, "lr": 0.01, "epochs": 10},
    "LP ImageNet rows, lr 0.001": {"init": True, "lr": 0.001, "epochs": 10},
    "LP ImageNet rows, lr 0.003, 20 ep": {"init": True, "lr": 0.003, "epochs": 20},
}


def features(data: Path, views: int = 2) -> dict[str, Any]:
    """Backbone features: val, train (eval view), train (``views`` augmented), head rows."""
    model = build_model("efficientnet_lite0", 1000)
    state, _ = efficientnet_lite0_state_dict(model)
    model.load_state_dict(state)
    classifier = get_head(model, "efficientnet_lite0")
    head = (classifier.weight.detach().clone(), classifier.bias.detach().clone())
    model.classifier = nn.Identity()
    model.eval().to(memory_format=torch.channels_last)
    pre = Preprocess(mean=OFFLINE_MEAN, std=OFFLINE_STD, rrc_scale=(0.25, 1.0))

    @torch.no_grad()
    def run(split: str, transform: Any, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)
        xs, ys = [], []
        for x, y in DataLoader(image_folder(data, split, transform), batch_size=64):
            xs.append(model(x.contiguous(memory_format=torch.channels_last)))
            ys.append(y)
        return torch.cat(xs), torch.cat(ys)

    return {
        "head": head,
        "val": run("val", pre.eval_transform()),
        "train": run("train", pre.eval_transform()),
        "views": [run("train", pre.train_transform(), s)[0] for s in range(1, views + 1)],
    }


def train_head(
    f: dict[str, Any], idx: list[int], init: bool, lr: float, epochs: int, seed: int
) -> nn.Linear:
    """The head as the recipe's linear probe trains it (SGD m0.9, cosine, batch 32, LS 0.1)."""
    torch.manual_seed(seed)
    head = nn.Linear(f["train"][0].shape[1], 2)
    if init:
        with torch.no_grad():
            head.weight.copy_(f["head"][0][ANT_BEE])
            head.bias.copy_(f["head"][1][ANT_BEE])
    if not epochs:
        return head
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    rows, y = torch.tensor(idx), f["train"][1]
    gen = torch.Generator().manual_seed(seed)
    for e in range(epochs):
        x = f["views"][e % len(f["views"])]
        order = rows[torch.randperm(len(rows), generator=gen)]
        for k in range(0, len(order), 32):
            i = order[k : k + 32]
            opt.zero_grad()
            loss_fn(head(x[i]), y[i]).backward()
            opt.step()
        sched.step()
    return head


def accuracy(head: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (head(x).argmax(1) == y).float().mean().item()


def run(a: argparse.Namespace) -> int:
    """Compute features, score every candidate, write JSON + PNG, print the table."""
    t0 = time.perf_counter()
    f = features(Path(a.data))
    y = f["train"][1].tolist()
    rows = []
    for name, c in CANDIDATES.items():
        accs = []
        for seed in a.seeds:
            split = stratified_indices(y, a.folds, seed)
            for k in range(a.folds):
                train = [i for j, part in enumerate(split) if j != k for i in part]
                head = train_head(f, train, seed=seed, **c)
                accs.append(accuracy(head, f["train"][0][split[k]], f["train"][1][split[k]]))
        val = [
            accuracy(train_head(f, list(range(len(y))), seed=s, **c), *f["val"]) for s in a.seeds
        ]
        rows.append(
            {
                "candidate": name,
                **c,
                "cv_acc_mean": statistics.fmean(accs),
                "cv_acc_std": statistics.stdev(accs),
                "cv_runs": len(accs),
                "val_acc": val,
            }
        )
        print(
            f"{name:>36}  CV {rows[-1]['cv_acc_mean']:.4f} +- {rows[-1]['cv_acc_std']:.4f}"
            f"  (val {', '.join(f'{v:.4f}' for v in val)})"
        )
    report = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "folds": a.folds,
        "seeds": a.seeds,
        "train_images": len(y),
        "seconds": round(time.perf_counter() - t0, 1),
        "table": rows,
    }
    out = Path(a.out)
    atomic_write_json(out / "probe-cv-latest.json", report)
    plot(report, out / "probe-cv-latest.png")
    return 0


def plot(report: dict[str, Any], path: Path) -> None:
    from serve.core.plots import plt, save_figure

    rows = report["table"]
    fig, ax = plt.subplots(figsize=(9, 4))
    ys = range(len(rows))
    ax.barh(
        list(ys), [r["cv_acc_mean"] for r in rows], xerr=[r["cv_acc_std"] for r in rows], capsize=3
    )
    ax.set_yticks(list(ys), [r["candidate"] for r in rows], fontsize=8)
    ax.set(
        xlim=(0.9, 1.0),
        xlabel=f"held-out accuracy, {report['folds']}-fold CV on the training images x "
        f"{len(report['seeds'])} seeds",
        title="linear probe on the offline backbone's features",
    )
    ax.grid(alpha=0.3, axis="x")
    save_figure(fig, path)
