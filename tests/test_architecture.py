"""The architecture check (tools/check_imports.py) passes on the source and catches what it is for."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "tunesmith"
TOOL = ROOT / "tools" / "check_imports.py"

spec = importlib.util.spec_from_file_location("check_imports", TOOL)
check_imports = importlib.util.module_from_spec(spec)
sys.modules["check_imports"] = check_imports  # dataclasses look their module up there
spec.loader.exec_module(check_imports)


@pytest.fixture
def tree(tmp_path):
    """A copy of the source package to plant violations in."""
    copy = tmp_path / "tunesmith"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _plant(path: Path, line: str) -> None:
    path.write_text(path.read_text(encoding="utf-8") + "\n" + line + "\n", encoding="utf-8")


def test_the_source_has_no_layer_violation_cycle_or_long_function():
    assert check_imports.check(SRC) == []


def test_the_cli_fails_on_a_planted_upward_import(tree):
    _plant(tree / "config" / "schema.py", "from tunesmith.evaluate.stage import eval_stage  # noqa")
    run = subprocess.run([sys.executable, str(TOOL), str(tree)], capture_output=True, text=True)
    assert run.returncode == 1
    assert "tunesmith.config.schema imports tunesmith.evaluate.stage, a higher layer (config < evaluate" in run.stdout
    assert f"{tree / 'config' / 'schema.py'}:" in run.stdout  # names file:line


def test_a_deferred_upward_import_counts(tree):
    _plant(tree / "train" / "watch.py", "def _late():\n    from tunesmith.report import build  # noqa")
    assert any("tunesmith.train.watch imports tunesmith.report.build" in p for p in check_imports.check(tree))


def test_independent_layers_may_not_import_each_other(tree):
    _plant(tree / "report" / "plots.py", "from tunesmith.serve import metrics  # noqa")
    assert any("report and serve are independent layers" in p for p in check_imports.check(tree))


def test_a_cycle_inside_one_package_is_reported(tree):
    (tree / "data" / "cyc_a.py").write_text("from tunesmith.data import cyc_b  # noqa\n")
    (tree / "data" / "cyc_b.py").write_text("def f():\n    from tunesmith.data.cyc_a import x  # noqa\n")
    assert "import cycle: tunesmith.data.cyc_a <-> tunesmith.data.cyc_b" in check_imports.check(tree)


def test_relative_imports_resolve(tree):
    (tree / "data" / "rel.py").write_text("from ..serve import app  # noqa\n")
    assert any("tunesmith.data.rel imports tunesmith.serve.app" in p for p in check_imports.check(tree))


def test_the_package_root_is_the_bottom_layer(tree):
    _plant(tree / "__init__.py", "from tunesmith import cli  # noqa")
    assert any("tunesmith imports tunesmith.cli, a higher layer" in p for p in check_imports.check(tree))


def test_attribute_and_importlib_imports_count(tree):
    _plant(tree / "errors.py", "import tunesmith  # noqa\n\ndef _late():\n    return tunesmith.cli.main")
    _plant(tree / "fsio.py", "import importlib\n\n\ndef _late():\n"
                             "    return importlib.import_module('tunesmith.serve.app')")
    problems = check_imports.check(tree)
    assert any("tunesmith.errors imports tunesmith.cli, a higher layer" in p for p in problems)
    assert any("tunesmith.fsio imports tunesmith.serve.app, a higher layer" in p for p in problems)


def test_a_cycle_through_a_package_init_is_reported(tree):
    _plant(tree / "data" / "__init__.py", "from tunesmith.data.stage import summary  # noqa")
    _plant(tree / "data" / "stage.py", "from tunesmith.data import __doc__ as _doc  # noqa")
    assert "import cycle: tunesmith.data <-> tunesmith.data.stage" in check_imports.check(tree)


def test_a_package_reexporting_its_modules_is_not_a_cycle(tree):
    _plant(tree / "data" / "__init__.py", "from tunesmith.data.stage import summary  # noqa")
    assert check_imports.check(tree) == []


def test_a_new_package_must_be_given_a_layer(tree):
    (tree / "newstage").mkdir()
    (tree / "newstage" / "__init__.py").write_text("")
    assert any("newstage: not in any layer" in p for p in check_imports.check(tree))


def test_a_function_over_80_lines_is_reported(tree):
    body = "\n".join(f"    x{i} = {i}" for i in range(80))
    (tree / "data" / "long.py").write_text(f"def too_long():\n{body}\n")
    assert any("too_long is 81 lines (at most 80)" in p for p in check_imports.check(tree))


def test_no_config_copy_skips_validation():
    """Derived configs go through config.derive (validated), never model_copy(update=...)."""
    offenders = [str(p) for p in SRC.rglob("*.py") if "model_copy(update" in p.read_text(encoding="utf-8")]
    assert offenders == []
