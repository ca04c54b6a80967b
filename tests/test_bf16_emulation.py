"""bfloat16 emulated in float32 kernels (vggdepth.bf16_emulation): the arithmetic of CPU autocast, on real images
and real layers, checked against an exact reference, against PyTorch's own bfloat16 kernels and against float32."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import ROOT
from vggdepth import bf16_emulation
from vggdepth.batches import DeviceDataset
from vggdepth.models import VGG

CPU = torch.device("cpu")
BF16 = torch.bfloat16


@pytest.fixture
def emulation():
    """Installed for the test (on a CPU with bfloat16 arithmetic too: `force`), removed after."""
    assert bf16_emulation.install(force=True)
    yield
    assert bf16_emulation.uninstall()


@pytest.fixture(scope="module")
def images(tiny_data):
    """The tiny split's first 100 real training images, normalised and channels-last, and their labels."""
    x, y = next(DeviceDataset(tiny_data.train, tiny_data.mean, tiny_data.std, CPU).batches(100))
    return x, y


def vgg08(params, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return VGG(params.model, params.variants["VGG-08"]).to(memory_format=torch.channels_last)


def exact(x: torch.Tensor | None) -> torch.Tensor | None:
    """`x` rounded to bfloat16, in float64: autocast's operand, where every product and sum is exact enough."""
    return None if x is None else x.to(BF16).double()


def check_rounded_from_exact(result: torch.Tensor, reference: torch.Tensor, magnitude: torch.Tensor) -> None:
    """`result` (bfloat16) is the exact `reference` rounded to bfloat16, nearly always bit for bit; elsewhere
    within one bfloat16 step plus what float32 summation may lose: a few float32 steps of `magnitude`, the
    same sum over the products' absolute values (where terms cancel, that is more than a bfloat16 step of the
    result)."""
    assert result.dtype == BF16
    expected = reference.to(BF16)
    assert (result == expected).float().mean() > 0.99
    bound = reference.abs() * 2.0**-8 + magnitude * 2.0**-20
    assert ((result.double() - reference).abs() <= bound).all()


def layer_inputs(net: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each convolution's float32 input on `x` (a forward pass without autocast)."""
    seen = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0].detach()))
        for name, m in net.named_modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.usefixtures("emulation")
def test_an_emulated_convolution_is_autocasts_arithmetic_forward_and_backward(params, images):
    """On real images through VGG-08's entry convolution and its last, called as the network calls them (the
    modules): the output and both gradients are the exact products and sums of the bfloat16-rounded operands,
    rounded to bfloat16 once: bfloat16 operands with float32 accumulation, as oneDNN's bfloat16 primitives define
    it. (PyTorch's fallback on a CPU without bfloat16 arithmetic rounds more often, and fails this: its weight
    gradient accumulates image by image in bfloat16.)"""
    net = vgg08(params)
    inputs = layer_inputs(net, images[0])
    convs = dict(net.named_modules())
    for name in ("entry.conv", list(inputs)[-1]):
        conv, x = convs[name], inputs[name].clone().requires_grad_()
        args = (conv.stride, conv.padding)
        with torch.autocast("cpu", dtype=BF16, cache_enabled=False):
            out = conv(x)
        reference = F.conv2d(exact(x), exact(conv.weight), exact(conv.bias), *args)
        bias = None if conv.bias is None else exact(conv.bias).abs()
        check_rounded_from_exact(out, reference, F.conv2d(exact(x).abs(), exact(conv.weight).abs(), bias, *args))

        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(BF16)
        conv.weight.grad = None
        out.backward(g)
        gw = torch.nn.grad.conv2d_weight(exact(x), conv.weight.shape, g.double(), *args)
        gw_size = torch.nn.grad.conv2d_weight(exact(x).abs(), conv.weight.shape, g.double().abs(), *args)
        gx = torch.nn.grad.conv2d_input(x.shape, exact(conv.weight), g.double(), *args)
        gx_size = torch.nn.grad.conv2d_input(x.shape, exact(conv.weight).abs(), g.double().abs(), *args)
        assert torch.equal(conv.weight.grad, conv.weight.grad.to(BF16).float())  # bfloat16 values, in float32
        check_rounded_from_exact(conv.weight.grad.to(BF16), gw, gw_size)
        check_rounded_from_exact(x.grad.to(BF16), gx, gx_size)

    with torch.no_grad():  # the head's linear layer, on its real input, the same way
        features = torch.nn.Sequential(*list(net)[:-1])(images[0]).mean(dim=(2, 3))
    w, b = net.head.linear.weight, net.head.linear.bias
    with torch.autocast("cpu", dtype=BF16, cache_enabled=False):
        logits = net.head.linear(features)
    size = F.linear(exact(features).abs(), exact(w).abs(), exact(b).abs())
    check_rounded_from_exact(logits, F.linear(exact(features), exact(w), exact(b)), size)


