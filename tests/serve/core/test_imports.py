"""The house has one direction: train -> serve.core and serve.backend, export -> train and
serve, and inside serve, export and train their rooms in layers (serve: backend -
self-contained, it runs inside Triton - core, client, runtime, tools, deploy on core;
export: checks, formats, triton, pipeline, tools, cli; train: config, data, models, run,
tools, cli); serve imports neither train nor export, no module is in an import circle, and
every serve module imports with torch absent."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGES = ("train", "export", "serve")
# Which rooms a room may import: serve's sub-packages stand in layers (core at the
# bottom: the kernel every stage shares; then the clients; the server runtime; the
# tools that measure it), deploy stands on core alone, and serve's own top (cli.py,
# __main__.py) over all of them; serve.backend under everything (the code Triton runs,
# self-contained). train may use only serve.backend and serve.core.
SERVE_ROOMS = (
    "serve.backend",
    "serve.core",
    "serve.client",
    "serve.runtime",
    "serve.tools",
    "serve.deploy",
)
BASE = {"serve.backend", "serve.core"}
# train's rooms, bottom first: the config (torch-free: the Makefile reads a recipe
# setting through it), the data, the models (archs, weights, the checkpoint file), the
# run (its state and functions), the research tools over the run; train/cli.py (and
# __main__, __init__) over all of them. Each may import the rooms below it and BASE.
TRAIN_LAYERS = (
    "train.config",
    "train.data",
    "train.models",
    "train.run",
    "train.tools",
)
TRAIN_ROOMS = {room: {*TRAIN_LAYERS[: i + 1], *BASE} for i, room in enumerate(TRAIN_LAYERS)}
# export's rooms, bottom first: measuring and judging (checks), the model files (formats),
# the model repository (triton), the export run (pipeline), the tools around it, the CLI
# over all of them. Each may import the rooms below it, train's and serve's.
EXPORT_LAYERS = (
    "export.checks",
    "export.formats",
    "export.runners",
    "export.triton",
    "export.pipeline",
    "export.tools",
    "export.cli",
)
EXPORT_ROOMS = {
    room: {*EXPORT_LAYERS[: i + 1], "train", *TRAIN_LAYERS, "serve", *SERVE_ROOMS}
    for i, room in enumerate(EXPORT_LAYERS)
}
ROOMS = (*SERVE_ROOMS, *EXPORT_LAYERS, *TRAIN_LAYERS)
ALLOWED = {
    "serve.backend": {"serve.backend"},
    "serve.core": BASE,
    "serve.client": {*BASE, "serve.client"},
    "serve.runtime": {*BASE, "serve.client", "serve.runtime"},
    "serve.tools": {*BASE, "serve.client", "serve.runtime", "serve.tools"},
    "serve.deploy": {*BASE, "serve.deploy"},
    "serve": {"serve", *SERVE_ROOMS},
    **TRAIN_ROOMS,
    "train": {"train", *TRAIN_LAYERS, *BASE},  # train/cli.py, __init__.py, __main__.py
    **EXPORT_ROOMS,
    "export": {"export", "export.cli"},  # export/__init__.py, __main__.py
}
MODULES = {
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
    for package in PACKAGES
    for p in sorted((ROOT / package).rglob("*.py"))
}
# The Triton models need Triton's stub module (triton_python_backend_utils) to import.
TRITON_ONLY = {"serve.backend.classifier_model", "serve.backend.preprocess_model"}
SERVE_MODULES = sorted(
    m
    for m in MODULES
    if m.startswith("serve") and not m.endswith("__main__") and m not in TRITON_ONLY
)


def _room(module: str) -> str:
    """The room a module of ours belongs to: ``serve.core`` for serve/core/files.py,
    ``export.checks`` for export/checks/parity.py, ``serve`` for serve/cli/run.py,
    ``train.run`` for train/run/trainer.py, ``train`` for train/cli.py."""
    parts = module.split(".")
    if len(parts) > 1 and ".".join(parts[:2]) in ROOMS:
        return ".".join(parts[:2])
    return parts[0]


def _imports(path: Path) -> set[str]:
    """The modules of ours that a file imports (anywhere in it, lazy imports too):
    ``from serve.core import auth`` is serve.core.auth, ``from serve.core import X``
    (a name) is serve.core."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in MODULES else node.module)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def test_import_graph_has_one_direction() -> None:
    """Every import goes down: train -> serve.core, serve.backend; export -> train, serve;
    inside serve backend <- core <- client <- runtime <- tools, deploy -> core; inside
    export checks <- formats <- runners <- triton <- pipeline <- tools <- cli."""
    assert {"serve.core.card", "serve.runtime.stack", "train.run.trainer"} <= MODULES.keys()
    assert {"export.checks.parity", "export.pipeline.release"} <= MODULES.keys()
    stray = [m for m in MODULES if m.startswith("export.") and _room(m) == "export"]
    assert stray == ["export.__main__"], f"export modules outside a room: {stray}"
    wrong = []
    for module, path in MODULES.items():
        allowed = ALLOWED[_room(module)]
        for target in sorted(_imports(path)):
            if _room(target) not in allowed:
                wrong.append(f"{module} imports {target}")
    assert not wrong, wrong


