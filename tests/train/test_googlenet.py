"""GoogLeNet. The Inception modules (naive and 1x1-reduced) are the paper's,
the 32 px network's options and auxiliary classifiers, torchvision's GoogLeNet with its
ImageNet weights (or the offline fallback), and a GoogLeNet trained with auxiliary
classifiers going through export (one output), parity, FP16/INT8 and Triton."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from tests.helpers import CIFAR, OFFLINE_ENV, run_cli
from train.cli import config_from_args
from train.models.archs import arch_options, build_model, drop_aux
from train.models.checkpoint import load_checkpoint
from train.models.cifar import INCEPTION_V1, CifarGoogLeNet, Inception
from train.run.loop import train_one_epoch
from train.run.precision import Precision

WIDTHS_3A = INCEPTION_V1["3a"]  # 64, 96->128, 16->32, pool proj 32


def _conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + cout  # weights + bias (no BatchNorm)


def test_inception_modules_are_the_papers() -> None:
    """Figure 2 of the paper at 3a's widths on 3a's input (192 channels): the naive module
    convolves the full input with 3x3 and 5x5 filters and passes the pooled input through
    (output 64+128+32+192 = 416 channels); the reduced one puts 1x1 reductions before them
    and a 1x1 projection after the pool (64+128+32+32 = 256)."""
    naive = Inception(192, WIDTHS_3A, "naive", batchnorm=False)
    reduced = Inception(192, WIDTHS_3A, "reduced", batchnorm=False)
    assert (naive.out_channels, reduced.out_channels) == (416, 256)
    params = {m: sum(p.numel() for p in m.parameters()) for m in (naive, reduced)}
    assert params[naive] == _conv(192, 64, 1) + _conv(192, 128, 3) + _conv(192, 32, 5)
    assert params[reduced] == (
        _conv(192, 64, 1)
        + _conv(192, 96, 1)
        + _conv(96, 128, 3)
        + _conv(192, 16, 1)
        + _conv(16, 32, 5)
        + _conv(192, 32, 1)
    )
    x = torch.randn(2, 192, 32, 32)
    with torch.no_grad():
        out_n, out_r = naive.eval()(x), reduced.eval()(x)
    assert out_n.shape == (2, 416, 32, 32) and out_r.shape == (2, 256, 32, 32)
    # the naive pool branch is the 3x3/1 max-pool of the input itself, concatenated last
    torch.testing.assert_close(out_n[:, -192:], nn.functional.max_pool2d(x, 3, 1, 1))
    with pytest.raises(ValueError, match="inception must be one of"):
        Inception(192, WIDTHS_3A, "factorized")


def test_googlenet_cifar_options_flags_and_aux() -> None:
    assert arch_options("googlenet_cifar") == {
        "batchnorm": True,
        "inception": "reduced",
        "aux": False,
    }
    with pytest.raises(ValueError, match="no Inception modules.*googlenet_cifar"):
        arch_options("resnet20", inception="naive")
    with pytest.raises(ValueError, match="no auxiliary classifiers.*googlenet_cifar"):
        arch_options("vgg11", aux=True)
    with pytest.raises(ValueError, match="no width option"):
        arch_options("resnet18_cifar", width=0.5)
    assert arch_options("googlenet_cifar", width=0.5)["width"] == 0.5
    cfg = config_from_args(
        [
            "--recipe",
            "cifar10_googlenet",
            "--inception",
            "naive",
            "--aux-weight",
            "0.3",
            "--no-batchnorm",
        ]
    )
    assert (cfg.arch, cfg.inception, cfg.aux_weight, cfg.batchnorm) == (
        "googlenet_cifar",
        "naive",
        0.3,
        False,
    )
    with pytest.raises(ValueError, match="aux_weight must be >= 0"):
        config_from_args(["--recipe", "cifar10_googlenet", "--aux-weight", "-1"])
    plain = build_model("googlenet_cifar", 10, batchnorm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert plain.linear.in_features == 1024  # 5b: 384 + 384 + 128 + 128
    model = build_model("googlenet_cifar", 10, aux=True)
    x = torch.randn(2, 3, 32, 32)
    outs = model.train()(x)
    assert isinstance(outs, tuple) and [o.shape for o in outs] == [(2, 10)] * 3
    assert model.eval()(x).shape == (2, 10)
    keys = set(model.state_dict())
    assert any(k.startswith("aux1.") for k in keys) and any(k.startswith("aux2.") for k in keys)
    drop_aux(model)
    assert not any(k.startswith("aux") for k in model.state_dict())
    assert model.train()(x).shape == (2, 10)  # no auxiliary outputs left to train


def test_auxiliary_classifiers_train_with_their_weight() -> None:
    """One SGD step on real CIFAR images: the auxiliary heads change with --aux-weight > 0,
    stay put with weight 0 (no gradient reaches them), and the loss reported is the main
    classifier's in both cases (same start, same batch: the same number)."""
    import numpy as np

    data = np.load(CIFAR / "test.npz")
    x = torch.from_numpy(data["x"][:8]).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(data["y"][:8]).long()
    results = {}
    for weight in (0.0, 0.3):
        torch.manual_seed(0)
        model = CifarGoogLeNet(10, dropout=0.0, aux=True, width=0.25)
        model.aux1.dropout.p = model.aux2.dropout.p = 0.0
        before = {k: v.clone() for k, v in model.state_dict().items()}
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        precision = Precision(torch.device("cpu"), "none", False)
        result = train_one_epoch(
            model,
            [(x, y)],
            nn.CrossEntropyLoss(),
            opt,
            precision,
            precision.scaler(),
            aux_weight=weight,
        )
        after = model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        results[weight] = (result.loss, changed)
    (loss0, changed0), (loss3, changed3) = results[0.0], results[0.3]
    assert loss0 == pytest.approx(loss3, rel=1e-6)
    assert not any(k.startswith(("aux1.fc", "aux2.fc")) for k in changed0)
    assert {"aux1.fc2.weight", "aux2.fc2.weight", "aux1.conv.0.weight"} <= changed3
    assert "linear.weight" in changed0 and "linear.weight" in changed3


