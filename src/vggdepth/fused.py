"""Several runs of one architecture trained at once as one network (horizontal fusion, as HFTA does): the fast
path of a GPU, where one 32-channel run at batch 100 leaves the device idle between hundreds of tiny kernels.

k runs whose networks have the same shape (same blocks per stage, batch norm and batch size; any learning rate,
schedule and seed) become one network k times as wide:
- every convolution a grouped convolution with one group per run, every batch norm over the stacked channels (per
  channel, so each run keeps its own batch statistics and running averages), the head one linear layer per run;
- run r's images go into input channels 3r..3r+2 and its logits come out as row r;
- the loss is the sum of the runs' mean cross-entropies, so each run's gradients are those of the run alone;
- Adam is elementwise, with each run's own learning rate (`FusedAdam`), stepped by each run's own schedule.
The step itself is engine.train_step, the one every run trains with (k runs: logits (k, N, classes)).
Each run keeps its own initialisation, data order and augmentation (its own generator) and its own books: every run
is a `Trainer` whose checkpoints, tables and callbacks are those of a run trained alone (its epoch time, and so its
images per second, is the group's: the runs share every step). The fused weights, batch
norm statistics and Adam moments are copied back into it at the end of every epoch, so a fused run resumes alone
and a run trained alone resumes fused. Results equal the separate runs' up to float rounding (tests/test_fused.py).

Like `runtime`, fusing changes what a run computes only through float rounding, so it is not part of a run's
fingerprint (engine.RESULT_CODE): a fused run and the same run alone resume each other.

On CUDA, with `runtime.cuda_graphs` on and every batch full, the whole step (forward, loss, backward, gradient
statistics, Adam) is captured once as a CUDA graph and replayed for each batch; the batch pipeline (shuffle, crops,
flips) stays eager. Otherwise, and always on the CPU, the step runs eagerly.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from vggdepth import engine
from vggdepth.batches import DeviceDataset, training_batches
from vggdepth.config import ModelConfig, Params, Variant
from vggdepth.data import PreparedData
from vggdepth.engine import StepLoop, Tally, Trainer, make_trainer, validate
from vggdepth.errors import TrainingError
from vggdepth.gradients import GradientRow, weight_tensors
from vggdepth.models import VGG, Head
from vggdepth.runs import Callback, EpochRecord, RunFiles

log = logging.getLogger(__name__)

WARMUP_STEPS = 3  # eager steps on a side stream before a CUDA graph is captured, as capture requires


class FusedLinear(nn.Module):
    """k linear layers side by side: (N, k, in) -> (k, N, out)."""

    def __init__(self, runs: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(runs, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(runs, out_features))

    def forward(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias.unsqueeze(1), x.transpose(0, 1), self.weight.transpose(1, 2))


class FusedHead(nn.Module):
    """Global average pool, then each run's own linear layer on its own channels."""

    def __init__(self, runs: int, width: int, classes: int):
        super().__init__()
        self.runs = runs
        self.linear = FusedLinear(runs, width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.mean(dim=(2, 3)).view(len(x), self.runs, -1))


def fused_network(model: ModelConfig, variant: Variant, runs: int) -> nn.Module:
    """The network of `variant`, `runs` times side by side; module and parameter names and order as in `VGG`,
    every tensor with the runs one after another along its first dimension (the head's stacked)."""
    net = VGG(model, variant)
    for name, module in list(net.named_modules()):
        parent, _, leaf = name.rpartition(".")
        owner = net.get_submodule(parent)
        if isinstance(module, nn.Conv2d):
            fused = nn.Conv2d(
                module.in_channels * runs,
                module.out_channels * runs,
                module.kernel_size,
                padding=module.padding,
                groups=runs,
                bias=module.bias is not None,
            )
        elif isinstance(module, nn.BatchNorm2d):
            fused = nn.BatchNorm2d(module.num_features * runs, eps=module.eps, momentum=module.momentum)
        elif isinstance(module, Head):
            fused = FusedHead(runs, module.linear.in_features, module.linear.out_features)
        else:
            continue
        setattr(owner, leaf, fused)
    return net


