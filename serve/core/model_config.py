"""``config.pbtxt`` written and read in one place: Triton's ``ModelConfig`` protobuf in
text format, parsed strictly (an unknown field is an error). The export writes with
:func:`config_text`; the runtime's limits, the deploy manifests and the tools read with
:func:`read_config` (as pytriton pairs its model-config generator with its parser)."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from serve.backend.errors import UsageError


def config_text(cfg: mc.ModelConfig) -> str:
    """Protobuf text format, as Triton reads it."""
    return str(text_format.MessageToString(cfg))


def parse_config(text: str) -> mc.ModelConfig:
    """Strict parse of a config.pbtxt's text (unknown fields are errors)."""
    return text_format.Parse(text, mc.ModelConfig())


def read_config(path: str | Path) -> mc.ModelConfig:
    """A model's ``config.pbtxt``, parsed strictly; a broken one names the file."""
    path = Path(path)
    try:
        return parse_config(path.read_text())
    except text_format.ParseError as e:
        raise UsageError(f"{path}: not a valid Triton model config: {e}") from e
