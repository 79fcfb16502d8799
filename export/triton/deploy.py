"""``--deploy URL``: load a just-published version on a live server (explicit model
control) and record its served accuracy in the version's model card. Only when asked:
a server that happens to answer on a port is never deployed to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serve.client import admin
from serve.client.client import Classifier
from serve.client.evaluate import evaluate_served
from serve.core.card import ModelCard
from serve.core.errors import ClientError
from serve.core.files import atomic_write_json
from serve.core.names import image_model_name, preprocess_model_name


def deploy_and_measure(
    url: str,
    name: str,
    version_dir: Path,
    data: str,
    split: str,
    in_process_top1: float,
    admin_key_file: str | None = None,
) -> dict[str, Any]:
    """Load ``name`` (+ its image pipeline) on the server at ``url`` and evaluate the
    raw-image ensemble on ``data/split``; the result also goes into the model card.
    Raises ClientError when the server cannot be reached or refuses."""
    from serve.core import auth

    key = auth.resolve_key(url, admin_key_file)
    version = int(version_dir.name)
    for model in (name, preprocess_model_name(name), image_model_name(name)):
        admin.load(url, model, key=key)
    loaded = admin.ready_versions(url, name, key)
    if version not in loaded:
        raise ClientError(
            f"the server at {url} loaded versions {loaded} of {name}, not {version}: "
            "it serves another repository"
        )
    result: dict[str, Any] = {"url": url, "status": "loaded", "version": version}
    folder = Path(data) / split
    if not folder.is_dir():
        result["note"] = f"served accuracy needs an ImageFolder split; {folder} is not one"
        return result
    with Classifier(url, image_model_name(name)) as clf:
        ev = evaluate_served(clf, folder)
    result.update(
        status="measured",
        model=image_model_name(name),
        accuracy=ev.accuracy,
        images=len(ev.paths),
        errors=len(ev.errors),
        in_process_top1=in_process_top1,
        equal_to_in_process=abs(ev.accuracy - in_process_top1) < 1e-12,
        per_class=ev.per_class(),
        note=f"served accuracy {ev.accuracy:.4f} on {len(ev.paths)} images "
        f"(in-process {in_process_top1:.4f})",
    )
    card_path = version_dir / "model_card.json"
    card = ModelCard.read(card_path)
    atomic_write_json(card_path, card.replace(served=result).to_dict())
    return result


__all__ = ["deploy_and_measure"]
