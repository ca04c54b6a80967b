"""The prepare stage on the real archive: split sizes and independence, class coverage, statistics, subsets."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from tests.conftest import make_cifar_archive, run_stage, write_yaml
from vggdepth.config import PrepareConfig, SubsetConfig
from vggdepth.data import PrepareError, load_prepared, prepare

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def _config(split_seed: int = 0, train=None, val=None, test=None) -> PrepareConfig:
    return PrepareConfig(split_seed=split_seed, val_size=2500, subset=SubsetConfig(train=train, val=val, test=test))


@pytest.fixture(scope="session")
def prepared(archive_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "full"
    prepare(archive_path, out, _config())
    return load_prepared(out)


def test_full_split_sizes(prepared):
    assert prepared.stats["sizes"] == {"train": 47_500, "val": 2_500, "test": 10_000}
    assert prepared.train.images.shape == (47_500, 3, 32, 32)
    assert prepared.val.images.shape == (2_500, 3, 32, 32)
    assert prepared.test.images.shape == (10_000, 3, 32, 32)
    assert prepared.train.images.dtype == np.uint8


def test_train_and_val_are_disjoint_and_cover_the_official_training_set(prepared):
    train, val = set(prepared.train.index.tolist()), set(prepared.val.index.tolist())
    assert not train & val
    assert train | val == set(range(50_000))
    assert sorted(prepared.test.index.tolist()) == list(range(10_000))


def test_every_class_is_in_every_split_with_validation_stratified(prepared):
    assert np.bincount(prepared.val.labels, minlength=100).tolist() == [25] * 100
    assert np.bincount(prepared.train.labels, minlength=100).tolist() == [475] * 100
    assert np.bincount(prepared.test.labels, minlength=100).tolist() == [100] * 100
    assert len(prepared.classes) == 100
    assert prepared.classes[:3] == ["apple", "aquarium_fish", "baby"]


def test_normalisation_statistics_match_cifar100(prepared, archive_md5):
    np.testing.assert_allclose(prepared.mean, CIFAR100_MEAN, atol=1e-3)
    np.testing.assert_allclose(prepared.std, CIFAR100_STD, atol=1e-3)
    assert prepared.stats["stats_images"] == 47_500
    assert prepared.stats["archive_md5"] == archive_md5


def test_normalisation_statistics_are_exact_to_the_last_bit(prepared):
    """Each statistic is the exact value over every training pixel, rounded once: checked against rational
    arithmetic over the raw pixels (no histogram), with only the square root rounded a second time. A correctly
    rounded value is the same on every machine; the float dot product it replaced was not (its order of summation
    is the BLAS kernel's: four kernels gave four different last bits), and the statistics enter every run's
    fingerprint, so the residual study's runs began again on a machine of another kind. This test failed on it."""
    images = prepared.train.images
    for channel, (mean, std) in enumerate(zip(prepared.mean, prepared.std, strict=True)):
        pixels = images[:, channel].astype(np.int64).ravel()
        n, total, squares = pixels.size, int(pixels.sum()), int(np.dot(pixels, pixels))
        assert mean == float(Fraction(total, 255 * n))
        assert std == math.sqrt(Fraction(n * squares - total * total, (255 * n) ** 2))


def test_images_are_the_archive_pixels(prepared, archive_path):
    from vggdepth.data import read_archive

    official_train, official_test, _ = read_archive(archive_path)
    some = prepared.val.index[:50]
    np.testing.assert_array_equal(prepared.val.images[:50], official_train.images[some])
    np.testing.assert_array_equal(prepared.val.labels[:50], official_train.labels[some])
    np.testing.assert_array_equal(prepared.test.images, official_test.images)


def test_split_does_not_depend_on_training_seeds(archive_path, raw_params, tmp_path):
    raw_params["prepare"]["subset"] = {"train": 10, "val": 5, "test": 2}
    outputs = []
    for seeds in ([0], [7, 8]):
        raw_params["seeds"] = seeds
        raw_params["report"]["seed"] = seeds[0]
        params_file = write_yaml(tmp_path / f"params-{seeds[0]}.yaml", raw_params)
        out = tmp_path / f"prepared-{seeds[0]}"
        result = run_stage("prepare", "--archive", str(archive_path), "--out", str(out), "--params", str(params_file))
        assert result.returncode == 0, result.stderr
        outputs.append(load_prepared(out))

    first, second = outputs
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(first, name).index, getattr(second, name).index)
        np.testing.assert_array_equal(getattr(first, name).images, getattr(second, name).images)


def test_another_split_seed_gives_another_split(archive_path, tmp_path):
    a = prepare(archive_path, tmp_path / "a", _config(split_seed=0, train=5, val=5, test=1))
    b = prepare(archive_path, tmp_path / "b", _config(split_seed=1, train=5, val=5, test=1))
    assert a["mean"] != b["mean"]  # the 47,500 training images differ, so their statistics do
    assert not np.array_equal(load_prepared(tmp_path / "a").val.index, load_prepared(tmp_path / "b").val.index)


def test_subset_keeps_every_class_balanced(archive_path, tmp_path):
    stats = prepare(archive_path, tmp_path / "small", _config(train=30, val=5, test=10))
    small = load_prepared(tmp_path / "small")

    assert stats["sizes"] == {"train": 3_000, "val": 500, "test": 1_000}
    assert np.bincount(small.train.labels, minlength=100).tolist() == [30] * 100
    assert np.bincount(small.val.labels, minlength=100).tolist() == [5] * 100
    assert np.bincount(small.test.labels, minlength=100).tolist() == [10] * 100
    # Statistics stay those of the whole training split, so reduced runs normalise like full ones.
    np.testing.assert_allclose(small.mean, CIFAR100_MEAN, atol=1e-3)


def test_subset_larger_than_a_class_names_the_field(archive_path, tmp_path):
    with pytest.raises(PrepareError, match=r"prepare\.subset\.val: asked for 26 images per class.* only 25"):
        prepare(archive_path, tmp_path / "out", _config(val=26))
    assert not (tmp_path / "out").exists()


def test_not_an_archive_is_a_clear_error(tmp_path):
    bogus = tmp_path / "bogus.tar.gz"
    bogus.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(PrepareError, match=r"cannot read .*bogus\.tar\.gz as the CIFAR-100 python archive"):
        prepare(bogus, tmp_path / "out", _config())


def test_archive_without_the_pickles_is_a_clear_error(tmp_path):
    import tarfile

    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz"):
        pass
    with pytest.raises(PrepareError, match="has no cifar-100-python/meta, cifar-100-python/test"):
        prepare(empty, tmp_path / "out", _config())


def test_rerun_replaces_previous_output_whole(tmp_path):
    archive = make_cifar_archive(tmp_path / "tiny.tar.gz", train_per_class=30, test_per_class=2)
    out = tmp_path / "prepared"
    cfg = PrepareConfig(split_seed=0, val_size=1000, subset=SubsetConfig(train=None, val=None, test=None))
    prepare(archive, out, cfg)
    (out / "stray.txt").write_text("from an earlier run")

    stats = prepare(archive, out, cfg)

    assert stats["sizes"] == {"train": 2_000, "val": 1_000, "test": 200}
    assert sorted(p.name for p in out.iterdir()) == ["stats.json", "test.npz", "train.npz", "val.npz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "tiny.tar.gz"]
