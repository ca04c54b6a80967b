"""Typed view of `params.yaml`: every setting of the study, validated once before any stage does work."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from vggdepth.errors import VggdepthError, excerpt

# Every number has a bound that no sane study reaches and every float is finite (`_Section`): a value that validates
# must not crash a stage later (an allocation, an overflow) or mislead it (an infinite rate or decay).
PositiveInt = Annotated[int, Field(gt=0, le=10**6)]
Threads = Annotated[int, Field(ge=0, le=4096)]
Epochs = Annotated[int, Field(gt=0, le=100_000)]
Seconds = Annotated[float, Field(gt=0, le=86_400)]  # a day: a timeout beyond it is no timeout
Rate = Annotated[float, Field(gt=0, le=10)]  # a learning rate
Fraction = Annotated[float, Field(ge=0, le=1)]
Md5 = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
# Variant names become DVC stage names (`train@<variant>-<seed>`: DVC allows no punctuation but `-` and `_`),
# MLflow run names and file names: keep them to that alphabet.
VariantName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$", max_length=64)]
# numpy's random seeds are 32-bit.
Seed = Annotated[int, Field(ge=0, lt=2**32)]
IMAGE_SIZE = 32  # CIFAR's images are 32 x 32 pixels
CLASSES = 100  # CIFAR-100's fine labels


class ConfigError(VggdepthError):
    """`params.yaml` is missing, unreadable or invalid."""


class _Section(BaseModel):
    # strict: "1e-3" (a string) is not a learning rate; forbid: a misspelt key is an error, not a silent default;
    # no inf or NaN anywhere.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class DataConfig(_Section):
    """Where the CIFAR-100 python archive comes from (download stage)."""

    url: Annotated[str, Field(min_length=1, max_length=4096)]
    md5: Md5
    timeout_s: Seconds


class SubsetConfig(_Section):
    """Images per class kept in each split; `None` keeps the whole split (reduced runs for tests and CI)."""

    train: Annotated[int, Field(gt=0, le=500)] | None  # CIFAR-100 has 500 training and 100 test images a class
    val: Annotated[int, Field(gt=0, le=500)] | None
    test: Annotated[int, Field(gt=0, le=100)] | None


class PrepareConfig(_Section):
    """How the official training set is split and reduced (prepare stage)."""

    split_seed: Annotated[int, Field(ge=0, lt=2**32)]
    val_size: Annotated[int, Field(gt=0, lt=50_000)]  # of the 50,000 official training images
    subset: SubsetConfig


class ModelConfig(_Section):
    """Architecture shared by every variant (SPEC.md, The network)."""

    width: Annotated[int, Field(gt=0, le=4096)]
    stages: Annotated[int, Field(gt=0, le=64)]
    negative_slope: Fraction
    num_classes: Annotated[int, Field(gt=0, le=10_000)]

    @model_validator(mode="after")
    def _fits_cifar100(self) -> ModelConfig:
        # Each stage halves the image: a sixth would pool a 1x1 map.
        deepest = IMAGE_SIZE.bit_length() - 1
        if self.stages > deepest:
            raise ValueError(
                f"model.stages: {self.stages} stages would pool {IMAGE_SIZE}-pixel images below one pixel "
                f"(each halves them); use at most {deepest}"
            )
        if self.num_classes != CLASSES:
            raise ValueError(
                f"model.num_classes: CIFAR-100 has {CLASSES} fine classes, the head must have as many "
                f"(got {self.num_classes})"
            )
        return self

    def layers(self, blocks_per_stage: int) -> int:
        """Weight layers of a network: entry, two convolutions per block (processing and reduction), head."""
        return 2 + self.stages * (2 * blocks_per_stage + 2)


class AugmentConfig(_Section):
    crop_padding: Annotated[int, Field(ge=0, le=IMAGE_SIZE)]  # beyond the image, a crop can be all padding
    flip: bool


class TrainConfig(_Section):
    """Protocol shared by every variant: what a run computes. Every field here can change a run's result, so
    the training stages depend on this section and a run's fingerprint is made of it (`epochs` aside: a longer
    run continues a shorter one)."""

    epochs: Epochs
    lr_min: Annotated[float, Field(ge=0, le=10)]
    betas: Annotated[list[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)]  # Adam
    weight_decay: Fraction
    augment: AugmentConfig
    bf16: bool
    grad_stats: bool


class RuntimeConfig(_Section):
    """How a run is executed: it changes what a run computes only through float rounding (another thread count or
    evaluation batch size sums in another order), so no stage depends on it and a checkpoint made under other
    values is resumed."""

    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")]
    threads: Threads
    progress_every: PositiveInt
    eval_batch_size: Annotated[int, Field(gt=0, le=100_000)]
    cuda_graphs: bool  # fused runs on CUDA replay each training step as one CUDA graph (vggdepth.fused)


Auto = Literal["auto"]


class GridConfig(_Section):
    """How the grid of (variant, seed) runs is spread over Ray: like `runtime`, it changes results only through
    float rounding (the thread count of each run), so no stage depends on it."""

    # ray: Ray's actors (on this machine, or a cluster); processes: plain processes on this machine, no Ray (a
    # rented GPU machine without it)
    backend: Literal["ray", "processes"]
    # local: a Ray instance on this machine, bound to 127.0.0.1; else the address of a running cluster this
    # machine is a node of (host:port, or auto). $RAY_ADDRESS, when set, wins over this value.
    address: Annotated[str, Field(min_length=1)]
    threads_per_run: PositiveInt | Auto  # CPU: torch threads (and Ray CPUs) of each run
    runs_per_group: PositiveInt | Auto  # runs of one shape fused into one network (auto: all on CUDA, 1 on a CPU)
    groups_per_gpu: PositiveInt | Auto  # GPU: groups sharing one device (fractional GPUs)

    @field_validator("threads_per_run", "runs_per_group", "groups_per_gpu", mode="before")
    @classmethod
    def _positive_or_auto(cls, value: Any, info: ValidationInfo) -> Any:
        if value == "auto" or (type(value) is int and value > 0):
            return value
        raise ValueError(f"grid.{info.field_name}: a positive whole number or 'auto' (got {value!r})")


class Variant(_Section):
    """One row of the report's Table 1, or of the rows beyond it."""

    blocks_per_stage: Annotated[int, Field(ge=0, le=256)]
    batch_norm: bool
    # an identity shortcut around every processing block (output = input + block(input)). Absent means false, so
    # that records of runs made before the setting existed still read; false leaves a run's fingerprint as it was.
    residual: bool = False
    lr: Rate
    schedule: Literal["cosine", "warm_restarts"]
    period: Epochs  # cosine: annealing period; warm_restarts: epochs between restarts
    batch_size: Annotated[int, Field(gt=0, le=50_000)]


