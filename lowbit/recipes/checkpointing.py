"""Training checkpoints: the model and optimizer through ``torch.distributed.checkpoint`` (DCP).

A checkpoint directory ``checkpoints/step_<k>/`` holds

    model.safetensors, lowbit.json, tokenizer/   the plain float model (for eval / fine-tuning)
    dcp/                                         model + optimizer state, DCP format
    training_state.pt                            step, LR scheduler, RNG, losses (from rank 0)

DCP stores every tensor with its global shape, so a run saved on N processes resumes on M (the
optimizers' quantized states have a world-size-independent layout, see ``lowbit.optim.sharding``).
All ranks write into one temporary directory, which rank 0 renames once every rank is done: a rank
that dies mid-save leaves the previous checkpoint complete and loadable. Ctrl-C during a save lets
the save finish (a second Ctrl-C abandons it and removes the temporary directory), then stops the run
with ``KeyboardInterrupt``.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import threading
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from lowbit.models.checkpoint import CorruptCheckpointError, commit_dir, read_meta, save_model_dir
from lowbit.recipes.config import ConfigError
from lowbit.recipes.distributed import Runtime

DCP_DIR = "dcp"
STATE_FILE = "training_state.pt"
log = logging.getLogger("lowbit")


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    cls = type(optimizer)
    return f"{cls.__module__}.{cls.__qualname__}"


def save(final: Path, rt: Runtime, model, optimizer, meta: dict, state: dict, tokenizer_dir: Path,
         float_weights) -> None:
    """Write checkpoint ``final`` atomically; a collective: every rank calls it. ``float_weights`` maps the
    full model state dict to what ``model.safetensors`` holds (``TrainingRecipe.float_weights``)."""
    with _interrupt_after_write():
        _save(final, rt, model, optimizer, meta, state, tokenizer_dir, float_weights)


def _save(final: Path, rt: Runtime, model, optimizer, meta: dict, state: dict, tokenizer_dir: Path,
          float_weights) -> None:
    tmp = final.with_name(f".tmp-{final.name}")
    if rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    rt.barrier()
    try:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with _single_process_quiet(rt):
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / DCP_DIR))
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rt.is_main:
            save_model_dir(tmp, float_weights(full), {**meta, "optimizer": optimizer_name(optimizer)},
                           tokenizer_dir)
            torch.save(state, tmp / STATE_FILE)
    except BaseException:
        if not rt.distributed:  # with several ranks the next run's start removes the leftover
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    rt.barrier()
    if rt.is_main:
        commit_dir(tmp, final)
    rt.barrier()


def check_compatible(ckpt: Path, model_args: dict, optimizer) -> None:
    """Raise ``ConfigError`` saying what differs if ``ckpt`` was written for another model or optimizer."""
    meta = read_meta(ckpt)
    if not (ckpt / DCP_DIR / ".metadata").exists():
        raise ConfigError(f"cannot resume from {ckpt}: it has no {DCP_DIR}/ training state "
                          "(written by an older lowbit or without an optimizer)")
    saved = meta.get("model_args", {})
    diff = {k: (saved.get(k), v) for k, v in model_args.items() if saved.get(k) != v}
    if diff:
        what = ", ".join(f"{k}: checkpoint {a!r} vs this run {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"cannot resume from {ckpt}: it holds another model ({what})")
    want = optimizer_name(optimizer)
    if meta.get("optimizer") != want:
        raise ConfigError(
            f"cannot resume from {ckpt}: it was written with optimizer {meta.get('optimizer')}, "
            f"this run uses {want}"
        )


def load(ckpt: Path, rt: Runtime, model, optimizer) -> dict:
    """Load model and optimizer state from ``ckpt`` (any world size); returns ``training_state.pt``."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _single_process_quiet(rt):
        dcp.load({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(ckpt / DCP_DIR))
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    return load_training_state(ckpt / STATE_FILE)


def load_training_state(path: Path) -> dict:
    """``training_state.pt``, loaded with ``weights_only=True`` only (plain tensors, numbers, lists)."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:  # torch's message would suggest weights_only=False: never for a checkpoint
        raise CorruptCheckpointError(f"{path} is corrupt: not a torch archive of plain tensors and numbers "
                                     f"({type(e).__name__})") from None
    missing = [k for k in ("step", "lr_scheduler", "rng", "losses")
               if not isinstance(state, dict) or k not in state]
    if missing:
        raise CorruptCheckpointError(f"{path} is corrupt: no {missing} entries")
    return state


@contextlib.contextmanager
def _interrupt_after_write():
    """Hold a Ctrl-C (SIGINT) that arrives during the block until the block is done, then raise it.

    DCP catches every exception of its writers, ``KeyboardInterrupt`` included, and re-raises it as a
    ``CheckpointException``: an interrupt mid-write would surface as an internal error. A second Ctrl-C
    abandons the write (``save`` removes the temporary directory) and raises ``KeyboardInterrupt``.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is signal.SIG_IGN):
        yield  # signal handlers belong to the main thread; an ignored SIGINT stays ignored
        return
    pressed: list[int] = []

    def hold(signum, frame):
        pressed.append(signum)
        if len(pressed) > 1:
            raise KeyboardInterrupt
        log.warning("Ctrl-C: finishing the checkpoint being written, then stopping "
                    "(Ctrl-C again to abandon it)")

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    except BaseException:
        if pressed:
            raise KeyboardInterrupt from None  # whatever DCP wrapped the second Ctrl-C into
        raise
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if pressed:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _single_process_quiet(rt: Runtime):
    """DCP warns that it assumes a single process when there is no process group: that is the intent."""
    with warnings.catch_warnings():
        if not rt.distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
