"""The shape of every JSON file the project reads, one typed schema each: `train.json` and `test.json` (a run's
summary and test scores), `summary.json` (the report's, read by the guard), `sweep.json` (the depth sweep's, read
by `guard --sweep`), `stats.json` (the prepared data's),
`labels.json` (the superclasses), and the records of runs trained elsewhere (`lease.json`, `study.json`).

A file is read through `read_record`: it must be a regular file of bounded size, JSON, and of its schema (strict
types, finite numbers, each within the range it can hold); a failure is one error naming the file and the first
bad field, quoting a bounded excerpt of the bad value. What the project writes passes its own schema by
construction (tests/test_schemas.py reads back what real stages wrote)."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    RootModel,
    ValidationError,
    field_validator,
    model_validator,
)

from vggdepth.config import CLASSES, Family, Seed, VariantName
from vggdepth.errors import VggdepthError, excerpt
from vggdepth.files import file_kind

MAX_RECORD_BYTES = 16 << 20  # the largest record the project writes (a study's lease.json) is a few kB

Count = Annotated[int, Field(ge=0, le=10**9)]
Finite = Annotated[float, Field(ge=-1e30, le=1e30)]  # with `allow_inf_nan=False`: any finite number
Share = Annotated[float, Field(ge=0, le=1)]  # an accuracy, a calibration error
Loss = Annotated[float, Field(ge=0)]  # any finite one: a diverging network's validation loss reaches millions
Text = Annotated[str, Field(max_length=2000)]
Note = Annotated[str, BeforeValidator(lambda v: v[:2000] if isinstance(v, str) else v)]  # a Text cut to fit
Md5 = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
ClassName = Annotated[str, Field(min_length=1, max_length=100)]
RUN_NAME = r"^[A-Za-z0-9_-]{1,64}-s[0-9]{1,10}$"  # `<variant>-s<seed>`: config's variant-name rule


class RecordError(VggdepthError):
    """A file the project reads is not what it must hold."""


class Record(BaseModel):
    """A JSON file's schema: strict ("0.5" is not a number, true is not a count), no inf or NaN. Keys the schema
    does not name are kept (a record of another version may hold more)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False, frozen=True)


R = TypeVar("R", bound=BaseModel)


