"""dvc.yaml stays true to the code: each stage depends on exactly the modules its entry point runs, and on no
params section that cannot change a result (`runtime`, `grid`, `tracking`)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

PACKAGE = "vggdepth"
SRC = ROOT / "src"


def _imported_modules(path: Path) -> set[str]:
    """Every `vggdepth.*` module a file imports, at the top or inside a function (lazy imports run too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] == PACKAGE}


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    for candidate in (SRC.joinpath(*parts).with_suffix(".py"), SRC.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None  # `from vggdepth.engine import Trainer` also names vggdepth.engine.Trainer: not a module


def code_closure(script: Path) -> set[str]:
    """The files an entry point executes from this repository: itself, and every module it reaches."""
    files, queue = {script}, [script]
    while queue:
        for name in _imported_modules(queue.pop()):
            for k in range(1, len(name.split(".")) + 1):  # importing a.b.c runs a/__init__, a/b, a/b/c
                path = _module_file(".".join(name.split(".")[:k]))
                if path is not None and path not in files:
                    files.add(path)
                    queue.append(path)
    return {str(p.relative_to(ROOT)) for p in files}


def _stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _script(stage: dict) -> Path:
    match = re.search(r"python (pipeline/\S+\.py)", stage["cmd"])
    assert match, f"no `python pipeline/<stage>.py` in {stage['cmd']!r}"
    return ROOT / match.group(1)


@pytest.mark.parametrize("name", list(_stages()))
def test_stage_depends_on_exactly_the_code_it_runs(name):
    stage = _stages()[name]
    declared = {d for d in stage["deps"] if d.startswith(("src/", "pipeline/"))}
    assert declared == code_closure(_script(stage)), (
        f"stage {name}: missing {sorted(code_closure(_script(stage)) - declared)}, "
        f"not run {sorted(declared - code_closure(_script(stage)))}"
    )


def test_no_stage_depends_on_settings_that_cannot_change_a_result():
    for name, stage in _stages().items():
        for param in stage.get("params", []):
            section = param.split(".")[0]
            assert section not in ("runtime", "tracking", "grid"), f"stage {name} depends on {param}"


PRESENTATION = {"figures.py", "report.py", "report_figures.py", "outputs.py", "tracking/report.py", "tracking/sync.py"}
NOT_A_RESULT = {"checkpoints.py", "runs.py", "files.py", "errors.py", "cli.py", "throughput.py"}


@pytest.mark.parametrize("name", ["grid", "train", "evaluate"])
def test_training_and_evaluation_run_no_figure_report_or_sync_code(name):
    """Editing how a figure looks, how the report reads or how sync sends makes no run or evaluation stale."""
    closure = {path.removeprefix("src/vggdepth/") for path in code_closure(_script(_stages()[name]))}
    assert not closure & PRESENTATION, sorted(closure & PRESENTATION)


def test_a_runs_fingerprint_covers_the_code_that_computes_it_and_nothing_else():
    """A checkpoint message, the run folder's layout or the throughput harness can change without retraining."""
    from vggdepth.engine import RESULT_CODE

    assert set(RESULT_CODE) == {"engine.py", "models.py", "batches.py", "gradients.py"}
    assert not set(RESULT_CODE) & NOT_A_RESULT
