"""The train and evaluate stages' outputs, read back and checked: what the report, the figures and the guard
build on. Every reader names the file it could not use and says how to make it again."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from vggdepth.config import Params
from vggdepth.errors import VggdepthError
from vggdepth.gradients import COLUMNS as GRADIENT_COLUMNS
from vggdepth.gradients import GradientRow
from vggdepth.runs import EPOCH_COLUMNS, RunFiles
from vggdepth.schemas import TestRecord, TrainRecord, check_file, read_record


class ReportError(VggdepthError):
    """The runs needed for the report are missing, incomplete or damaged."""


def _remedy(path: Path) -> str:
    return f"re-run the stage that wrote it (`dvc repro --force` on it, or delete {path} and `dvc repro`)"


MAX_TABLE_BYTES = 256 << 20  # a 100-epoch run's gradient table is about 1 MB


def read_table(path: Path, columns: tuple[str, ...], numeric: tuple[str, ...]) -> list[dict]:
    """A CSV with at least `columns`, every `numeric` column a finite number or NaN; a clear error otherwise."""
    check_file(path, _remedy(path), MAX_TABLE_BYTES)
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            absent = [c for c in columns if c not in (reader.fieldnames or [])]
            if absent:
                raise ReportError(f"{path} lacks the column(s) {', '.join(absent)}; {_remedy(path)}")
            rows = []
            for line, row in enumerate(reader, start=2):
                try:
                    rows.append({k: float(v) if k in numeric else v for k, v in row.items() if k in columns})
                except (TypeError, ValueError):
                    raise ReportError(
                        f"{path}, line {line}: not a number where one is expected; {_remedy(path)}"
                    ) from None
    except FileNotFoundError:
        raise ReportError(f"{path} is missing; {_remedy(path)}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ReportError(f"cannot read {path} ({exc}); {_remedy(path)}") from None
    if not rows:
        raise ReportError(f"{path} has no rows; {_remedy(path)}")
    return rows


CURVE_COLUMNS = ("train_acc", "train_loss", "val_acc", "val_loss")  # of the reference framework's curves


def read_epochs(path: Path, columns: tuple[str, ...] = EPOCH_COLUMNS) -> list[dict[str, float]]:
    """A per-epoch table (`epochs.csv`, or a reference curve with `CURVE_COLUMNS`); epochs as whole numbers."""
    rows = read_table(path, columns, numeric=columns)
    for row in rows:
        if "epoch" in row:
            row["epoch"] = int(row["epoch"])
    return rows


def read_gradients(path: Path) -> list[GradientRow]:
    numeric = tuple(c for c in GRADIENT_COLUMNS if c != "layer")
    return [
        GradientRow(
            int(r["epoch"]),
            r["layer"],
            int(r["index"]),
            int(r["numel"]),
            *(r[c] for c in ("mean_abs", "last_mean_abs", "grad_l2", "weight_l2")),
        )
        for r in read_table(path, GRADIENT_COLUMNS, numeric)
    ]


def read_train(files: RunFiles) -> dict:
    """A run's `train.json` (schemas.TrainRecord), as a mapping."""
    return read_record(files.train_json, TrainRecord, _remedy(files.train_json)).model_dump()


def read_test(files: RunFiles, params: Params) -> dict:
    """A run's `test.json` (schemas.TestRecord) with the top-k accuracy `params` names, as a mapping."""
    record = read_record(files.test_json, TestRecord, _remedy(files.test_json)).model_dump()
    metric = params.evaluate.top_k_metric
    for kind in ("best", "final"):
        if metric not in record[kind]:
            raise ReportError(
                f"{files.test_json}: {kind}.{metric}: missing (evaluate.top_k is {params.evaluate.top_k}); "
                f"{_remedy(files.test_json)}"
            )
    return record


@dataclass(frozen=True)
class RunOutputs:
    """What the train and evaluate stages left for one (variant, seed)."""

    variant: str
    seed: int
    files: RunFiles
    epochs: list[dict[str, float]]
    train: dict
    test: dict

    @property
    def last(self) -> dict[str, float]:
        return self.epochs[-1]

    def gradients(self) -> list[GradientRow]:
        """The run's gradient table, read once (the summary and the figures both need it)."""
        return self._gradient_rows

    @cached_property
    def _gradient_rows(self) -> list[GradientRow]:
        return read_gradients(self.files.gradients_csv)


def run_of(results: dict[str, list[RunOutputs]], variant: str, seed: int) -> RunOutputs:
    """The run of `variant` with `seed` among collected results."""
    return next(r for r in results[variant] if r.seed == seed)


def collect(params: Params, runs: Path, partial: bool = False) -> dict[str, list[RunOutputs]]:
    """Every variant's runs, one per seed, in params order; a clear error naming what is missing or damaged.
    `partial` (a study still training): the variants whose every run is there, the others left out."""
    found: dict[str, list[RunOutputs]] = {}
    missing = []
    for variant in params.variants:
        found[variant] = []
        for seed in params.seeds:
            files = RunFiles.of(runs, variant, seed)
            needed = (files.epochs_csv, files.train_json, files.test_json, files.gradients_csv)
            absent = [p for p in needed if not p.exists()]
            if absent:
                missing += [str(p) for p in absent]
                if partial:
                    found.pop(variant, None)
                    break
                continue
            epochs = read_epochs(files.epochs_csv)
            train = read_train(files)
            if (train.get("variant"), train.get("seed")) != (variant, seed):
                raise ReportError(
                    f"{files.train_json} is the summary of {str(train.get('variant'))[:64]} seed "
                    f"{str(train.get('seed'))[:20]}, not of {variant} seed {seed} (its folder): a run folder holds "
                    f"another run's outputs; {_remedy(files.train_json)}"
                )
            if train["epochs"] != len(epochs):
                raise ReportError(
                    f"{files.epochs_csv} has {len(epochs)} epochs, {files.train_json} says {train['epochs']}: "
                    f"one of them is stale; {_remedy(files.epochs_csv)}"
                )
            found[variant].append(RunOutputs(variant, seed, files, epochs, train, read_test(files, params)))
    if missing and not (partial and found):
        raise ReportError(
            f"the report needs every run's outputs; missing: {', '.join(missing)}. Run `dvc repro` to make them."
        )
    return found


def verdict(ok: bool, claim: str) -> str:
    """One line of a guard: PASS or FAIL, then the claim with the numbers that decided it."""
    return f"{'PASS' if ok else 'FAIL'}: {claim}"
