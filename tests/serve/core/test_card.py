"""The model card: one schema for every stage, validated on read, no local paths."""

from __future__ import annotations

import copy
import json

import pytest

from serve.core.card import SCHEMA, ModelCard, redact_paths
from serve.core.card_reader import CardError
from serve.core.names import classifier_name, image_model_name, preprocess_model_name
from tests.helpers import example_card


def _card(**kw) -> ModelCard:
    return example_card(
        name="antsbees", arch="efficientnet_lite0", mean=[0.5] * 3, std=[0.5] * 3, **kw
    )


def test_round_trip_through_json() -> None:
    card = _card(gflop_per_image=0.77, files={"model.onnx": "a" * 64})
    data = json.loads(json.dumps(card.to_dict()))
    assert data["schema"] == SCHEMA
    assert ModelCard.from_dict(data) == card
    assert card.input.shape == [3, 224, 224] and card.output.num_classes == 2
    assert card.input.pixel_range == [0.0, 255.0] and card.preprocessing.normalization == "input"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("classes"), "card.classes is missing"),
        (lambda d: d.update(extra=1), "card has unknown keys: extra"),
        (lambda d: d.update(schema="other/9"), "schema 'other/9'"),
        (lambda d: d["preprocessing"].update(mean=[0.5, 0.5]), "mean/std need 3 values"),
        (lambda d: d["preprocessing"].update(crop=300), r"crop \(300\) <= resize \(256\)"),
        (lambda d: d["preprocessing"].update(interpolation="cubic"), "interpolation 'cubic'"),
        (lambda d: d["preprocessing"].update(normalization="x"), "normalization must be"),
        (lambda d: d["preprocessing"].update(resize="256"), "preprocessing.resize must be an int"),
        (lambda d: d["input"].update(shape=[3, 32, 32]), "does not match crop 224"),
        (lambda d: d["input"].update(layout="NHWC"), "NCHW RGB"),
        (lambda d: d["output"].update(num_classes=3), "num_classes 3 != 2 classes"),
        (lambda d: d.update(classes=["a", "a"]), "unique"),
        (lambda d: d.update(precision="int4"), "precision must be one of"),
        (lambda d: d.update(files={"dir/model.onnx": "a" * 64}), "files"),
        (lambda d: d["provenance"]["pretrained"].update(fallback="yes"), "must be true/false"),
        (lambda d: d["metrics"].update(best_val_acc="high"), "metrics.best_val_acc must be a n"),
    ],
)
def test_every_problem_is_named(change, message: str) -> None:
    data = copy.deepcopy(_card().to_dict())
    change(data)
    with pytest.raises(CardError, match=message):
        ModelCard.from_dict(data)


def test_names_and_paths() -> None:
    assert image_model_name("m") == "m_image" and preprocess_model_name("m") == "m_preprocess"
    assert classifier_name("m_image") == classifier_name("m_preprocess") == "m"
    assert classifier_name("m") == "m"
    text = "offline, place resnet18-f37072fd.pth in /root/.cache/torch/hub/checkpoints"
    assert redact_paths(text) == "offline, place resnet18-f37072fd.pth in checkpoints"
    assert redact_paths("../shared/data/hymenoptera_data") == "hymenoptera_data"
    assert redact_paths("akamaster/pytorch_resnet_cifar10 (BSD)") == (
        "akamaster/pytorch_resnet_cifar10 (BSD)"
    )


def test_a_card_file_that_is_not_json_is_a_card_error(tmp_path) -> None:
    """A truncated or hand-edited model_card.json is the user's to fix (exit 2), not a
    JSONDecodeError traceback."""
    path = tmp_path / "model_card.json"
    path.write_text(json.dumps(example_card().to_dict())[:-20])
    with pytest.raises(CardError, match=r"model_card.json is not a JSON model card"):
        ModelCard.read(path)
    path.write_text(json.dumps(example_card().to_dict()))
    assert ModelCard.read(path) == example_card()
