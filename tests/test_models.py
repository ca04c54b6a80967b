"""The networks match SPEC.md exactly: parameter counts, structural layer names, batch-norm placement."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from torch import nn

from tests.conftest import ROOT
from tests.helpers import benchmark_script
from vggdepth.gradients import weight_tensors
from vggdepth.models import VGG, count_parameters


@pytest.mark.parametrize(("variant", "expected"), [("VGG-08", 59_716), ("VGG-38", 336_196), ("BN-VGG-38", 338_500)])
def test_parameter_counts_match_the_spec(params, variant, expected):
    assert count_parameters(VGG(params.model, params.variant(variant))) == expected


def test_vgg08_layer_names_follow_the_structure(params):
    names = [name for name, _ in weight_tensors(VGG(params.model, params.variant("VGG-08")))]
    assert names == [
        "entry.conv",
        "entry.bn",
        "stage0.reduce.conv0",
        "stage0.reduce.conv1",
        "stage1.reduce.conv0",
        "stage1.reduce.conv1",
        "stage2.reduce.conv0",
        "stage2.reduce.conv1",
        "head.linear",
    ]


def test_vgg38_has_five_processing_blocks_per_stage(params):
    names = [name for name, _ in weight_tensors(VGG(params.model, params.variant("VGG-38")))]
    convs = [n for n in names if ".conv" in n]
    assert len(convs) == 37
    assert names[2:4] == ["stage0.block0.conv0", "stage0.block0.conv1"]
    assert "stage2.block4.conv1" in names
    assert names[-3:] == ["stage2.reduce.conv0", "stage2.reduce.conv1", "head.linear"]
    assert len(names) == 39


@pytest.mark.parametrize("variant", ["VGG-08", "VGG-38", "BN-VGG-38"])
def test_output_is_one_logit_per_class(params, variant):
    net = VGG(params.model, params.variant(variant))
    assert net(torch.zeros(4, 3, 32, 32)).shape == (4, 100)


def _conv_bn_pairs(net: nn.Module) -> tuple[int, int, int]:
    modules = list(net.modules())
    convs = [i for i, m in enumerate(modules) if isinstance(m, nn.Conv2d)]
    bns = [i for i, m in enumerate(modules) if isinstance(m, nn.BatchNorm2d)]
    followed = sum(1 for i in convs if isinstance(modules[i + 1], nn.BatchNorm2d))
    return len(convs), len(bns), followed


def test_bn_variant_has_one_batch_norm_right_after_every_conv(params):
    convs, bns, followed = _conv_bn_pairs(VGG(params.model, params.variant("BN-VGG-38")))
    assert (convs, bns, followed) == (37, 37, 37)


def test_plain_variants_have_batch_norm_only_in_the_entry_block(params):
    for variant in ("VGG-08", "VGG-38"):
        net = VGG(params.model, params.variant(variant))
        assert _conv_bn_pairs(net)[1:] == (1, 1)
        assert isinstance(net.entry.bn, nn.BatchNorm2d)


def test_reduction_convs_have_bias_processing_convs_do_not(params):
    net = VGG(params.model, params.variant("BN-VGG-38"))
    assert net.stage1.reduce.conv0.bias is not None
    assert net.stage1.block2.conv0.bias is None
    assert net.entry.conv.bias is None


# ---- residual connections (rows beyond the report) ----------------------------------------------------------


@pytest.mark.parametrize(("plain", "residual"), [("VGG-38", "RC-VGG-38"), ("BN-VGG-38", "BN-RC-VGG-38")])
def test_residual_rows_are_their_plain_network_with_identity_shortcuts(params, plain, residual):
    """Same layers, names and parameters (a shortcut has none); every processing block outputs its input plus
    what it computes, and a reduction block (which changes the shape) keeps no shortcut."""
    torch.manual_seed(0)
    net = VGG(params.model, params.variant(residual)).eval()
    torch.manual_seed(0)
    same = VGG(params.model, params.variant(plain)).eval()
    assert [n for n, _ in weight_tensors(net)] == [n for n, _ in weight_tensors(same)]
    assert count_parameters(net) == count_parameters(same)
    block, x = net.stage1.block2, torch.randn(2, params.model.width, 16, 16)
    with torch.no_grad():
        assert torch.equal(block(x), x + nn.Sequential(*block.children())(x))
        assert torch.equal(net.stage1.reduce(x), same.stage1.reduce(x))
        assert not torch.equal(net(torch.randn(2, 3, 32, 32)), same(torch.randn(2, 3, 32, 32)))


def test_residual_false_leaves_every_table1_fingerprint_where_it_was(params):
    """`residual: false` is what a row was before the setting existed: its fingerprint is the one computed from
    the row without the key, and `residual: true` makes another run."""
    from vggdepth.config import Variant
    from vggdepth.engine import run_fingerprint

    stats = {"archive_md5": "0" * 32, "split_seed": 0, "sizes": {}, "subset": {}, "mean": [0.5] * 3, "std": [0.2] * 3}
    for name, variant in params.variants.items():
        before = Variant.model_validate(variant.model_dump(exclude={"residual"}))
        fingerprint = run_fingerprint(params.model, params.train, variant, 0, stats)
        if variant.residual:
            plain = variant.model_copy(update={"residual": False})
            assert fingerprint != run_fingerprint(params.model, params.train, plain, 0, stats), name
        else:
            assert fingerprint == run_fingerprint(params.model, params.train, before, 0, stats), name


def test_a_shortcut_carries_the_gradient_to_the_entry_layer_where_the_plain_network_loses_it(params, tiny_data):
    """One backward pass at initialisation on 100 real training images: VGG-38's entry-layer gradient has all but
    vanished (the study's mechanism), RC-VGG-38's, the same network with shortcuts, has not."""
    from vggdepth.batches import DeviceDataset

    images = DeviceDataset(tiny_data.train, tiny_data.mean, tiny_data.std, torch.device("cpu"))
    x = images.normalise(images.images[:100])
    y = torch.as_tensor(tiny_data.train.labels[:100]).long()
    entry = {}
    for name in ("VGG-38", "RC-VGG-38"):
        torch.manual_seed(0)
        net = VGG(params.model, params.variant(name))
        nn.functional.cross_entropy(net(x), y).backward()
        entry[name] = net.entry.conv.weight.grad.abs().mean().item()
    assert entry["VGG-38"] < 1e-8
    assert entry["RC-VGG-38"] > 1e-6 and entry["RC-VGG-38"] > 1000 * entry["VGG-38"]


def test_vgg38_at_initialisation_gives_every_image_the_same_output(params, tiny_data):
    """Why the gradients vanish, on one real training image of each class (images of the kind
    `benchmarks/signal_at_init.py` prints layer by layer): each plain convolution shrinks the part of its input that
    differs between images, and the gradient coming back shrinks as fast, so a stage's weight gradients are flat at a
    tiny level; a reduction block's biases re-fill the input with a constant, so the next stage's gradients step up
    while the image goes on fading. At the end the logits are the same for every image (to float32's rounding; in
    float64, to 4e-16). VGG-08 (7 convolutions), BN-VGG-38 and RC-VGG-38 keep the image. Measured values in the
    comments (seeds 0 to 2; seed 0 where one value is given)."""
    from vggdepth.batches import DeviceDataset

    script = benchmark_script("signal_at_init")
    images = DeviceDataset(tiny_data.train, tiny_data.mean, tiny_data.std, torch.device("cpu"))
    first = [images.labels.tolist().index(label) for label in range(100)]  # one image of each class
    x, y = images.normalise(images.images[first]), images.labels[first]

    def relative_spread(name: str, seed: int, dtype=torch.float32):
        torch.manual_seed(seed)
        net = VGG(params.model, params.variant(name)).to(dtype, memory_format=torch.channels_last).train()
        rows, logits = script.signal(net, x.to(dtype), y)
        return {row["layer"]: row for row in rows}, script.relative_spread(logits)

    for seed in (0, 1, 2):
        layers, relative = relative_spread("VGG-38", seed)
        stage0 = [row for name, row in layers.items() if name.startswith("stage0.block")]
        assert len(stage0) == 10
        end = layers["stage0.reduce.conv0"]
        assert stage0[0]["spread"] > 1e3 * end["spread"], seed  # the image fades (1.9e4 to 3.4e4)...
        assert stage0[0]["dout"] < 1e-3 * end["dout"], seed  # ...as the gradient does going back (1e-4 to 1.6e-4)...
        weights = [row["dweight"] for row in stage0]
        assert max(weights) < 10 * min(weights) < 1e-15, seed  # ...so weight gradients lie flat (2.3x, ~1e-18)
        reduce = layers["stage0.reduce.conv1"]  # after the reduction block's first bias
        assert reduce["input"] > 100 * reduce["spread"], seed  # 1,100 to 3,000 times: a constant
        assert layers["stage1.block0.conv0"]["dweight"] > 10 * max(weights), seed  # 86 to 350 times
        assert relative < 1e-6, seed  # float32 rounding at most: 0, 7e-10, 0
    assert relative_spread("VGG-38", 0, torch.float64)[1] < 1e-12  # 3.5e-16: no rounding artefact
    assert relative_spread("VGG-08", 0)[1] > 1e-3  # 2.7e-3
    assert relative_spread("RC-VGG-38", 0)[1] > 1e-3  # 5.3e-3
    layers, relative = relative_spread("BN-VGG-38", 0)
    assert relative > 0.3  # 1.0
    assert min(row["spread"] for row in layers.values()) > 0.1  # 0.32 to 1: restored at every layer


@pytest.mark.slow
def test_the_signal_script_prints_each_layer_and_which_network_loses_the_image(archive_path):
    """`benchmarks/signal_at_init.py` as a user runs it, on the real archive; a wrong variant is one line."""
    script = [sys.executable, str(ROOT / "benchmarks" / "signal_at_init.py"), "--archive", str(archive_path)]
    done = subprocess.run([*script, "--variants", "VGG-08", "VGG-38", "--seeds", "0"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.count("\n  stage0.block4.conv1 ") == 1  # VGG-38's layers; VGG-08 has no processing blocks
    relative = {name: float(value) for name, value in re.findall(r"\n  (\S+) seed 0: .*, relative (\S+)\n", out)}
    assert relative["VGG-38"] < 1e-6  # every image the same logits, to float32's rounding
    assert relative["VGG-08"] > 1e-3
    exact = subprocess.run(
        [*script, "--variants", "VGG-38", "--seeds", "0", "--float64"], capture_output=True, text=True
    )
    assert exact.returncode == 0, exact.stderr
    assert "float64, train mode" in exact.stdout
    assert float(re.search(r"VGG-38 seed 0: .*, relative (\S+)\n", exact.stdout)[1]) < 1e-12  # not float32's doing
    bf16 = subprocess.run(
        [*script, "--variants", "VGG-38", "--seeds", "0", "--bfloat16"], capture_output=True, text=True
    )
    assert bf16.returncode == 0, bf16.stderr
    assert "bfloat16 autocast, train mode" in bf16.stdout
    assert float(re.search(r"VGG-38 seed 0: .*, relative (\S+)\n", bf16.stdout)[1]) < 1e-6
    wrong = subprocess.run([*script, "--variants", "VGG-99"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "unknown variant 'VGG-99'" in wrong.stderr.splitlines()[-1]