def _googlenet_weights() -> tuple[Path, str]:
    from torchvision.models import GoogLeNet_Weights

    name = Path(GoogLeNet_Weights.IMAGENET1K_V1.url).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    return cached, (
        f"torchvision GoogLeNet ImageNet weights absent offline: place {name} in "
        f"{cached.parent} (or set TORCH_HOME) to run this test"
    )


@pytest.mark.slow
def test_googlenet_imagenet_weights_call_ants_ants(hymenoptera: Path) -> None:
    """ARCH=googlenet PRETRAINED=imagenet: torchvision's GoogLeNet_Weights.IMAGENET1K_V1 load
    into the model (auxiliary tensors dropped) and call the val ants ImageNet ants (310).
    Runs where the weights are in the torch hub cache; skips here with the reason."""
    cached, why = _googlenet_weights()
    if not cached.is_file():
        pytest.skip(why)
    from train.data.datasets import dataset_split
    from train.data.preprocess import Preprocess
    from train.models.pretrained import resolve_pretrained

    model, info = resolve_pretrained("googlenet", "imagenet", 1000)
    assert info.arch == "googlenet" and "GoogLeNet_Weights" in info.source
    state = torch.load(cached, map_location="cpu", weights_only=True)
    torch.testing.assert_close(model.state_dict()["conv1.conv.weight"], state["conv1.conv.weight"])
    pre = Preprocess(resize=256, crop=224, augment="random-resized-crop")
    ds = dataset_split(hymenoptera, "val", pre.eval_transform())
    ants = torch.stack([ds[i][0] for i in range(len(ds)) if ds[i][1] == 0][:16])
    with torch.no_grad():
        top = model.eval()(ants).argmax(1)
    assert (top == 310).float().mean() >= 0.5


@pytest.mark.slow
def test_googlenet_auto_falls_back_offline_with_the_banner(
    tmp_path: Path, hymenoptera: Path
) -> None:
    """ARCH=googlenet PRETRAINED=auto without the weights: like ResNet-18, it switches to the
    offline ImageNet backbone, says so in the banner and records it in the checkpoint."""
    out = tmp_path / "g"
    proc = run_cli(
        "train",
        "--data",
        str(hymenoptera),
        "--out",
        str(out),
        "--arch",
        "googlenet",
        "--mode",
        "feature-extract",
        "--epochs",
        "1",
        "--train-subset",
        "16",
        "--val-subset",
        "16",
        "--feature-views",
        "1",
        "--workers",
        "0",
        "--download-timeout",
        "5",
        env={**OFFLINE_ENV, "TORCH_HOME": str(tmp_path / "th")},
    )
    assert "googlenet ImageNet weights unavailable" in proc.stderr
    assert "torchvision GoogLeNet ImageNet weights unavailable" in proc.stderr
    assert "googlenet-1378be20.pth" in proc.stderr  # where to put the file offline
    card = load_checkpoint(out / "checkpoint.pt").card
    assert card.arch == "efficientnet_lite0"
    assert card.provenance.pretrained.fallback is True
    assert "googlenet" in card.provenance.pretrained.note


