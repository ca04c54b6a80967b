"""bfloat16 autocast at float32's speed on a CPU without bfloat16 arithmetic, for runs that began in bfloat16.

A run never changes precision midway (`engine.training_precision`), and a run begun in bfloat16 on a CPU with
AVX512-BF16 or AMX could so far go on only on such a CPU: elsewhere PyTorch's bfloat16 convolutions are about ten
times slower than float32 ones (README "The study at full size"). Under CPU autocast a convolution or linear layer
takes bfloat16 operands, and oneDNN's bfloat16 primitives (the kernels of CPUs that have the arithmetic) multiply
them, accumulate in float32 and round the result to bfloat16. A product of two bfloat16 numbers (8-bit
significands) is exact in float32 (24 bits), so float32 kernels given the same rounded operands compute the same
thing; only the order of the float32 sums differs, as it does between AVX512-BF16 and AMX kernels or between
thread counts.

`install()` makes `torch.nn.functional.conv2d` and `linear` do exactly that whenever CPU autocast is on in
bfloat16 (round the input, weight and bias to bfloat16, compute in float32, round the output to bfloat16; in
backward, autograd's casts round the gradients to bfloat16 once), and makes `torch.cpu.get_capabilities()` say
that this CPU trains in bfloat16 (`avx512_bf16`, with `bf16_emulated` beside it), so that a trainer that asks
(`engine.cpu_computes_bf16`) trains in bfloat16. Everything else under autocast (batch norm, activations, pooling,
the loss) runs as before. Only these two functions are emulated (what the study's networks compute with, through
`nn.Conv2d` and `nn.Linear`); `torch.conv2d` called directly, other convolutions, matmul and the GPU path's
`fused.FusedLinear` (`torch.baddbmm`) keep PyTorch's kernels. PyTorch's own fallback on such a CPU rounds more
often (its weight gradients accumulate image by image in bfloat16), so the emulation is nearer to the arithmetic's
definition than that fallback is (tests/test_bf16_emulation.py). It stands alone (only torch), so that a study's
checkout of an older commit can use it through `benchmarks/bf16_emulation/sitecustomize.py` without its own code
changing.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

ENV = "VGGDEPTH_BF16_EMULATION"  # 1: the processes that should train this way (sitecustomize.py); force: even
# where the CPU has bfloat16 arithmetic (for tests of the mechanism on any machine)
EMULATED = "bf16_emulated"  # the key `get_capabilities()` carries once installed

log = logging.getLogger(__name__)


def native() -> bool:
    """Whether this CPU has bfloat16 arithmetic of its own (nothing to emulate)."""
    capabilities = torch.cpu.get_capabilities()
    return not capabilities.get(EMULATED) and bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def _in_bf16_autocast(tensor: torch.Tensor) -> bool:
    """Whether autocast would cast `tensor` to bfloat16 here: on the CPU, in bfloat16 autocast, a floating-point
    tensor that is not float64 (which autocast leaves alone)."""
    return (
        tensor.device.type == "cpu"
        and tensor.is_floating_point()
        and tensor.dtype != torch.float64
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )


def _rounded(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """`tensor`'s values rounded to bfloat16 (as autocast casts them), held in float32."""
    if tensor is None or not tensor.is_floating_point():
        return tensor
    return tensor.to(torch.bfloat16).to(torch.float32)


def emulated(op):
    """`op` (conv2d or linear: input, weight, bias, ...) computed under bfloat16 autocast on bfloat16-rounded
    float32 operands, its result rounded to bfloat16; outside bfloat16 CPU autocast, `op` unchanged."""

    @functools.wraps(op)
    def wrapper(input, weight, bias=None, *args, **kwargs):
        if not _in_bf16_autocast(input):
            return op(input, weight, bias, *args, **kwargs)
        with torch.autocast("cpu", enabled=False):
            out = op(_rounded(input), _rounded(weight), _rounded(bias), *args, **kwargs)
        return out.to(torch.bfloat16)

    wrapper.bf16_emulated = op  # the original, and the mark that it is installed
    return wrapper


def install(force: bool = False) -> bool:
    """Emulate bfloat16 arithmetic in this process (see the module's docstring); False, and nothing changed, where
    it is installed already or the CPU has its own (unless `force`: to compare the two)."""
    if hasattr(F.conv2d, "bf16_emulated") or (native() and not force):
        return False
    F.conv2d = emulated(F.conv2d)
    F.linear = emulated(F.linear)
    capabilities = torch.cpu.get_capabilities

    @functools.wraps(capabilities)
    def with_bf16() -> dict:
        return {**capabilities(), "avx512_bf16": True, EMULATED: True}

    with_bf16.bf16_emulated = capabilities
    torch.cpu.get_capabilities = with_bf16
    log.info("bfloat16 emulated: conv2d and linear compute on bfloat16-rounded operands in float32")
    return True


def uninstall() -> bool:
    """Undo `install`; False where it was not installed."""
    if not hasattr(F.conv2d, "bf16_emulated"):
        return False
    F.conv2d, F.linear = F.conv2d.bf16_emulated, F.linear.bf16_emulated
    torch.cpu.get_capabilities = torch.cpu.get_capabilities.bf16_emulated
    return True