def fuse_states(states: Sequence[dict[str, Tensor]], shapes: dict[str, torch.Size]) -> dict[str, Tensor]:
    """The fused state of k single-run states: each tensor's runs one after another (scalars, the batch-norm step
    counts, are equal in every run and taken once)."""
    fused = {}
    for key, shape in shapes.items():
        tensors = [s[key] for s in states]
        fused[key] = tensors[0] if tensors[0].dim() == 0 else torch.stack([t.reshape(-1) for t in tensors]).view(shape)
    return fused


def split_state(state: dict[str, Tensor], runs: int, shapes: dict[str, torch.Size]) -> list[dict[str, Tensor]]:
    """The k single-run states of a fused one (`shapes`: a single run's)."""
    return [
        {
            key: t.clone() if t.dim() == 0 else t.reshape(runs, -1)[r].reshape(shapes[key]).clone()
            for key, t in state.items()
        }
        for r in range(runs)
    ]


def by_run(t: Tensor, runs: int) -> Tensor:
    """A fused tensor as (runs, ...): a view, whatever its memory layout."""
    return t.unflatten(0, (runs, -1))


class FusedAdam:
    """Adam (torch.optim.Adam's update, no amsgrad) over fused parameters, with a learning rate per run. State in
    tensors only, the step count too, so that a CUDA graph can hold the step."""

    def __init__(
        self, params: list[nn.Parameter], runs: int, betas: tuple[float, float], eps: float, weight_decay: float
    ):
        device = params[0].device
        self.params, self.runs = params, runs
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay = eps, weight_decay
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.steps = torch.zeros((), dtype=torch.float64, device=device)
        self.lr = torch.zeros(runs, dtype=torch.float64, device=device)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        bias1 = 1 - torch.pow(self.beta1, self.steps)
        bias2_sqrt = (1 - torch.pow(self.beta2, self.steps)).sqrt()
        step_size = self.lr / bias1
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True):
            g = p.grad if self.weight_decay == 0 else p.grad.add(p, alpha=self.weight_decay)
            m.lerp_(g, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            update = by_run(m, self.runs) / (by_run(v, self.runs).sqrt() / bias2_sqrt.to(p.dtype)).add_(self.eps)
            by_run(p, self.runs).sub_(step_size.to(p.dtype).view(-1, *[1] * (update.dim() - 1)) * update)


class FusedRecorder:
    """GradientRecorder's statistics for each run of a fused network, accumulated in place on the device (so a
    CUDA graph can hold them); steps are counted by the caller."""

    def __init__(self, net: nn.Module, runs: int):
        named = weight_tensors(net)
        self.layers, self.params, self.runs = [n for n, _ in named], [p for _, p in named], runs
        device = self.params[0].device
        shape = (len(self.params), runs)
        self.l1_sum, self.l2_sum, self.last_l1 = (
            torch.zeros(shape, dtype=torch.float64, device=device) for _ in range(3)
        )
        self.numel = torch.tensor([p.numel() // runs for p in self.params], dtype=torch.float64, device=device)

    def reset(self) -> None:
        for t in (self.l1_sum, self.l2_sum, self.last_l1):
            t.zero_()

    def _norms(self, tensors: list[Tensor], ord: int) -> Tensor:
        return torch.stack(
            [torch.linalg.vector_norm(by_run(t, self.runs), ord, dim=tuple(range(1, t.dim() + 1))) for t in tensors]
        ).double()

    @torch.no_grad()
    def after_backward(self) -> None:
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]
        l1 = self._norms(grads, 1)
        self.l1_sum += l1
        self.l2_sum += self._norms(grads, 2)
        self.last_l1.copy_(l1)

    @torch.no_grad()
    def epoch_rows(self, epoch: int, steps: int) -> list[list[GradientRow]]:
        """Each run's rows of the epoch, read back once; then start a new epoch."""
        weight_l2 = self._norms([p.detach() for p in self.params], 2)
        numel = self.numel.view(-1, 1)
        table = torch.stack([self.l1_sum / numel / steps, self.last_l1 / numel, self.l2_sum / steps, weight_l2]).cpu()
        sizes = self.numel.long().tolist()
        self.reset()
        return [
            [
                GradientRow(epoch, layer, i, sizes[i], *(float(v) for v in table[:, i, r]))
                for i, layer in enumerate(self.layers)
            ]
            for r in range(self.runs)
        ]


def fusable(a: Variant, b: Variant) -> bool:
    """Whether runs of these variants can share one fused network: same shape and the same steps per epoch."""
    shape = ("blocks_per_stage", "batch_norm", "residual", "batch_size")
    return all(getattr(a, key) == getattr(b, key) for key in shape)


def fusion_groups(params: Params, runs: Sequence[tuple[str, int]], most: int) -> list[list[tuple[str, int]]]:
    """`runs` in groups of at most `most` that can be fused, in the order of each group's first run."""
    groups: list[list[tuple[str, int]]] = []
    for variant, seed in runs:
        home = next(
            (
                g
                for g in groups
                if len(g) < most
                and fusable(params.variant(g[0][0], field="variant"), params.variant(variant, field="variant"))
            ),
            None,
        )
        if home is None:
            groups.append(home := [])
        home.append((variant, seed))
    return groups


class FusedTrainer(StepLoop):
    """Trains `trainers` (runs that `fusable` allows together) as one fused network; each keeps its own books."""

    def __init__(self, trainers: list[Trainer]):
        first = trainers[0]
        for t in trainers[1:]:
            same = (t.cfg, t.model_cfg, t.device) == (first.cfg, first.model_cfg, first.device)
            if not fusable(first.variant, t.variant) or not same:
                raise TrainingError(
                    f"{t.run.variant} seed {t.seed} cannot be fused with {first.run.variant} seed {first.seed}: "
                    "fused runs need the same blocks per stage, batch norm, batch size, model, training protocol "
                    "and device"
                )
        self.trainers, self.k = trainers, len(trainers)
        self.device, self.cfg, self.runtime = first.device, first.cfg, first.runtime
        self.batch_size = first.variant.batch_size
        self.autocast = first.autocast
        # One copy of the data on the device for every run; each run draws its own batches from it.
        self.train_data, self.val_data = first.train_data, first.val_data
        for t in trainers:
            t.train_data, t.val_data = self.train_data, self.val_data
        self.shapes = {k: v.shape for k, v in first.net.state_dict().items()}
        self.net = fused_network(first.model_cfg, first.variant, self.k).to(
            self.device, memory_format=torch.channels_last
        )
        group = first.optimizer.param_groups[0]
        self.optimizer = FusedAdam(
            list(self.net.parameters()), self.k, group["betas"], group["eps"], group["weight_decay"]
        )
        self.recorder = FusedRecorder(self.net, self.k) if first.recorder is not None else None
        self.tally = Tally(self.k, self.device)
        full_batches = len(self.train_data) % self.batch_size == 0
        self.graphed = self.device.type == "cuda" and self.runtime.cuda_graphs and full_batches
        if self.device.type == "cuda" and self.runtime.cuda_graphs and not full_batches:
            log.warning(
                "no CUDA graph: %d training images do not split into full batches of %d",
                len(self.train_data),
                self.batch_size,
            )
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[Tensor, Tensor] | None = None
        self.eager_steps = 0
        self.active = list(range(self.k))  # runs still training; a run that fails leaves the books, not the net
        self.outcome: list[dict | BaseException | None] = [None] * self.k

    @property
    def names(self) -> list[str]:
        return [t.files.root.name for t in self.trainers]

    # ---- the fused state and the runs' books -------------------------------------------------------------

    def begin(self) -> None:
        """Every run restored from its checkpoint (or fresh) and told to its callbacks, then the fused weights and
        Adam state loaded from the runs' own."""
        begun: list[Trainer] = []
        try:
            for t in self.trainers:
                t.begin()
                begun.append(t)
            self._load_from_runs()
        except BaseException as error:  # the runs already begun learn that they stopped
            for t in begun:
                t.fail(error)
            raise

    def _load_from_runs(self) -> None:
        epochs = {t.run.start_epoch for t in self.trainers}
        if len(epochs) > 1:
            detail = ", ".join(f"{t.files.root.name} at epoch {t.run.start_epoch}" for t in self.trainers)
            raise TrainingError(f"fused runs must resume from the same epoch ({detail}); train them one by one")
        fused_shapes = {k: v.shape for k, v in self.net.state_dict().items()}
        self.net.load_state_dict(fuse_states([t.net.state_dict() for t in self.trainers], fused_shapes))
        states = [[t.optimizer.state.get(p, {}) for p in t.net.parameters()] for t in self.trainers]
        steps = {float(s["step"]) if s else 0.0 for run in states for s in run}
        if len(steps) > 1:
            raise TrainingError(f"fused runs must have taken the same number of Adam steps; found {sorted(steps)}")
        self.optimizer.steps.fill_(steps.pop())
        for i, p in enumerate(self.optimizer.params):
            for moment, store in (("exp_avg", self.optimizer.exp_avg), ("exp_avg_sq", self.optimizer.exp_avg_sq)):
                if states[0][i]:
                    store[i].copy_(fuse_states([{"t": run[i][moment]} for run in states], {"t": p.shape})["t"])

    @torch.no_grad()
    def _copy_to_runs(self) -> None:
        """The fused weights, batch-norm statistics and Adam state back into each run's own network and Adam."""
        for t, state in zip(self.trainers, split_state(self.net.state_dict(), self.k, self.shapes), strict=True):
            t.net.load_state_dict(state)
        step = float(self.optimizer.steps)
        for i in range(len(self.optimizer.params)):
            m = by_run(self.optimizer.exp_avg[i], self.k)
            v = by_run(self.optimizer.exp_avg_sq[i], self.k)
            for r, t in enumerate(self.trainers):
                own = list(t.net.parameters())[i]
                t.optimizer.state[own] = {
                    "step": torch.tensor(step, dtype=torch.float32),
                    "exp_avg": m[r].reshape(own.shape).clone(memory_format=torch.preserve_format),
                    "exp_avg_sq": v[r].reshape(own.shape).clone(memory_format=torch.preserve_format),
                }

    def start_epoch(self) -> list[float]:
        """Every run marks where its epoch trains; each run's learning rate, which the fused Adam takes."""
        lrs = [t.start_epoch() for t in self.trainers]
        self.optimizer.lr.copy_(torch.tensor(lrs, dtype=torch.float64))
        return lrs

    # ---- one step, eager or graphed -------------------------------------------------------------------------

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Each run's own shuffled, augmented batch (its generator), side by side: (N, 3k, 32, 32) and (k, N)."""
        streams = [
            training_batches(self.train_data, self.batch_size, self.cfg.augment, t.generator) for t in self.trainers
        ]
        for pairs in zip(*streams, strict=True):
            x = torch.cat([x for x, _ in pairs], dim=1).contiguous(memory_format=torch.channels_last)
            yield x, torch.stack([y for _, y in pairs])

    def _eager(self, x: Tensor, y: Tensor) -> None:
        self.optimizer.zero_grad()
        engine.train_step(self.net, self.optimizer, self.recorder, x, y, self.tally, self.autocast)

    def step(self, x: Tensor, y: Tensor) -> None:
        """engine.train_step of every run at once: eagerly, or (on CUDA) replayed from a CUDA graph captured after
        a few eager steps on a side stream."""
        if self.graph is not None:
            self.static[0].copy_(x)
            self.static[1].copy_(y)
            self.graph.replay()
        elif not self.graphed:
            self._eager(x, y)
        elif self.eager_steps < WARMUP_STEPS:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._eager(x, y)
            torch.cuda.current_stream().wait_stream(side)
            self.eager_steps += 1
        else:
            self._capture(x, y)

    def _capture(self, x: Tensor, y: Tensor) -> None:
        """Capture the step on this batch and replay it (capture alone computes nothing); eager if capture fails."""
        self.static = (x.clone(memory_format=torch.channels_last), y.clone())
        self.optimizer.zero_grad()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                engine.train_step(self.net, self.optimizer, self.recorder, *self.static, self.tally, self.autocast)
        except Exception as exc:  # the eager step is the same computation
            log.warning("CUDA graph capture failed (%s); training eagerly", exc)
            self.graphed, self.static = False, None
            torch.cuda.synchronize()
            self._eager(x, y)
            return
        self.graph = graph
        graph.replay()

    # ---- epochs -----------------------------------------------------------------------------------------------

    def check_finite(self, epoch: int) -> None:
        """A run whose loss became NaN or infinite stops with the message a run alone gives; the others go on."""
        first_bad = self.tally.first_bad.tolist()
        for r in list(self.active):
            try:
                self.trainers[r].stop_if_not_finite(first_bad[r], epoch)
            except TrainingError as error:
                self._stop(r, error)

    def evaluate(self, data: DeviceDataset) -> tuple[list[float], list[float]]:
        """Each run's sample-weighted mean loss and accuracy in eval mode (the same images for every run)."""
        self.net.eval()
        return validate(self.net, data, self.runtime.eval_batch_size, self.autocast, self.k)

    def _stop(self, r: int, error: BaseException) -> None:
        self.active.remove(r)
        self.outcome[r] = error
        self.trainers[r].fail(error)
        log.warning("%s stopped: %s", self.names[r], error)

    def _epoch(self, epoch: int) -> None:
        started = time.perf_counter()
        lrs = self.start_epoch()
        steps = math.ceil(len(self.train_data) / self.batch_size)
        desc = f"{self.names[0]} and {self.k - 1} more, epoch {epoch + 1}/{self.cfg.epochs}"
        with tqdm(total=steps, desc=desc, unit="step", disable=not sys.stderr.isatty()) as bar:
            train_loss, train_acc, steps = self.train_epoch(epoch, bar)
            val_loss, val_acc = self.evaluate(self.val_data)
        rows = self.recorder.epoch_rows(epoch, steps) if self.recorder is not None else [[] for _ in self.trainers]
        self._copy_to_runs()
        seconds = time.perf_counter() - started
        for r in list(self.active):
            record = EpochRecord(epoch, train_loss[r], train_acc[r], val_loss[r], val_acc[r], lrs[r], seconds)
            try:
                with warnings.catch_warnings():  # the run's Adam was stepped, through the fused one
                    warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
                    self.trainers[r].end_epoch(record, rows[r])
            except Exception as error:  # this run's books or callbacks stop it; the others go on
                self._stop(r, error)

    def fit(self) -> list[dict | BaseException]:
        """Train every run to `train.epochs`; for each run, its summary or the error that stopped it."""
        self.begin()
        log.info("training %s fused (%s)", ", ".join(self.names), "CUDA graph" if self.graphed else "eager")
        try:
            for epoch in range(self.trainers[0].run.start_epoch, self.cfg.epochs):
                if not self.active:
                    break
                self._epoch(epoch)
        except BaseException as error:  # an interrupt, or a failure of the fused step itself: every run stops
            for r in list(self.active):
                self._stop(r, error)
            raise
        for r in list(self.active):
            try:
                summary = self.trainers[r].conclude()
            except Exception as error:
                self._stop(r, error)
                continue
            self.trainers[r].end(summary)
            self.outcome[r] = summary
        return self.outcome


def train_fused(
    params: Params,
    runs: Sequence[tuple[str, int]],
    data: PreparedData,
    out: Path,
    callbacks: Callable[[str, int], list[Callback]] = lambda variant, seed: [],
) -> FusedTrainer:
    """Train `runs` ((variant, seed) pairs that `fusable` allows together) fused into `out/<variant>-s<seed>`,
    the folders a run trained alone writes. Returns the fused trainer, its `outcome` filled in."""
    trainers = [
        make_trainer(params, variant, seed, data, RunFiles.of(out, variant, seed).root, callbacks(variant, seed))
        for variant, seed in runs
    ]
    fused = FusedTrainer(trainers)
    fused.fit()
    return fused
