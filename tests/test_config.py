"""params.yaml is the single source of settings: the shipped file is valid, a bad one stops with one message."""

from __future__ import annotations

import types

import pytest

from tests.conftest import run_stage, write_yaml
from vggdepth.config import ConfigError, load_params, recorded_params

TABLE1 = {  # SPEC.md, The variants: blocks per stage, BN, LR, schedule, period, batch
    "VGG-08": (0, False, 1e-3, "cosine", 100, 100),
    "VGG-38": (5, False, 1e-3, "cosine", 100, 100),
    "BN-VGG-38": (5, True, 1e-3, "cosine", 100, 100),
    "HIGHLR-BN-38": (5, True, 7.5e-3, "cosine", 100, 100),
    "WR50-HIGHLR-BN-38": (5, True, 7.5e-3, "warm_restarts", 50, 100),
    "MBS50-BN-38": (5, True, 7.5e-3, "warm_restarts", 50, 50),
}
BEYOND = {  # the report's future work: residual shortcuts, without and with batch norm, BN-VGG-38's protocol
    "RC-VGG-38": (5, False, 1e-3, "cosine", 100, 100),
    "BN-RC-VGG-38": (5, True, 1e-3, "cosine", 100, 100),
}


def test_shipped_params_hold_table1_as_data(params):
    rows = {
        name: (v.blocks_per_stage, v.batch_norm, v.lr, v.schedule, v.period, v.batch_size)
        for name, v in params.variants.items()
    }
    assert rows == TABLE1 | BEYOND
    assert list(params.variants) == [*TABLE1, *BEYOND]  # Table 1 in the report's order, then the rows beyond it
    assert [name for name, v in params.variants.items() if v.residual] == list(BEYOND)
    assert params.seeds == [0, 1, 2]
    assert params.train.epochs == 100
    assert params.train.lr_min == 2e-5
    assert params.data.md5 == "eb9058c3a382ffc7106e4002c42a8d85"
    assert params.prepare.split_seed == 0


def test_unknown_variant_name_lists_the_known_ones(params):
    with pytest.raises(
        ConfigError, match=r"variant: unknown variant 'VGG-99'; the variants in params.yaml are: VGG-08,"
    ):
        params.variant("VGG-99")


INVALID = [
    ("unknown key", lambda p: p["train"].update(epoch=3), r"train\.epoch: unknown key; did you mean 'epochs'\?"),
    (
        "wrong type",
        lambda p: p["variants"]["VGG-08"].update(lr="fast"),
        r"variants\.VGG-08\.lr: input should be a valid number \(got 'fast'\)",
    ),
    (
        "negative learning rate",
        lambda p: p["variants"]["HIGHLR-BN-38"].update(lr=-7.5e-3),
        r"variants\.HIGHLR-BN-38\.lr: input should be greater than 0 \(got -0\.0075\)",
    ),
    (
        "batch size 0",
        lambda p: p["variants"]["MBS50-BN-38"].update(batch_size=0),
        r"variants\.MBS50-BN-38\.batch_size: input should be greater than 0 \(got 0\)",
    ),
    (
        "unknown variant name",
        lambda p: p["report"].update(final_variant="WR60-BN-38"),
        r"report\.final_variant: unknown variant 'WR60-BN-38'",
    ),
    ("empty seed list", lambda p: p.update(seeds=[]), r"seeds: list should have at least 1 item"),
    ("missing field", lambda p: p["data"].pop("md5"), r"data\.md5: field required"),
    ("bad md5", lambda p: p["data"].update(md5="xyz"), r"data\.md5: string should match pattern"),
    (
        "unknown schedule",
        lambda p: p["variants"]["VGG-38"].update(schedule="step"),
        r"variants\.VGG-38\.schedule: input should be 'cosine' or 'warm_restarts' \(got 'step'\)",
    ),
    ("repeated seed", lambda p: p.update(seeds=[0, 0]), r"seeds: each seed must appear once"),
    (
        "unsafe variant name",
        lambda p: p["variants"].update({"a b": p["variants"]["VGG-08"]}),
        r"variants\.a b\.\[key\]: string should match pattern",
    ),
]