def test_outside_bfloat16_autocast_nothing_changes(params, images, emulation):
    """float32 and float64 compute as before, bit for bit (float64 under bfloat16 autocast too); the mark says it
    is installed, and only once."""
    net = vgg08(params)
    conv, x = net.entry.conv, images[0]
    original = F.conv2d.bf16_emulated
    assert torch.equal(F.conv2d(x, conv.weight, conv.bias, 1, 1), original(x, conv.weight, conv.bias, 1, 1))
    with torch.autocast("cpu", dtype=BF16):  # float64, which autocast leaves alone, is left alone
        assert torch.equal(
            F.conv2d(x.double(), conv.weight.double(), None, 1, 1),
            original(x.double(), conv.weight.double(), None, 1, 1),
        )
    with torch.autocast("cpu", dtype=torch.float16):  # another autocast dtype: not this module's business
        assert F.conv2d(x, conv.weight, conv.bias, 1, 1).dtype == original(x, conv.weight, conv.bias, 1, 1).dtype
    assert torch.cpu.get_capabilities()[bf16_emulation.EMULATED] and not bf16_emulation.native()
    assert not bf16_emulation.install(force=True)  # already


def test_a_training_step_lands_beside_pytorchs_bfloat16_not_beside_float32(params, images):
    """One forward and backward of VGG-08 on real images: the emulated gradients are several times closer to
    PyTorch's bfloat16 kernels' (this CPU's, native or emulated by PyTorch) than float32's are."""
    x, y = images

    def gradients(way: str) -> dict[str, torch.Tensor]:
        net = vgg08(params)
        with torch.autocast("cpu", dtype=BF16, enabled=way != "float32", cache_enabled=False):
            logits = net(x)
        F.cross_entropy(logits.float(), y).backward()
        return {name: p.grad for name, p in net.named_parameters()}

    def distance(a: dict, b: dict) -> float:
        return statistics.median(((a[k] - b[k]).norm() / b[k].norm()).item() for k in b)

    pytorch, float32 = gradients("pytorch"), gradients("float32")
    bf16_emulation.install(force=True)
    try:
        emulated = gradients("emulated")
    finally:
        bf16_emulation.uninstall()
    assert not hasattr(F.conv2d, "bf16_emulated")
    assert distance(emulated, pytorch) > 0  # it computed, not PyTorch's kernels
    assert distance(emulated, pytorch) < distance(float32, pytorch) / 2, (
        distance(emulated, pytorch),
        distance(float32, pytorch),
    )


def test_the_stages_processes_install_it_through_sitecustomize_where_the_cpu_has_no_bfloat16(tmp_path):
    """What the CPU study's stages get (benchmarks/cpu_study.py `env`): with the variable set and the folder on
    PYTHONPATH, a process that imports torch trains in bfloat16 here (the trainer's own question answered yes), by
    emulation where this CPU has no bfloat16 arithmetic and natively where it has; `force` installs it on any CPU;
    without the variable, as before. A `sitecustomize` further down the path still runs."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import sys; print('the other sitecustomize', file=sys.stderr)")

    def precision(**env: str) -> list[str]:
        code = (
            "import torch.nn.functional as F, torch; from vggdepth.engine import training_precision; "
            "print(training_precision(torch.device('cpu'), True), hasattr(F.conv2d, 'bf16_emulated'))"
        )
        path = os.pathsep.join([str(ROOT / "benchmarks" / "bf16_emulation"), str(ROOT / "src"), str(other)])
        clean = {k: v for k, v in os.environ.items() if k != bf16_emulation.ENV}
        done = subprocess.run(
            [sys.executable, "-c", code], env={**clean, "PYTHONPATH": path, **env}, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        assert "the other sitecustomize" in done.stderr
        return done.stdout.split()

    native = bf16_emulation.native()
    assert precision(**{bf16_emulation.ENV: "1"}) == ["bfloat16", str(not native)]
    assert precision(**{bf16_emulation.ENV: "force"}) == ["bfloat16", "True"]
    assert precision() == ["bfloat16" if native else "float32", "False"]