# The sweep's network families: (batch norm, residual) of each, the two settings of a variant that decide whether a
# deep network's gradients reach its entry layer.
FAMILIES: dict[str, tuple[bool, bool]] = {
    "plain": (False, False),
    "bn": (True, False),
    "residual": (False, True),
    "bn-residual": (True, True),
}
Family = Literal["plain", "bn", "residual", "bn-residual"]


class SweepSubset(_Section):
    """Images per class of the prepared training and validation splits that the sweep trains and validates on."""

    train: Annotated[int, Field(gt=0, le=500)]
    val: Annotated[int, Field(gt=0, le=500)]


class SweepConfig(_Section):
    """The depth sweep, beyond the report (README "The depth sweep"): each family at each depth, trained briefly on
    a reduced split with one protocol, to find the depth at which it stops learning. It changes no Table-1 run."""

    families: Annotated[list[Family], Field(min_length=1, max_length=len(FAMILIES))]
    blocks_per_stage: Annotated[list[Annotated[int, Field(ge=0, le=256)]], Field(min_length=1, max_length=64)]
    epochs: Epochs
    subset: SweepSubset
    seed: Seed
    lr: Rate
    batch_size: Annotated[int, Field(gt=0, le=50_000)]
    vanishing_below: Annotated[float, Field(gt=0, le=1e6)]  # entry-layer mean |gradient| under this: vanished
    learning_above: Annotated[float, Field(gt=0, le=1e6)]  # the claim: BN and residual families stay above it
    chance_sigmas: Annotated[float, Field(gt=0, le=100)]  # accuracy within this many standard errors of chance

    @model_validator(mode="after")
    def _distinct(self) -> SweepConfig:
        for name in ("families", "blocks_per_stage"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"sweep.{name}: each value must appear once, got {values}")
        if self.vanishing_below >= self.learning_above:
            raise ValueError(
                f"sweep: vanishing_below ({self.vanishing_below}) must be below learning_above ({self.learning_above})"
            )
        return self