def test_no_import_circles() -> None:
    """No module imports (through any chain, lazy imports included) one that imports it
    back, inside a package or across."""
    graph = {m: _imports(p) & MODULES.keys() for m, p in MODULES.items()}
    circles, state = [], {}

    def visit(module: str, chain: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                circles.append(chain[chain.index(target) :] + [target])
            elif target not in state:
                visit(target, [*chain, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, circles


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


def test_the_backend_runs_whole_in_a_version_folder(tmp_path: Path) -> None:
    """serve/backend is copied whole into each python-backend version, which Triton
    imports as a package named for the version (``3.model``), with no ``serve`` package:
    its files import only each other (relatively), the standard library and third-party
    packages, and there they decode and refuse images with the project's error root."""
    import shutil

    backend = ROOT / "serve" / "backend"
    ours = []
    for path in sorted(backend.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            ours += [f"{path.name}: {n}" for n in names if n.split(".")[0] in PACKAGES]
    assert not ours, f"serve/backend must import its own files relatively: {ours}"
    version = tmp_path / "model" / "3"
    version.mkdir(parents=True)
    for path in backend.glob("*.py"):
        shutil.copy(path, version / path.name)
    code = (
        "import importlib, sys; sys.modules['serve'] = None\n"  # `import serve` fails
        "sys.path.append(sys.argv[1])\n"  # as Triton's stub: the model folder
        "m = importlib.import_module('3.model')\n"
        "p = importlib.import_module('3.preprocess')\n"
        "d = importlib.import_module('3.isolated_decode')\n"
        "e = importlib.import_module('3.errors')\n"
        "assert issubclass(p.ImageError, e.UserError) and issubclass(p.ImageError, ValueError)\n"
        "assert issubclass(p.DecodeBusy, RuntimeError) and d.pre is p\n"
        "try:\n    p.preprocess(b'not an image', p.ResizeCrop(8, 8))\n"
        "except e.UserError as x:\n    print('ImageError:', x)\n"
        "try:\n    d.preprocess_bounded(b'not an image', p.ResizeCrop(8, 8), p.Limits(), None)\n"
        "except p.ImageError as x:\n    print('bounded ImageError:', x)\n"
        "try:\n    p.ResizeCrop(8, 16)\n"
        "except e.UsageError as x:\n    print(type(x).__name__, x)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(version.parent)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ImageError: <12 bytes>: not a readable image: not one of the served" in proc.stdout
    assert "bounded ImageError: <12 bytes>: not a readable image" in proc.stdout
    assert "UsageError need 0 < crop (16) <= resize (8)" in proc.stdout


def test_every_name_a_package_face_lists_imports() -> None:
    """``from serve.client import AsyncClassifier`` and the like (the package faces of
    serve/core/exports.py) resolve for every name they list, from its defining module."""
    import importlib
    import pkgutil

    import export
    import serve
    import train

    broken = []
    for pkg in (serve, export, train):
        names = [pkg.__name__]
        names += [
            m.name for m in pkgutil.walk_packages(pkg.__path__, f"{pkg.__name__}.") if m.ispkg
        ]
        for name in names:
            module = importlib.import_module(name)
            for attr in getattr(module, "__all__", []):
                try:
                    getattr(module, attr)
                except (AttributeError, ImportError) as e:
                    broken.append(f"{name}.{attr}: {e}")
    assert not broken, broken


# pyplot with the headless backend chosen before its first import (serve/core/plots.py)
FROM_ELSEWHERE = {"serve.core.plots.plt"}


def _defined(path: Path) -> set[str]:
    """The names a module defines at its top level (functions, classes, assignments)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        targets = node.targets if isinstance(node, ast.Assign) else []
        targets += [node.target] if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            elts = target.elts if isinstance(target, ast.Tuple) else [target]
            names |= {e.id for e in elts if isinstance(e, ast.Name)}
    return names


def test_each_name_is_imported_from_the_module_that_defines_it() -> None:
    """No module hands on another module's names: ``from serve.runtime.stack import
    FrontLimits`` would make stack a second home of limits' class. Package faces
    (``__init__``) are the exception by design (they point at the defining modules)."""
    files = [*MODULES.values(), *sorted((ROOT / "tests").rglob("*.py"))]
    wrong = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module):
                continue
            source = MODULES.get(node.module)
            if source is None or source.name == "__init__.py":
                continue  # not ours, or a package face
            defined = _defined(source)
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                if alias.name not in defined and name not in MODULES and name not in FROM_ELSEWHERE:
                    wrong.append(f"{path.relative_to(ROOT)}: {name}")
    assert not wrong, wrong
