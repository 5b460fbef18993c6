"""One run per output directory.

``output_dir/run.json`` names the run that owns the directory (a random ``run_id``, the config hash,
start time, seed, recipe, and the config itself); each checkpoint's ``lowbit.json`` carries the same
``run_id``. Starting a run:

- in a directory that holds another run's work (checkpoints or logged steps) fails, naming the
  directory, unless ``resume=true`` (continue that run) or ``overwrite=true`` (delete it and start over);
- ``resume=true`` continues from the newest *intact* checkpoint (checksums verified): corrupt ones are
  moved aside to ``checkpoints/corrupt-step_<k>`` with a warning saying why; a checkpoint whose config
  differs from this run's in anything but :data:`RESUMABLE_KEYS` is refused, naming the keys.

``keep_last`` pruning only deletes checkpoints carrying the current ``run_id``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lowbit.models.checkpoint import list_checkpoints, read_meta, verify_checkpoint
from lowbit.models.checksums import CorruptCheckpointError
from lowbit.recipes.config import HIDDEN_KEYS, ConfigError
from lowbit.recipes.distributed import Runtime

log = logging.getLogger("lowbit")

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
# What a run writes into its output_dir: overwrite=true deletes exactly these, nothing else.
RUN_ARTIFACTS = ("checkpoints", METRICS_FILE, "summary.json", "tokenizer", RUN_FILE)
# Config keys that may change when a run is resumed (they change neither the model nor its data order).
RESUMABLE_KEYS = frozenset({"max_steps", "log_every", "progress_bar", "checkpoint_every", "keep_last",
                            "resume", "overwrite", "output_dir", "device", "compile"})


@dataclass
class RunStart:
    """The run that owns ``output_dir`` from now on, and the checkpoint to resume (None: step 0)."""

    run_id: str
    resume_from: Path | None


def _flatten(d, prefix: str = "") -> dict:
    if not isinstance(d, dict) or not d:
        return {prefix[:-1]: d} if prefix else {}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def _identity(config: dict) -> dict:
    """The keys of ``config`` that define a run (everything but the resumable and bookkeeping keys)."""
    return {k: v for k, v in config.items() if k not in RESUMABLE_KEYS and k not in HIDDEN_KEYS}


def config_hash(config: dict) -> str:
    blob = json.dumps(_identity(config), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def config_diff(saved: dict, current: dict) -> list[str]:
    """``key (checkpoint A, this run B)`` for every non-resumable dotted key whose values differ."""
    a, b = _flatten(_identity(saved)), _flatten(_identity(current))
    return [f"{k} (checkpoint {a.get(k)!r}, this run {b.get(k)!r})" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def _logged_steps(output_dir: Path) -> int:
    path = output_dir / METRICS_FILE
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text(errors="replace").splitlines() if line.strip())


def describe_previous_run(output_dir: Path) -> str | None:
    """What another run left in ``output_dir`` (checkpoints, logged steps), or None if it left no work."""
    ckpts, steps = list_checkpoints(output_dir), _logged_steps(output_dir)
    if not ckpts and not steps:
        return None
    what = []
    if ckpts:
        what.append(f"checkpoint{'s' if len(ckpts) > 1 else ''} {', '.join(c.name for c in ckpts)}")
    if steps:
        what.append(f"{steps} logged step{'s' if steps > 1 else ''} in {METRICS_FILE}")
    try:
        run = json.loads((output_dir / RUN_FILE).read_text())
        started = f"started {run['started']} with seed {run['seed']}, "
    except (OSError, ValueError, KeyError, TypeError):
        started = ""
    return f"a run ({started}{' and '.join(what)})"


def _remove_artifacts(output_dir: Path, config: dict) -> None:
    for name in RUN_ARTIFACTS:
        if name == "tokenizer" and (config.get("tokenizer") or {}).get("path"):
            continue  # the user's own tokenizer, perhaps kept there
        p = output_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def newest_intact_checkpoint(output_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint of ``output_dir`` whose files match their checksums, and the skipped ones
    (newest first) with the reason each is corrupt."""
    skipped = []
    for ckpt in reversed(list_checkpoints(output_dir)):
        try:
            verify_checkpoint(ckpt, training_state=True)
            return ckpt, skipped
        except CorruptCheckpointError as e:
            skipped.append((ckpt, str(e)))
    return None, skipped


def _move_aside(ckpt: Path) -> Path:
    dst, n = ckpt.with_name(f"corrupt-{ckpt.name}"), 1
    while dst.exists():
        n += 1
        dst = ckpt.with_name(f"corrupt-{ckpt.name}-{n}")
    ckpt.rename(dst)
    return dst