class EvaluateConfig(_Section):
    """What the evaluate stage measures beyond test loss and accuracy (README "Evaluation")."""

    top_k: Annotated[int, Field(ge=2, le=10_000)]  # top-k accuracy: the true class among the k most probable
    calibration_bins: Annotated[int, Field(ge=2, le=10_000)]  # equal-width confidence bins of the ECE

    @property
    def top_k_metric(self) -> str:
        """The name of the top-k accuracy in test.json, MLflow and the report: `test_top5`."""
        return f"test_top{self.top_k}"


class TrackingConfig(_Section):
    """MLflow tracking of every training run (the store comes from MLFLOW_TRACKING_URI or mlruns/)."""

    enabled: bool
    experiment: Annotated[str, Field(min_length=1, max_length=500)]
    system_metrics: bool
    log_model: bool
    request_timeout_s: Annotated[int, Field(gt=0, le=3600)]
    request_retries: Annotated[int, Field(ge=0, le=100)]


class ReferenceConfig(_Section):
    """The report's own numbers, to compare with."""

    table: Annotated[str, Field(min_length=1)]
    epochs: Epochs
    final_test_acc: Fraction
    final_test_loss: Annotated[float, Field(ge=0, le=1000)]
    curves: dict[VariantName, str]


class FigureConfig(_Section):
    kind: Literal[
        "accuracy", "gradient_flow", "seeds", "reference_overlay", "per_class", "superclass_confusion", "reliability"
    ]
    variants: Annotated[list[VariantName], Field(min_length=1)]

    @model_validator(mode="after")
    def _variant_count(self) -> FigureConfig:
        wanted = {"per_class": 2, "superclass_confusion": 1}.get(self.kind)
        if wanted is not None and len(self.variants) != wanted:
            raise ValueError(f"a {self.kind} figure draws {wanted} variant(s), got {len(self.variants)}")
        return self


class GuardConfig(_Section):
    """The study's claim, checked on every pipeline run in CI: its mechanism (entry-layer gradients) first,
    then accuracy with a margin measured to hold on the reduced profile (benchmarks/guard_margins.py)."""

    vanishing: VariantName
    vanishing_below: Annotated[float, Field(gt=0, le=1e6)]  # its entry-layer mean |gradient| stays below this
    learning: Annotated[list[VariantName], Field(min_length=1)]
    learning_above: Annotated[float, Field(gt=0, le=1e6)]  # their entry-layer mean |gradient| stays above this
    chance_tolerance: Annotated[float, Field(gt=0, le=10)]  # of the validation loss from ln(classes)
    accuracy_margin: Fraction  # validation accuracy lead of each learning variant

    @model_validator(mode="after")
    def _ordered(self) -> GuardConfig:
        if self.vanishing_below >= self.learning_above:
            raise ValueError(
                f"report.guard: vanishing_below ({self.vanishing_below}) must be below learning_above "
                f"({self.learning_above})"
            )
        if self.vanishing in self.learning:
            raise ValueError(f"report.guard.learning: {self.vanishing!r} is the vanishing variant")
        return self


class ReportConfig(_Section):
    final_variant: VariantName
    seed: Seed
    gradient_statistic: Literal["mean_abs", "last_mean_abs"]
    registered_model: Annotated[str, Field(min_length=1)]
    alias: Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")]
    guard: GuardConfig
    reference: ReferenceConfig
    figures: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")], FigureConfig]


