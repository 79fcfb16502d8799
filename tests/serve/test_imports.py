"""The house has one direction: train -> serve, export -> train and serve; serve imports
neither, and every serve module imports with torch absent."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGES = ("train", "export", "serve")
ALLOWED = {"train": {"train", "serve"}, "export": {"export", "train", "serve"}, "serve": {"serve"}}
SERVE_MODULES = sorted(
    f"serve.{p.stem}" for p in (ROOT / "serve").glob("*.py") if p.stem != "__main__"
)


def _imports(path: Path) -> set[str]:
    """Top-level packages of ours that a module imports (anywhere in the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in PACKAGES}
    return found


def test_import_graph_has_one_direction() -> None:
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).glob("*.py")):
            for target in _imports(path) - allowed:
                wrong.append(f"{package}/{path.name} imports {target}")
    assert not wrong, wrong


@pytest.mark.parametrize("module", SERVE_MODULES)
def test_serve_module_imports_without_torch(module: str) -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"  # `import torch` now raises ImportError
        f"import {module}\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('train', 'export')]\n"
        "sys.exit(f'imported {bad}' if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:] or proc.stdout


def test_serve_cli_commands_work_without_torch() -> None:
    """`python -m serve ... --help` for every command, with torch made unimportable."""
    from serve.cli import COMMANDS

    for command in COMMANDS:
        code = (
            "import sys; sys.modules['torch'] = None\n"
            "from serve.cli import main\n"
            f"sys.argv = ['serve', {command.name!r}, '--help']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    sys.exit(e.code)\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True
        )
        assert proc.returncode == 0 and "usage:" in proc.stdout, (command.name, proc.stderr)


def test_the_preprocess_copy_runs_without_the_serve_package(tmp_path: Path) -> None:
    """serve/preprocess.py is copied as ``image_preprocess.py`` next to the Triton
    preprocess model, where no ``serve`` package exists: its errors keep their builtin
    bases through the stand-ins for serve.errors."""
    import shutil

    shutil.copy(ROOT / "serve" / "preprocess.py", tmp_path / "image_preprocess.py")
    code = (
        "import sys; sys.modules['serve'] = None\n"  # `import serve...` raises ImportError
        "import image_preprocess as p\n"
        "assert issubclass(p.ImageError, ValueError) and issubclass(p.DecodeBusy, RuntimeError)\n"
        "assert issubclass(p.ImageError, p.UserError) and p.UserError.__module__ == p.__name__\n"
        "try:\n    p.preprocess(b'not an image', p.ResizeCrop(8, 8))\n"
        "except p.ImageError as e:\n    print('ImageError:', e)\n"
        "try:\n    p.ResizeCrop(8, 16)\n"
        "except ValueError as e:\n    print(type(e).__name__, e)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ImageError: <12 bytes>" in proc.stdout
    assert "UsageError need 0 < crop (16) <= resize (8)" in proc.stdout
