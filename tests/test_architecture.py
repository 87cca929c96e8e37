"""The import-layer contracts in ``pyproject.toml`` hold, and they catch a wrong-way import.

``make lint``, CI and pre-commit run ``lint-imports`` on the contracts ``[tool.importlinter]``
declares. These tests run the same tool: on the tree itself (every declared contract is checked
and kept, and the contracts are the architecture's: the layer order and the MiniGPT-5 seam), and
on a copy of the package with wrong-way imports planted in it, which it must name, including one
made lazily inside a function.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from importlinter.api import read_configuration

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
# Top to bottom; a module may import only from its own layer or those below it.
LAYERS = [
    "lvlm_tune.cli | lvlm_tune.train",
    "lvlm_tune.commands | lvlm_tune.demo",
    "lvlm_tune.testing",
    "lvlm_tune.inference",
    "lvlm_tune.generation",
    "lvlm_tune.training",
    "lvlm_tune.models",
    "lvlm_tune.data",
    "lvlm_tune.templates",
    "lvlm_tune.errors",
]
CORE = ["lvlm_tune.templates", "lvlm_tune.data", "lvlm_tune.models", "lvlm_tune.training",
        "lvlm_tune.inference"]  # fmt: skip
PLANTED = {  # file in the copy -> its source; the first two run against the contracts
    "lvlm_tune/data/planted_upward.py": "from lvlm_tune.commands import train  # noqa: F401\n",
    "lvlm_tune/training/planted_lazy.py": (
        "def hook():\n    from lvlm_tune.generation import vokens\n\n    return vokens\n"
    ),
    "lvlm_tune/commands/planted_downward.py": "from lvlm_tune.data import record  # noqa: F401\n",
}


def contracts() -> list[dict]:
    """The contracts as import-linter reads them from ``pyproject.toml``."""
    return read_configuration(str(PYPROJECT))["contracts_options"]


def lint_imports(root: Path, config: Path) -> subprocess.CompletedProcess:
    """``lint-imports CONFIG`` with ``root`` first on the path (so it analyses that tree)."""
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "400", "NO_COLOR": "1"}
    code = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    return subprocess.run(
        [sys.executable, "-c", code, str(config), "--no-cache"],
        cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_the_declared_contracts_are_the_architecture():
    declared = contracts()
    assert [c["type"] for c in declared] == ["layers", "forbidden"]
    layers, seam = declared
    assert layers["layers"] == LAYERS
    assert layers.get("containers") is None and not layers.get("ignore_imports")
    assert seam["source_modules"] == CORE and seam["forbidden_modules"] == ["lvlm_tune.generation"]
    assert not seam.get("ignore_imports") and seam.get("allow_indirect_imports") is None
    assert read_configuration(str(PYPROJECT))["session_options"] == {"root_packages": ["lvlm_tune"]}


def test_the_tree_keeps_every_declared_contract():
    done = lint_imports(ROOT, PYPROJECT)
    report = done.stdout + done.stderr
    for contract in contracts():
        assert f"{contract['name']} KEPT" in report, report
    assert f"Contracts: {len(contracts())} kept, 0 broken." in report, report
    assert done.returncode == 0, report


@pytest.fixture(scope="module")
def planted_report(tmp_path_factory) -> tuple[int, str]:
    """lint-imports on a copy of the package with :data:`PLANTED` written into it."""
    root = tmp_path_factory.mktemp("planted")
    shutil.copytree(ROOT / "lvlm_tune", root / "lvlm_tune",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    shutil.copy(PYPROJECT, root / "pyproject.toml")
    for name, source in PLANTED.items():
        (root / name).write_text(source, encoding="utf-8")
    done = lint_imports(root, root / "pyproject.toml")
    return done.returncode, done.stdout + done.stderr


def test_a_planted_upward_import_breaks_the_layers(planted_report):
    returncode, report = planted_report
    assert returncode != 0
    assert "lvlm_tune.data is not allowed to import lvlm_tune.commands" in report, report
    assert "lvlm_tune.data.planted_upward -> lvlm_tune.commands.train (l.1)" in report, report


def test_a_planted_lazy_import_of_the_extension_package_is_caught(planted_report):
    returncode, report = planted_report
    assert returncode != 0
    assert "lvlm_tune.training is not allowed to import lvlm_tune.generation" in report, report
    assert "lvlm_tune.training.planted_lazy -> lvlm_tune.generation.vokens (l.2)" in report, report


def test_a_downward_import_is_not_reported(planted_report):
    _, report = planted_report
    assert "lvlm_tune.data.planted_upward" in report  # the copy was analysed, plants and all
    assert "planted_downward" not in report, report