@pytest.mark.parametrize(("mutate", "message"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_params_name_the_field(raw_params, tmp_path, mutate, message):
    mutate(raw_params)
    path = write_yaml(tmp_path / "params.yaml", raw_params)

    with pytest.raises(ConfigError, match=message) as err:
        load_params(path)

    assert str(err.value).startswith(f"{path}: invalid parameters:\n")


def test_missing_and_malformed_files_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_params(tmp_path / "absent.yaml")
    (tmp_path / "broken.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "broken.yaml")


def test_stage_stops_before_any_work_on_invalid_params(raw_params, tiny_archive, tmp_path):
    raw_params["variants"]["VGG-08"]["batch_size"] = 0
    raw_params["data"].update(url=str(tiny_archive))
    params_file = write_yaml(tmp_path / "params.yaml", raw_params)
    dest = tmp_path / "raw" / "archive.tar.gz"

    result = run_stage("download", "--out", str(dest), "--params", str(params_file))

    assert result.returncode == 1
    assert result.stderr == (
        f"error: {params_file}: invalid parameters:\n"
        "  variants.VGG-08.batch_size: input should be greater than 0 (got 0)\n"
    )
    assert not dest.parent.exists()


def test_a_record_of_runs_from_another_version_keeps_what_changes_results_and_takes_the_rest_from_here(params):
    """A CPU study's or GPU lease's record holds the params its runs trained with, perhaps of an older version whose
    `grid` had other keys (runs_per_gpu): read here, every section that changes a result is the record's, the
    settings that cannot change one are this version's."""
    raw = params.model_dump(mode="json")
    raw["grid"] = {"address": "local", "threads_per_run": 1, "runs_per_gpu": "auto"}  # before groups existed
    raw["train"]["epochs"] = 7
    read = recorded_params(raw, params, "study.json")
    assert read.train.epochs == 7 and read.grid == params.grid and read.variants == params.variants
    raw["train"]["lr_min"] = -1.0
    with pytest.raises(ConfigError, match=r"study\.json: invalid parameters:\n  train.lr_min"):
        recorded_params(raw, params, "study.json")
    with pytest.raises(ConfigError, match=r"study\.json: its params are not a mapping"):
        recorded_params([1], params, "study.json")


def _numbers(annotation, metadata: list, where: str):
    """(dotted name, constraints) of every int or float inside `annotation`: a section's fields, list items,
    mapping values and the members of a union (`int | None`, `int | "auto"`) included."""
    import typing

    from pydantic import BaseModel
    from pydantic.fields import FieldInfo

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        extra = [c for m in args[1:] for c in (m.metadata if isinstance(m, FieldInfo) else [m])]
        yield from _numbers(args[0], metadata + extra, where)
    elif annotation in (int, float):
        yield where, metadata
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        for name, info in annotation.model_fields.items():
            yield from _numbers(info.annotation, list(info.metadata), f"{where}.{name}".lstrip("."))
    elif origin is not typing.Literal:
        for i, arg in enumerate(args):
            yield from _numbers(arg, metadata if origin in (typing.Union, types.UnionType) else [], f"{where}[{i}]")


def test_every_number_in_params_has_an_upper_bound_and_no_float_may_be_infinite():
    """A value that validates must not crash a stage later (an allocation, an overflow) or mislead it: every
    number of every section is bounded above, and no section takes inf or NaN."""
    from pydantic import BaseModel

    from vggdepth import config

    numbers = list(_numbers(config.Params, [], ""))
    assert len(numbers) >= 38
    unbounded = [
        name for name, constraints in numbers if not any(hasattr(c, "le") or hasattr(c, "lt") for c in constraints)
    ]
    assert unbounded == []
    sections = [m for m in vars(config).values() if isinstance(m, type) and issubclass(m, BaseModel)]
    assert len(sections) >= 15
    for section in sections:
        if section is not BaseModel:
            assert section.model_config.get("allow_inf_nan") is False, section


BOUNDS = [
    ("variants.VGG-08.lr", float("nan"), "variants.VGG-08.lr: input should be a finite number (got nan)"),
    ("variants.VGG-08.lr", 1e30, "variants.VGG-08.lr: input should be less than or equal to 10"),
    ("variants.VGG-08.batch_size", 10**9, "variants.VGG-08.batch_size: input should be less than or equal to 50000"),
    ("variants.VGG-38.blocks_per_stage", 10**6, "variants.VGG-38.blocks_per_stage: input should be less than or equal"),
    ("train.epochs", 10**12, "train.epochs: input should be less than or equal to 100000"),
    ("runtime.threads", 10**9, "runtime.threads: input should be less than or equal to 4096"),
    ("model.width", 10**7, "model.width: input should be less than or equal to 4096"),
    ("prepare.subset.train", 501, "prepare.subset.train: input should be less than or equal to 500"),
    ("report.reference.final_test_loss", float("inf"), "report.reference.final_test_loss: input should be a finite"),
    ("report.guard.vanishing_below", float("-inf"), "report.guard.vanishing_below: input should be a finite number"),
    ("data.url", "x" * 5000, r"data.url: string should have at most 4096 characters (got 'xxx"),
]


@pytest.mark.parametrize(("key", "value", "message"), BOUNDS, ids=[f"{k}={str(v)[:8]}" for k, v, _ in BOUNDS])
def test_out_of_bounds_numbers_name_the_field_and_quote_a_bounded_excerpt(raw_params, tmp_path, key, value, message):
    *parents, last = key.split(".")
    node = raw_params
    for part in parents:
        node = node[part]
    node[last] = value
    with pytest.raises(ConfigError) as err:
        load_params(write_yaml(tmp_path / "params.yaml", raw_params))
    assert message in str(err.value)
    assert len(str(err.value)) < 500
