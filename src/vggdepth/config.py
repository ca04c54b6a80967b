"""Typed view of `params.yaml`: every setting of the study, validated once before any stage does work."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vggdepth.errors import VggdepthError

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Md5 = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
# Variant names become DVC stage names, MLflow run names and file names: keep them to a safe alphabet.
VariantName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


class ConfigError(VggdepthError):
    """`params.yaml` is missing, unreadable or invalid."""


class _Section(BaseModel):
    # strict: "1e-3" (a string) is not a learning rate; forbid: a misspelt key is an error, not a silent default.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DataConfig(_Section):
    """Where the CIFAR-100 python archive comes from (download stage)."""

    url: Annotated[str, Field(min_length=1)]
    md5: Md5
    timeout_s: PositiveFloat


class SubsetConfig(_Section):
    """Images per class kept in each split; `None` keeps the whole split (reduced runs for tests and CI)."""

    train: PositiveInt | None
    val: PositiveInt | None
    test: PositiveInt | None


class PrepareConfig(_Section):
    """How the official training set is split and reduced (prepare stage)."""

    split_seed: NonNegativeInt
    val_size: PositiveInt
    subset: SubsetConfig


class ModelConfig(_Section):
    """Architecture shared by every variant (SPEC.md, The network)."""

    width: PositiveInt
    stages: PositiveInt
    negative_slope: Annotated[float, Field(ge=0)]
    num_classes: PositiveInt


class AugmentConfig(_Section):
    crop_padding: NonNegativeInt
    flip: bool


class TrainConfig(_Section):
    """Protocol shared by every variant: optimiser, length, device."""

    epochs: PositiveInt
    lr_min: Annotated[float, Field(ge=0)]
    betas: Annotated[list[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)]  # Adam
    weight_decay: Annotated[float, Field(ge=0)]
    augment: AugmentConfig
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")]
    bf16: bool
    threads: NonNegativeInt
    progress_every: PositiveInt
    eval_batch_size: PositiveInt
    grad_stats: bool


class Variant(_Section):
    """One row of the report's Table 1."""

    blocks_per_stage: NonNegativeInt
    batch_norm: bool
    lr: PositiveFloat
    schedule: Literal["cosine", "warm_restarts"]
    period: PositiveInt  # cosine: annealing period; warm_restarts: epochs between restarts
    batch_size: PositiveInt


class TrackingConfig(_Section):
    """MLflow tracking of every training run (the store comes from MLFLOW_TRACKING_URI or mlruns/)."""

    enabled: bool
    experiment: Annotated[str, Field(min_length=1)]
    system_metrics: bool
    log_model: bool
    request_timeout_s: PositiveInt
    request_retries: NonNegativeInt


class ReferenceConfig(_Section):
    """The report's own numbers, to compare with."""

    table: Annotated[str, Field(min_length=1)]
    epochs: PositiveInt
    final_test_acc: Annotated[float, Field(ge=0, le=1)]
    final_test_loss: Annotated[float, Field(ge=0)]
    curves: dict[VariantName, str]


class FigureConfig(_Section):
    kind: Literal["accuracy", "gradient_flow", "seeds", "reference_overlay"]
    variants: Annotated[list[VariantName], Field(min_length=1)]


class GuardConfig(_Section):
    """The study's claim, checked on every pipeline run in CI."""

    vanishing: VariantName
    chance_tolerance: PositiveFloat
    fixed: VariantName


class ReportConfig(_Section):
    final_variant: VariantName
    seed: NonNegativeInt
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
    variants: Annotated[dict[VariantName, Variant], Field(min_length=1)]
    seeds: Annotated[list[NonNegativeInt], Field(min_length=1)]
    tracking: TrackingConfig
    report: ReportConfig

    @model_validator(mode="after")
    def _cross_checks(self) -> Params:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: each seed must appear once, got {self.seeds}")
        if self.train.lr_min >= min(v.lr for v in self.variants.values()):
            raise ValueError(f"train.lr_min: the floor {self.train.lr_min} must be below every variant's lr")
        self.variant(self.report.final_variant, field="report.final_variant")
        if self.report.seed not in self.seeds:
            raise ValueError(f"report.seed: {self.report.seed} is not one of the seeds {self.seeds}")
        for name, figure in self.report.figures.items():
            for variant in figure.variants:
                self.variant(variant, field=f"report.figures.{name}.variants")
        self.variant(self.report.guard.vanishing, field="report.guard.vanishing")
        self.variant(self.report.guard.fixed, field="report.guard.fixed")
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
    shown = "" if isinstance(got, dict) or err["type"] == "missing" else f" (got {got!r})"
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