def parse_record(raw: bytes | str, model: type[R], source: str, remedy: str = "") -> R:
    """`raw` JSON read as `model`; a `RecordError` naming `source` and the first bad field otherwise."""
    tail = f"; {remedy}" if remedy else ""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordError(f"{source}: not JSON ({str(exc).splitlines()[0][:120]}){tail}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the whole file"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        message = first["msg"].removeprefix("Value error, ")  # a validator's own message names what it found
        if first["type"] in ("model_type", "dict_type"):
            message = "a JSON object is expected"
        found = "" if first["type"] in ("missing", "value_error") else f" (found {excerpt(first.get('input'))})"
        raise RecordError(f"{source}: {where}: {message[:1].lower()}{message[1:]}{found}{more}{tail}") from None


def check_file(path: Path, remedy: str = "", limit: int = MAX_RECORD_BYTES) -> None:
    """`path` must be a regular file of at most `limit` bytes: one that is missing, not a regular file (a folder,
    a FIFO, a device: refused, never opened) or larger is one `RecordError` naming it, with `remedy` appended."""
    tail = f"; {remedy}" if remedy else ""
    try:
        info = path.stat()  # a link is followed (DVC may link outputs from its cache): its target must be a file
    except FileNotFoundError:
        raise RecordError(f"{path} is missing{tail}") from None
    except OSError as exc:
        raise RecordError(f"cannot read {path} ({exc.strerror or exc}){tail}") from None
    if not stat.S_ISREG(info.st_mode):
        raise RecordError(f"{path} is {file_kind(info.st_mode)}, not a regular file: it was not opened{tail}")
    if info.st_size > limit:
        raise RecordError(f"{path} is {info.st_size:,} bytes, more than it can be ({limit >> 20} MiB){tail}")


def read_record(path: Path, model: type[R], remedy: str = "") -> R:
    """The JSON file at `path` read as `model`. A path that is missing, not a regular file, larger than any record
    (`check_file`), not JSON or not of the schema is one `RecordError` naming it, with `remedy` appended."""
    check_file(path, remedy)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecordError(f"cannot read {path} ({exc.strerror or exc}){'; ' + remedy if remedy else ''}") from None
    return parse_record(raw, model, str(path), remedy)


# ---- a run's outputs ------------------------------------------------------------------------------------------


class TrainRecord(Record):
    """`train.json`: the summary the train stage writes when a run ends (engine.Trainer.summary)."""

    variant: VariantName
    seed: Seed
    epochs: Annotated[int, Field(ge=1, le=100_000)]
    train_loss: Loss
    train_acc: Share
    val_loss: Loss
    val_acc: Share
    best_epoch: Annotated[int, Field(ge=0, le=100_000)]
    best_val_acc: Share
    parameters: Count
    seconds: Annotated[float, Field(ge=0, le=1e9)]
    images_per_second: Annotated[float, Field(ge=0, le=1e12)]
    device: Text = ""
    precision: Text = ""
    node: Text = ""


class Scores(Record):
    """One checkpoint's scores in `test.json`; the top-k accuracy's name depends on `evaluate.top_k`, so every
    other key must be a finite number too."""

    epoch: Annotated[int, Field(ge=0, le=100_000)]
    test_loss: Loss
    test_acc: Share
    test_superclass_acc: Share
    test_ece: Share

    @model_validator(mode="after")
    def _numbers(self) -> Scores:
        for key, value in (self.model_extra or {}).items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not abs(value) <= 1e30:
                raise ValueError(f"{key}: a finite number is expected (found {excerpt(value)})")
        return self


class TestRecord(Record):
    """`test.json`: the evaluate stage's scores of the best and the final checkpoint."""

    __test__ = False  # not a pytest test class, whatever its name

    best: Scores
    final: Scores
    test_images: Annotated[int, Field(ge=1, le=10**7)]


class VariantSummary(Record):
    """One variant's row of the report's `summary.json`: what the guard checks is required, the rest typed."""

    val_acc: Share
    val_loss: Loss
    test_acc: Share | None = None
    epochs: Annotated[int, Field(ge=1, le=100_000)] | None = None
    entry_grad_min: Annotated[float, Field(ge=0, le=1e30)]
    entry_grad_max: Annotated[float, Field(ge=0, le=1e30)]


class SummaryRecord(RootModel[dict[VariantName, VariantSummary]]):
    """`report/summary.json`: each variant's row."""

    model_config = ConfigDict(strict=True)


class SweepRow(Record):
    """One network of the depth sweep in `sweep.json`: a diverged one (its loss became NaN or infinite) has no
    measurement and does not learn; every other one has all of them."""

    family: Family
    layers: Annotated[int, Field(ge=1, le=10_000)]
    entry_grad: Annotated[float, Field(ge=0, le=1e30)] | None
    val_acc: Share | None
    val_loss: Loss | None
    learns: bool
    diverged: bool = False  # a record of an earlier version has no such key: none of its networks diverged

    @model_validator(mode="after")
    def _measured_unless_diverged(self) -> SweepRow:
        missing = [name for name in ("entry_grad", "val_acc", "val_loss") if getattr(self, name) is None]
        if self.diverged and (self.learns or len(missing) < 3):
            raise ValueError("a diverged network has no measurement and does not learn")
        if not self.diverged and missing:
            raise ValueError(f"{', '.join(missing)} missing: only a diverged network has no measurement")
        return self


class SweepRecord(Record):
    """`sweep/report/sweep.json`, the depth sweep's record, read by `guard --sweep`: its rows are what it checks."""

    rows: Annotated[list[SweepRow], Field(min_length=1, max_length=10_000)]


# ---- the data ---------------------------------------------------------------------------------------------------


class StatsRecord(Record):
    """`stats.json` of the prepared data: its archive, split, sizes, normalisation and class names. The statistics
    of pixels scaled to [0, 1]: means in [0, 1], standard deviations in (0, 0.5]."""

    archive_md5: Md5
    split_seed: Seed
    sizes: dict[Annotated[str, Field(pattern=r"^(train|val|test)$")], Count]
    subset: dict[Annotated[str, Field(max_length=10)], Count | None]
    mean: Annotated[list[Annotated[float, Field(ge=0, le=1)]], Field(min_length=3, max_length=3)]
    std: Annotated[list[Annotated[float, Field(gt=0, le=0.5)]], Field(min_length=3, max_length=3)]
    classes: Annotated[list[ClassName], Field(min_length=CLASSES, max_length=CLASSES)]

    @field_validator("classes")
    @classmethod
    def _distinct(cls, classes: list[str]) -> list[str]:
        if len(set(classes)) != len(classes):
            raise ValueError("each class must be named once")
        return classes


class LabelsRecord(Record):
    """`labels.json`: each class's superclass, by the archive they come from."""

    archive_md5: Md5
    classes: Annotated[list[ClassName], Field(min_length=CLASSES, max_length=CLASSES)]
    superclasses: Annotated[list[ClassName], Field(min_length=1, max_length=CLASSES)]
    superclass_of: Annotated[
        list[Annotated[int, Field(ge=0, lt=CLASSES)]], Field(min_length=CLASSES, max_length=CLASSES)
    ]


# ---- records of runs trained elsewhere --------------------------------------------------------------------------


class RunState(Record):
    run: Annotated[str, Field(pattern=RUN_NAME)]
    variant: Annotated[str, Field(min_length=1, max_length=64)]
    seed: Seed
    state: Text


class ThroughputRow(Record):
    """One row of a lease's throughput table: training images per second of `network` on `path` (eager, or the
    fast path), `fused` runs per process in `processes` processes at once, per run and in all."""

    network: Annotated[str, Field(min_length=1, max_length=64)]
    path: Annotated[str, Field(min_length=1, max_length=100)]
    fused: Annotated[int, Field(ge=1, le=10_000)]
    processes: Annotated[int, Field(ge=1, le=10_000)]
    per_run: Annotated[float, Field(ge=0, le=1e12)]
    aggregate: Annotated[float, Field(ge=0, le=1e12)]


class LeaseRecord(Record):
    """`lease.json`: what a GPU lease ran, where, each run's state, and the throughput table its plan came from
    (benchmarks/gpu_lease.py); a later lease on the same device may take that table (`--table-from`)."""

    device: Annotated[str, Field(min_length=1, max_length=200)]
    torch: Annotated[str, Field(max_length=100)]
    commit: Annotated[str, Field(max_length=100)]
    finished_at: Annotated[str, Field(pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")]
    params: dict
    command: Annotated[str, Field(max_length=5000)] = ""
    runs: Annotated[list[RunState], Field(max_length=2000)] = []
    throughput: Annotated[list[ThroughputRow], Field(max_length=1000)] = []
    # diagnostics, not results: a long error (a CUDA failure's text) is cut, never a reason to refuse the runs
    throughput_errors: Annotated[list[Note], BeforeValidator(lambda v: v[:100] if isinstance(v, list) else v)] = []


class StudyRun(Record):
    epochs: Annotated[int, Field(ge=0, le=100_000)]
    state: Text


class StudySession(Record):
    """One `start` of a study: when, on which CPU, how it computed bfloat16, and each run's epochs then."""

    started_at: Annotated[str, Field(max_length=40)]
    cpu: Annotated[str, Field(max_length=200)]
    bf16: Literal["native", "emulated", "off"]
    epochs: Annotated[dict[Annotated[str, Field(pattern=RUN_NAME)], Count], Field(max_length=2000)]


class StudyRecord(Record):
    """`study.json`: what a study on this machine's CPU trains, from which commit (benchmarks/cpu_study.py)."""

    commit: Annotated[str, Field(pattern=r"^[0-9a-f]{7,40}$")]
    device: Annotated[str, Field(max_length=200)] = ""
    torch: Annotated[str, Field(max_length=100)] = ""
    command: Annotated[str, Field(max_length=5000)] = ""
    params: dict | None = None
    runs: Annotated[dict[Annotated[str, Field(pattern=RUN_NAME)], StudyRun], Field(max_length=2000)] = {}
    variants: Annotated[list[VariantName], Field(min_length=1, max_length=100)] | None = None  # narrowed to these
    after: Annotated[str, Field(pattern=r"^[0-9a-f]{40}$")] | None = (
        None  # begins when this commit's study nears its end
    )
    sessions: Annotated[list[StudySession], Field(max_length=10_000)] = []  # each start (`_record_session`)