def _decide(output_dir: Path, config: dict, normalize: Callable[[dict], dict]) -> tuple[str, Path | None]:
    """Rank 0's part of :func:`start_run`: checks, deletions, ``run.json``; returns ``(run_id, ckpt)``."""
    resume, overwrite = config.get("resume"), config.get("overwrite")
    if resume and overwrite:
        raise ConfigError("resume=true and overwrite=true contradict each other: resume continues the run in "
                          f"{output_dir}, overwrite deletes it")
    previous = describe_previous_run(output_dir)
    run_id, ckpt, record = uuid.uuid4().hex, None, None
    if overwrite:
        if previous:
            log.warning("overwrite=true: deleting %s from %s", previous, output_dir)
        _remove_artifacts(output_dir, config)
    elif not resume:
        if previous:
            raise ConfigError(
                f"output_dir {output_dir} already holds {previous}. Pass resume=true to continue it, "
                "overwrite=true to delete it and start over, or choose another output_dir")
        _remove_artifacts(output_dir, config)  # leftovers of a run that stopped before its first step
    else:
        ckpt, skipped = newest_intact_checkpoint(output_dir)
        for bad, why in skipped:
            log.warning("resume: skipping %s: %s; moved it to %s", bad.name, why, _move_aside(bad))
        if ckpt is None and skipped:
            raise CorruptCheckpointError(
                f"resume=true: no intact checkpoint in {output_dir} "
                f"(corrupt: {', '.join(b.name for b, _ in skipped)}, "
                "moved aside as checkpoints/corrupt-*); pass overwrite=true to start over")
        if ckpt is None:
            log.info("resume=true but no checkpoint in %s: starting from step 0", output_dir)
            _remove_artifacts(output_dir, config)
        else:
            meta = read_meta(ckpt)
            diff = config_diff(normalize(meta.get("config") or {}), config)
            if diff:
                raise ConfigError(
                    f"cannot resume from {ckpt}: this run's config differs from the checkpoint's in "
                    f"{'; '.join(diff)}. Only {sorted(RESUMABLE_KEYS - {'resume', 'overwrite'})} may change "
                    "on resume; pass overwrite=true (or another output_dir) to start a new run instead")
            if skipped:
                log.warning("resume: continuing from the newest intact checkpoint %s", ckpt)
            try:
                record = json.loads((output_dir / RUN_FILE).read_text())
            except (OSError, ValueError):
                record = None
            run_id = meta.get("run_id") or (record or {}).get("run_id") or run_id
            if not isinstance(record, dict) or record.get("run_id") != run_id:
                record = None
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if record is None:
        record = {"run_id": run_id, "config_hash": config_hash(config), "started": now,
                  "seed": config.get("seed"),
                  "config": {k: v for k, v in config.items() if k not in HIDDEN_KEYS}, "resumed": []}
    if ckpt is not None:
        record.setdefault("resumed", []).append({"at": now, "from": ckpt.name})
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(output_dir / RUN_FILE, record)
    return run_id, ckpt


def start_run(output_dir: Path, config: dict, rt: Runtime,
              normalize: Callable[[dict], dict] = dict) -> RunStart:
    """Claim ``output_dir`` for the run with (resolved, plain) ``config``; a collective under torchrun.

    ``normalize`` maps a checkpoint's saved config to the form of ``config`` (defaults filled in) so
    that keys added since it was written do not count as differences. Raises :class:`ConfigError`
    (another run is there; the config differs from the checkpoint's) or
    :class:`~lowbit.models.checksums.CorruptCheckpointError` (no intact checkpoint to resume).
    """
    outcome: tuple = ("ok", None, None)
    if rt.is_main:
        try:
            run_id, ckpt = _decide(Path(output_dir), config, normalize)
            outcome = ("ok", run_id, str(ckpt) if ckpt else None)
        except (ConfigError, CorruptCheckpointError) as e:
            outcome = (type(e).__name__, str(e), None)
    kind, value, ckpt = rt.gather(outcome)[0]  # every rank acts on rank 0's decision
    if kind != "ok":
        raise (ConfigError if kind == "ConfigError" else CorruptCheckpointError)(value)
    return RunStart(run_id=value, resume_from=Path(ckpt) if ckpt else None)


def run_id_of(ckpt: Path) -> str | None:
    """The ``run_id`` recorded in a checkpoint (None for one written before run ids, or unreadable)."""
    try:
        return read_meta(ckpt).get("run_id")
    except (ValueError, OSError):
        return None