@pytest.mark.server
@pytest.mark.long
def test_googlenet_with_aux_trains_exports_one_output_and_is_served(tmp_path: Path) -> None:
    """`make train RECIPE=cifar10_googlenet TRAIN_ARGS="--aux-weight 0.3"` (shrunk) then
    `make export`: the auxiliary classifiers are in the checkpoint, not in the graph (one
    output, no auxiliary weights), the graph's concatenations and pools run in ONNX
    Runtime at FP32 parity, the FP16 and INT8 stages report, and the real tritonserver
    serves ONNX Runtime's outputs over HTTP, gRPC and the raw-image ensemble."""
    run = tmp_path / "run"
    run_cli(
        "train",
        "--recipe",
        "cifar10_googlenet",
        "--aux-weight",
        "0.3",
        "--width",
        "0.25",  # the wiring is the point, not accuracy
        "--train-subset",
        "128",
        "--val-subset",
        "64",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--lr",
        "0.02",
        "--workers",
        "0",
        "--out",
        str(run),
    )
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt.card.arch == "googlenet_cifar"
    assert ckpt.card.arch_options == {
        "batchnorm": True,
        "inception": "reduced",
        "aux": True,
        "width": 0.25,
        "dropout": 0.4,  # the recipe's (the paper's)
    }
    assert {"aux1.fc2.weight", "aux2.fc2.weight"} <= set(ckpt.state_dict)
    assert ckpt.config["aux_weight"] == 0.3
    repo, out = tmp_path / "repo", tmp_path / "out"
    run_cli(
        "export",
        "--checkpoint",
        str(run / "checkpoint.pt"),
        "--name",
        "gnet",
        "--data",
        str(CIFAR),
        "--model-repository",
        str(repo),
        "--out-dir",
        str(out),
        "--parity-limit",
        "64",
        "--advisory",  # every reduced precision, INT8 included, on all 64 images
        "all",
        "--calibration-count",
        "32",
        "--workers",
        "0",
    )
    graph = onnx.load(str(repo / "gnet" / "1" / "model.onnx"))
    assert len(graph.graph.output) == 1
    assert list(graph.graph.output[0].type.tensor_type.shape.dim)[1].dim_value == 10
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("Concat") == 9  # one per Inception module
    assert ops.count("MaxPool") == 9 + 2  # a pool branch per module, two between stages
    # the graph holds exactly the weights of the network without its auxiliary heads
    weights = sum(int(torch.tensor(t.dims).prod()) for t in graph.graph.initializer)
    no_aux = build_model("googlenet_cifar", 10, width=0.25).eval()
    n_main = sum(p.numel() for p in no_aux.parameters())
    n_aux = sum(p.numel() for k, p in ckpt.state_dict.items() if k.startswith("aux"))
    assert n_aux > 200_000  # what would be left in a graph that kept them
    # BatchNorm folds into the convolutions: the counts differ by a few thousand, not n_aux
    assert abs(weights - n_main) < 20_000
    assert not [t.name for t in graph.graph.initializer if "aux" in t.name]
    report = json.loads((out / "parity.json").read_text())
    by_name = {s["name"]: s for s in report["stages"]}
    fp32 = by_name["onnxruntime-fp32"]
    assert fp32["status"] == "passed" and fp32["images"] == 64
    assert fp32["top1_agreement"] == 1.0 and fp32["max_abs"] <= 1e-3
    for name in ("onnxruntime-fp16", "pytorch-fp16", "onnxruntime-int8"):
        assert by_name[name]["status"] in ("passed", "failed"), by_name[name]
        assert by_name[name]["images"] == 64
    for protocol in ("http", "grpc", "image"):
        served = by_name[f"triton-{protocol}"]
        assert served["status"] == "passed" and served["max_abs"] == 0.0, served
        assert served["images"] == 64


def test_module_flops_are_the_convolutions_multiply_adds() -> None:
    """`python -m train modules` counts 2 FLOPs per multiply-add of every convolution: for
    3a on 32x32 that is 2 * 1024 * (192*64 + 192*128*9 + 192*32*25) naive, and the
    reduced module's own sum; its rows give naive/reduced ratios from the same run."""
    from train.tools.inception_modules import count_flops, ratios

    hw = 32 * 32
    naive = Inception(192, WIDTHS_3A, "naive")
    reduced = Inception(192, WIDTHS_3A, "reduced")
    assert count_flops(naive, (192, 32, 32)) == 2 * hw * (192 * 64 + 192 * 128 * 9 + 192 * 32 * 25)
    macs = 192 * 64 + 192 * 96 + 96 * 128 * 9 + 192 * 16 + 16 * 32 * 25 + 192 * 32
    assert count_flops(reduced, (192, 32, 32)) == 2 * hw * macs
    rows = [
        {"what": "m", "inception": k, "params": p, "flops_per_image": f, **speed}
        for k, p, f, speed in (
            ("naive", 30, 80, {"train_images_per_s": 1.0, "infer_images_per_s": 2.0}),
            ("reduced", 10, 20, {"train_images_per_s": 4.0, "infer_images_per_s": 4.0}),
        )
    ]
    assert ratios(rows) == [
        {"what": "m", "params": 3.0, "flops": 4.0, "train_speed": 0.25, "infer_speed": 0.5}
    ]
