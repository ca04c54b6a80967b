"""A run's checkpoints: written through temporary names, read with `weights_only=True` (a tampered file runs no
code), resumed from the newest readable one, and set aside (not deleted) when they belong to other settings.

Three files per run folder (vggdepth.runs): `best.pt` (the best-validation epoch's weights), `last.pt` (everything
a run needs to continue exactly: weights, optimiser, schedule, every random state, its history and the best
epoch's weights) and `previous.pt` (the `last.pt` before, what a damaged `last.pt` falls back to). Nothing here
changes what a run computes, so this module is not part of a run's fingerprint (vggdepth.engine): rewording a
message here retrains nothing.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from vggdepth.config import ModelConfig, Variant
from vggdepth.errors import TrainingError
from vggdepth.files import atomic_path, clean_leftovers
from vggdepth.gradients import GradientRow
from vggdepth.models import VGG
from vggdepth.runs import EpochRecord, RunFiles

log = logging.getLogger(__name__)

SUPERSEDED = "superseded"  # checkpoints/superseded/<fingerprint>/: runs of other settings, kept to come back to
KEEP_SUPERSEDED = 2
# 2: loadable with torch.load(weights_only=True) (random states as plain values), best weights inside last.pt.
CHECKPOINT_FORMAT = 2
FLOAT32 = "float32"  # what a checkpoint that records no precision was trained in


class CheckpointError(TrainingError):
    """A checkpoint cannot be read: damaged, truncated, or not a checkpoint this version can load safely."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint asks for code to run when loaded: refused, never skipped past silently."""


def rng_state(generator: torch.Generator) -> dict:
    """Every random state, as tensors and plain Python values only, so checkpoints load with weights_only."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "batches": generator.get_state(),
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    generator.set_state(state["batches"].cpu())


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save through a temporary file, so a kill never leaves a truncated checkpoint."""
    with atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as exc:  # torch reports a failed write (a full disk) as a RuntimeError
            raise TrainingError(
                f"cannot write checkpoint {path}: the write failed (a full disk?): {_first_line(exc)}"
            ) from None


_CHECKPOINT_KEYS = ("format", "fingerprint", "variant", "seed", "epoch", "model", "model_config", "variant_config")
# What `last.pt` holds beyond the weights, to resume a run exactly.
_RESUME_KEYS = ("optimizer", "scheduler", "rng", "history", "gradients", "best", "best_model", "trained_on")


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """A checkpoint, read with `weights_only=True`: tensors and plain values only, so a tampered file cannot run
    code. Raises `CheckpointError` naming the file when it is missing, damaged, unsafe or not ours."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for a damaged file
        unsafe = re.search(r"GLOBAL (\S+)", str(exc))  # weights_only refused to import something
        if unsafe and unsafe.group(1).startswith("numpy"):
            raise UnsafeCheckpointError(
                f"{path} pickles NumPy objects ({unsafe.group(1)}): it is a checkpoint of an older vggdepth (format "
                f"1), which this version does not unpickle because that could run code. It was not loaded. Retrain "
                f"the run (remove {path.parent}) or load it with the version that wrote it"
            ) from None
        if unsafe:
            raise UnsafeCheckpointError(
                f"{path} asks for {unsafe.group(1)}, which a checkpoint never needs (it is not a checkpoint of "
                "this version, or it was tampered with); it was not loaded, so nothing in it ran. Remove it "
                "and re-run training to make a new one"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S.*)", str(exc))
        reason = f"unreadable pickle: {detail.group(1)}" if detail else _first_line(exc)
        raise CheckpointError(f"checkpoint {path} is damaged or truncated ({reason})") from None
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a vggdepth checkpoint (no {', '.join(missing)})")
    if state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is a checkpoint of format {state['format']}, this version reads format {CHECKPOINT_FORMAT}; "
            "remove it and re-run training"
        )
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def resume_state(files: RunFiles, device: torch.device | str = "cpu") -> tuple[dict | None, Path | None]:
    """The newest readable checkpoint of a run folder and its path: `last.pt`, else `previous.pt` when `last.pt`
    is missing or damaged (a kill between the two writes, a truncated copy); (None, None) when there is none.
    Clears what a killed writer left and removes a damaged `last.pt` it falls back past."""
    for path in (files.last, files.previous, files.best, *files.outputs):
        clean_leftovers(path)
    damaged = []
    for path in (files.last, files.previous):
        if not path.exists():
            continue
        try:
            state = load_checkpoint(path, device)
            lacking = [k for k in _RESUME_KEYS if k not in state]
            if lacking:
                raise CheckpointError(f"{path} cannot resume a run: it has no {', '.join(lacking)}")
        except UnsafeCheckpointError:
            raise  # not merely damaged: never skip past it silently
        except CheckpointError as exc:
            damaged.append((path, exc))
            continue
        for bad, exc in damaged:
            log.warning("%s; resuming from %s (end of epoch %d) instead", exc, path, state["epoch"] - 1)
            bad.unlink(missing_ok=True)
        return state, path
    if damaged:
        raise CheckpointError(
            f"{damaged[0][1]} and there is no earlier good checkpoint to fall back to. To train this run "
            f"from scratch, remove the folder: rm -r {files.checkpoints}"
        )
    return None, None


def arrange_checkpoints(
    files: RunFiles, fingerprint: str, device: torch.device | str = "cpu"
) -> tuple[dict | None, Path | None]:
    """Make `files.checkpoints` hold the checkpoints of the run `fingerprint` names, and return the newest one
    (`resume_state`), or (None, None) when there is none. Checkpoints of other settings, data or code are set
    aside in `superseded/<their fingerprint>/` (not deleted), and brought back when those settings return."""
    state, source = resume_state(files, device)
    if state is not None and state["fingerprint"] != fingerprint:
        aside = _set_aside(files, state["fingerprint"])
        log.warning("the checkpoints were made by other settings, data or training code: kept in %s", aside)
        state = None
    earlier = files.checkpoints / SUPERSEDED / fingerprint
    if state is None and (earlier / files.last.name).exists():
        for path in earlier.iterdir():
            os.replace(path, files.checkpoints / path.name)
        earlier.rmdir()
        log.warning("brought back the checkpoints made earlier with these settings from %s", earlier)
        state, source = resume_state(files, device)
    return state, source


def _set_aside(files: RunFiles, fingerprint: str) -> Path:
    """Move a run folder's checkpoints to `superseded/<fingerprint>/`, keeping the newest few such sets."""
    aside = files.checkpoints / SUPERSEDED / fingerprint
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir(parents=True)
    for path in (files.last, files.previous, files.best):
        if path.exists():
            os.replace(path, aside / path.name)
    older = sorted(aside.parent.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)[KEEP_SUPERSEDED:]
    for folder in older:
        shutil.rmtree(folder, ignore_errors=True)
    return aside


def foreign(state: dict, files: RunFiles) -> str | None:
    """Why `state` is not a checkpoint of the run its folder names (`<variant>-s<seed>`), or None when it is (or
    the folder is named otherwise)."""
    if files.run is None:
        return None
    variant, seed = files.run
    own = (str(state.get("variant"))[:64], str(state.get("seed"))[:20])
    if own == (variant, str(seed)):
        return None
    return f"is a checkpoint of {own[0]} seed {own[1]}, not of {variant} seed {seed} (its folder)"


def epochs_in(files: RunFiles, fingerprint: str) -> int:
    """Epochs of the run `fingerprint` names in a run folder (its own checkpoints, or those set aside), changing
    nothing in it."""
    earlier = files.checkpoints / SUPERSEDED / fingerprint
    for path in (files.last, files.previous, earlier / files.last.name, earlier / files.previous.name):
        try:
            state = load_checkpoint(path)
        except CheckpointError:
            continue
        if state["fingerprint"] == fingerprint:
            return state["epoch"]
    return 0


def load_network(checkpoint: dict, device: torch.device | str) -> VGG:
    """The network stored in a checkpoint, in eval mode."""
    net = VGG(ModelConfig(**checkpoint["model_config"]), Variant(**checkpoint["variant_config"]))
    net.load_state_dict(checkpoint["model"])
    return net.to(device, memory_format=torch.channels_last).eval()


# ---- a trainer's checkpoints (vggdepth.engine.Trainer) --------------------------------------------------------