class Params(_Section):
    """The whole of `params.yaml`."""

    data: DataConfig
    prepare: PrepareConfig
    model: ModelConfig
    train: TrainConfig
    runtime: RuntimeConfig
    evaluate: EvaluateConfig
    grid: GridConfig
    variants: Annotated[dict[VariantName, Variant], Field(min_length=1)]
    seeds: Annotated[list[Seed], Field(min_length=1, max_length=1000)]
    tracking: TrackingConfig
    report: ReportConfig
    sweep: SweepConfig

    @model_validator(mode="after")
    def _cross_checks(self) -> Params:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: each seed must appear once, got {self.seeds}")
        if self.train.lr_min >= min(v.lr for v in self.variants.values()):
            raise ValueError(f"train.lr_min: the floor {self.train.lr_min} must be below every variant's lr")
        if self.train.lr_min >= self.sweep.lr:
            raise ValueError(f"sweep.lr: {self.sweep.lr} must be above train.lr_min ({self.train.lr_min})")
        if self.evaluate.top_k > self.model.num_classes:
            raise ValueError(f"evaluate.top_k: {self.evaluate.top_k} is more than the {self.model.num_classes} classes")
        self.variant(self.report.final_variant, field="report.final_variant")
        if self.report.seed not in self.seeds:
            raise ValueError(f"report.seed: {self.report.seed} is not one of the seeds {self.seeds}")
        for name, figure in self.report.figures.items():
            for variant in figure.variants:
                self.variant(variant, field=f"report.figures.{name}.variants")
        self.variant(self.report.guard.vanishing, field="report.guard.vanishing")
        for name in self.report.guard.learning:
            self.variant(name, field="report.guard.learning")
        for variant in self.report.reference.curves:
            self.variant(variant, field="report.reference.curves")
        return self

    def variant(self, name: str, *, field: str = "variant") -> Variant:
        """The Table-1 row called `name`; a clear error naming the known rows otherwise."""
        if name not in self.variants:
            raise ConfigError(
                f"{field}: unknown variant {name!r}; the variants in params.yaml are: {', '.join(self.variants)}"
            )
        return self.variants[name]


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate `params.yaml`; raise `ConfigError` naming every invalid field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; run from the project root or pass --params") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, prepare, ...), found {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = "\n".join(f"  {_describe(err)}" for err in exc.errors())
        raise ConfigError(f"{path}: invalid parameters:\n{problems}") from None
    except ConfigError as exc:  # raised by a cross-check through Params.variant
        raise ConfigError(f"{path}: invalid parameters:\n  {exc}") from None


# The sections that change no Table-1 result (README "Parameters"): how a run is spread, shown and tracked, and the
# depth sweep beside the study.
NOT_A_RESULT = ("runtime", "grid", "tracking", "sweep")


def recorded_params(raw: Any, current: Params, source: str) -> Params:
    """The params a record of runs trained elsewhere holds (a GPU lease's or a CPU study's, perhaps of another
    version), read by this one: every section that changes a result as recorded, the sections that cannot
    (`NOT_A_RESULT`, whose keys change between versions) as `current` has them. `source` names the record in an
    error."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: its params are not a mapping of sections")
    raw = {**raw, **{name: current.model_dump(mode="json")[name] for name in NOT_A_RESULT}}
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = "\n".join(f"  {_describe(err)}" for err in exc.errors())
        raise ConfigError(f"{source}: invalid parameters:\n{problems}") from None
    except ConfigError as exc:
        raise ConfigError(f"{source}: invalid parameters:\n  {exc}") from None


def _describe(err: Any) -> str:
    """One line per pydantic error: `field.path: problem (got value)`."""
    loc = [str(part) for part in err["loc"]]
    if err["type"] == "extra_forbidden":
        known = _known_keys(loc[:-1])
        hint = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.7)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else f"; expected one of: {', '.join(known)}"
        return f"{'.'.join(loc)}: unknown key{suggestion}"
    if err["type"] == "value_error":  # a cross-check: its message already names the field
        return err["msg"].removeprefix("Value error, ")
    where = ".".join(loc) or "params"
    got = err.get("input")
    shown = "" if isinstance(got, dict) or err["type"] == "missing" else f" (got {excerpt(got)})"
    return f"{where}: {err['msg'][0].lower()}{err['msg'][1:]}{shown}"


def _known_keys(loc: list[str]) -> list[str]:
    """Field names of the section found at `loc` (e.g. ['variants', 'VGG-08'] -> Variant's fields)."""
    model: Any = Params
    for part in loc:
        if model is Params and part == "variants":
            model = dict
        elif model is dict:
            model = Variant
        else:
            annotation = model.model_fields[part].annotation
            model = annotation
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []
