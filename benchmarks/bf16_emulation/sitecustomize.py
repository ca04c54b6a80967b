"""Puts `vggdepth.bf16_emulation` into every Python process of a job whose environment has
VGGDEPTH_BF16_EMULATION=1 (or `force`: even where the CPU has bfloat16 arithmetic) and this folder on PYTHONPATH
(benchmarks/cpu_study.py sets both for a study trained in bfloat16 on a CPU without bfloat16 arithmetic). It is
installed the moment torch has been imported, before any trainer asks what the CPU computes in; processes that
never import torch (DVC, Ray's own) are left alone. The module is loaded by its path, from beside this file where
a copy is (a study's job runs from its own copy, so that editing this checkout cannot touch it), else from this
checkout's src/, so that the study's checkout of an older commit, whose own `vggdepth` has no such module, trains
with it and its code unchanged. Another `sitecustomize` further down the path (a distribution's) still runs."""

import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
COPY, SOURCE = HERE / "bf16_emulation.py", HERE.parents[1] / "src" / "vggdepth" / "bf16_emulation.py"
MODULE = COPY if COPY.exists() else SOURCE
MODE = os.environ.get("VGGDEPTH_BF16_EMULATION", "")


def _install() -> None:
    try:
        spec = importlib.util.spec_from_file_location("_vggdepth_bf16_emulation", MODULE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        installed = module.install(force=MODE == "force")
    except Exception as exc:  # the trainer must not go on as if: say what failed, and fail the import of torch
        print(f"[pid {os.getpid()}] bfloat16 emulation from {MODULE} failed: {exc!r}", file=sys.stderr, flush=True)
        raise
    if installed:
        print(f"[pid {os.getpid()}] bfloat16 emulated in float32 kernels ({MODULE})", file=sys.stderr, flush=True)


class _AfterTorch(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when torch is first looked for, it finds torch the usual way and installs the
    emulation once torch's module has run."""

    done = False

    def find_spec(self, name, path=None, target=None):
        if name != "torch" or self.done:
            return None
        self.done = True  # from here on it finds nothing (not removed: the import system is looping over the list)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _install()

        spec.loader.exec_module = exec_module
        return spec


def _next_sitecustomize() -> None:
    """Run the `sitecustomize` this one hides (the first on sys.path after this folder), as Python would have."""
    for entry in sys.path:
        if not entry or Path(entry).resolve() == HERE:
            continue
        found = Path(entry) / "sitecustomize.py"
        if found.is_file():
            spec = importlib.util.spec_from_file_location("_next_sitecustomize", found)
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
            return


if MODE in ("1", "force"):
    if "torch" in sys.modules:
        _install()
    else:
        sys.meta_path.insert(0, _AfterTorch())
_next_sitecustomize()