def restore(trainer) -> None:
    """Continue `trainer` from its run folder's last checkpoint when it belongs to this very run
    (`arrange_checkpoints`): weights, optimiser, schedule, random states, history and best epoch."""
    files, run, cfg = trainer.files, trainer.run, trainer.cfg
    state, source = arrange_checkpoints(files, run.fingerprint, trainer.device)
    if state is None:
        return
    if state["epoch"] > cfg.epochs:
        raise TrainingError(
            f"{source} holds this run trained for {state['epoch']} epochs, more than train.epochs="
            f"{cfg.epochs}. It is kept: set train.epochs to {state['epoch']} to use it, or move "
            f"{files.checkpoints} away to train a {cfg.epochs}-epoch run"
        )
    trainer.net.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    # Every checkpoint of this code records its precision (older code has another fingerprint: never resumed).
    trained_in = state.get("precision", FLOAT32)
    if state["epoch"] < cfg.epochs:  # random states matter only to epochs still to train
        if torch.device(state["trained_on"]).type != trainer.device.type:
            raise TrainingError(
                f"{source} was trained on {state['trained_on']} up to epoch {state['epoch']}; its random "
                f"states cannot continue on {trainer.device}. Set runtime.device to "
                f"{torch.device(state['trained_on']).type} to finish it, or move {files.checkpoints} "
                "away to train it here from the start"
            )
        if trained_in != trainer.precision:
            raise TrainingError(
                f"{source} was trained in {trained_in} up to epoch {state['epoch']}; here it would continue in "
                f"{trainer.precision}, and a run never changes precision midway. Finish it where it computes in "
                f"{trained_in} (train.bf16 and a device with bfloat16 arithmetic decide it), or move "
                f"{files.checkpoints} away to train it here from the start"
            )
        set_rng_state(state["rng"], trainer.generator)
    trainer.history.extend(EpochRecord(**r) for r in state["history"])
    trainer.gradients.extend(GradientRow(**r) for r in state["gradients"])
    trainer.best = state["best"]
    trainer.best_model = state["best_model"]
    trainer.trained_on = state["trained_on"]
    run.precision = trained_in
    trainer.node = run.node = state.get("node", trainer.node)  # older checkpoints recorded no node
    run.start_epoch = state["epoch"]
    run.extra = state.get("extra", {})
    _check_best(trainer, state)
    if source == files.previous:  # last.pt was missing: make the state we resume from the last one again
        save_checkpoint(files.last, state)
    log.info("resuming %s from epoch %d of %d", source, state["epoch"], cfg.epochs)


def _check_best(trainer, state: dict) -> None:
    """best.pt must hold the best epoch's weights; rebuild it from last.pt when it is missing or damaged."""
    files = trainer.files
    expected = trainer.best["epoch"] + 1
    problem = None
    try:
        best = load_checkpoint(files.best, "cpu")
        if best["fingerprint"] != state["fingerprint"] or best["epoch"] != expected:
            problem = f"holds epoch {best['epoch'] - 1}, not the best epoch {trainer.best['epoch']}"
    except UnsafeCheckpointError:
        raise
    except CheckpointError as exc:
        problem = str(exc)
    if problem:
        log.warning("%s: %s; rewriting it from %s", files.best, problem, files.last.name)
        save_checkpoint(files.best, weights(trainer, expected, trainer.best_model))


def save_epoch(trainer, improved: bool) -> None:
    """After an epoch: `best.pt` when validation accuracy improved (`improved`), then `last.pt`. The last
    checkpoint before this one stays as `previous.pt`, so a damaged `last.pt` costs one epoch, not the run."""
    files, run = trainer.files, trainer.run
    epochs = len(trainer.history)
    if improved:
        save_checkpoint(files.best, weights(trainer, epochs, trainer.best_model))
    if files.last.exists():
        os.replace(files.last, files.previous)
    save_checkpoint(
        files.last,
        {
            **weights(trainer, epochs, trainer.net.state_dict()),
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
            "rng": rng_state(trainer.generator),
            "history": [asdict(r) for r in trainer.history],
            "gradients": [asdict(r) for r in trainer.gradients],
            "best": trainer.best,
            "best_model": trainer.best_model,
            "trained_on": trainer.trained_on,
            "precision": run.precision,
            "node": trainer.node,
            "extra": run.extra,
        },
    )


def weights(trainer, epochs: int, model: dict) -> dict:
    """A checkpoint's common part: whose weights these are, after how many epochs, and what it takes to rebuild
    the network from the checkpoint alone."""
    return {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": trainer.run.fingerprint,
        "variant": trainer.run.variant,
        "seed": trainer.seed,
        "epoch": epochs,
        "model": model,
        "model_config": trainer.model_cfg.model_dump(),
        "variant_config": trainer.variant.model_dump(),
        "mean": trainer.train_data.mean.flatten().div(255).tolist(),
        "std": trainer.train_data.std.flatten().div(255).tolist(),
    }
