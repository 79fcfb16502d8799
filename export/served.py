"""After publishing: if a Triton server is up on this repository, load the new version
(explicit model control) and record its served accuracy in the version's model card."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from train.checkpoint import atomic_write_bytes


def default_server_url() -> str:
    return f"127.0.0.1:{os.environ.get('GRPC_PORT', '8001') or '8001'}"


def deploy_and_measure(
    url: str, name: str, version_dir: Path, data: str, split: str, in_process_top1: float
) -> dict[str, Any]:
    """Load ``name`` (+ its image pipeline) on the live server and evaluate the raw-image
    ensemble on ``data/split``; the result is also written into the model card."""
    from serve import admin
    from serve.client import Classifier, ClientError
    from serve.evaluate import evaluate_served

    result: dict[str, Any] = {"url": url}
    try:
        admin.list_models(url)
    except ClientError as e:
        return {**result, "status": "no server", "note": str(e)}
    version = int(version_dir.name)
    try:
        for model in (name, f"{name}_preprocess", f"{name}_image"):
            admin.load(url, model)
        loaded = admin.ready_versions(url, name)
        if version not in loaded:
            return {
                **result,
                "status": "skipped",
                "note": f"the server at {url} loaded "
                f"versions {loaded} of {name}, not {version}: it serves another repository",
            }
        folder = Path(data) / split
        if not folder.is_dir():
            return {
                **result,
                "status": "loaded",
                "note": f"served accuracy needs an ImageFolder split; {folder} is not one",
            }
        with Classifier(url, f"{name}_image") as clf:
            ev = evaluate_served(clf, folder)
    except ClientError as e:
        return {**result, "status": "failed", "note": str(e)}
    result.update(
        status="measured",
        model=f"{name}_image",
        version=version,
        accuracy=ev.accuracy,
        images=len(ev.paths),
        errors=len(ev.errors),
        in_process_top1=in_process_top1,
        equal_to_in_process=abs(ev.accuracy - in_process_top1) < 1e-12,
        per_class=ev.per_class(),
    )
    card_path = version_dir / "model_card.json"
    card = json.loads(card_path.read_text())
    card["served"] = result
    atomic_write_bytes(card_path, lambda f: f.write((json.dumps(card, indent=2) + "\n").encode()))
    return result
