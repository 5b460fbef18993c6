"""Checkpoints: lowbit's own directories (written atomically) and a user's Hugging Face checkpoints.

A lowbit checkpoint is a directory::

    model.safetensors      plain float state dict, torchtune key names (QAT / float8 wrappers are
                           key-identical to nn.Linear / nn.Embedding, so this is a plain float model)
    lowbit.json            metadata: model_args, step, recipe, qat_scheme / qat_group_size, ...
    tokenizer/             the tokenizer the model was trained with
    training_state.pt      (optional) optimizer / scheduler / RNG state for resuming

A training run writes ``<output_dir>/checkpoints/step_<k>/``; a directory becomes visible under its
final name only once complete (written as ``.tmp-*`` and renamed), so a crash or Ctrl-C mid-write
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lowbit.models.presets import ModelArgs, build_model
from lowbit.models.tokenizer import load_tokenizer

FORMAT = "lowbit-checkpoint"
META_FILE = "lowbit.json"
WEIGHTS_FILE = "model.safetensors"


@contextlib.contextmanager
def atomic_dir(final: str | Path):
    """Yield a temporary sibling directory that is renamed to ``final`` only if the block succeeds.

    On any exception (including ``KeyboardInterrupt``) the temporary directory is removed and
    ``final`` is untouched. An existing ``final`` is replaced.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        commit_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def commit_dir(tmp: Path, final: Path) -> None:
    """Flush every file under the complete directory ``tmp`` to disk, then rename it to ``final``."""
    for p in tmp.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


def remove_stale_tmp(parent: str | Path) -> None:
    """Delete leftovers of interrupted writes (``.tmp-*`` / ``.old-*``) under ``parent``."""
    parent = Path(parent)
    if parent.is_dir():
        for p in parent.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)


def save_model_dir(out: Path, state_dict: dict[str, torch.Tensor], meta: dict,
                   tokenizer_dir: Path | None) -> None:
    """Write weights, metadata and tokenizer into ``out`` (an existing, usually temporary, directory)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(out / WEIGHTS_FILE))
    (out / META_FILE).write_text(json.dumps({"format": FORMAT, "version": 1, **meta}, indent=1))
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, out / "tokenizer")


def _step_of(p: Path) -> int:
    try:
        return int(p.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    ckpts = Path(run_dir) / "checkpoints"
    if not ckpts.is_dir():
        return []
    found = [p for p in ckpts.iterdir() if p.name.startswith("step_") and (p / META_FILE).exists()]
    return sorted(found, key=_step_of)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from itself, or from a run directory (its latest complete checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if (path / META_FILE).exists() or (path / "config.json").exists():
        return path
    ckpts = list_checkpoints(path)
    if not ckpts:
        raise FileNotFoundError(
            f"no checkpoint in {path}: expected {META_FILE} (lowbit), config.json (Hugging Face), "
            "or a run directory with checkpoints/step_*"
        )
    return ckpts[-1]


def read_meta(ckpt: Path) -> dict:
    meta = json.loads((ckpt / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{ckpt / META_FILE}: not a lowbit checkpoint (format={meta.get('format')!r})")
    return meta


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer, meta)`` from a lowbit checkpoint, a run directory, or an HF checkpoint.

    The model is a plain float torchtune ``TransformerDecoder`` in the checkpoint's dtype.
    """
    ckpt = resolve_checkpoint(path)
    if not (ckpt / META_FILE).exists():
        return load_hf_checkpoint(ckpt, device=device)
    meta = read_meta(ckpt)
    args = ModelArgs.from_dict(meta["model_args"])
    with torch.device("meta"):
        model = build_model(args)
    state = load_file(str(ckpt / WEIGHTS_FILE), device=str(device))
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{ckpt / WEIGHTS_FILE} does not match its model_args in {META_FILE}: {e}") from None
    _init_rope(model, device)
    tokenizer = load_tokenizer(ckpt / "tokenizer")
    meta["path"] = str(ckpt)
    return model.eval(), tokenizer, meta


def _init_rope(model, device) -> None:
    """Rebuild RoPE caches (non-persistent buffers) that stay on meta after ``assign=True`` loading."""
    for m in model.modules():
        if hasattr(m, "rope_init"):
            with torch.device(device):
                m.rope_init()


def hf_model_args(config: dict) -> ModelArgs:
    """Map a Hugging Face Llama ``config.json`` to :class:`ModelArgs`."""
    if config.get("model_type") != "llama":
        raise ValueError(f"unsupported Hugging Face model_type {config.get('model_type')!r}; "
                         "expected 'llama'")
    factor = (config.get("rope_scaling") or {}).get("factor", 32)
    family = "llama3_1" if factor == 8 else "llama3_2"
    return ModelArgs(
        vocab_size=config["vocab_size"], num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        num_kv_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
        embed_dim=config["hidden_size"], intermediate_dim=config["intermediate_size"],
        max_seq_len=config.get("max_position_embeddings", 2048),
        rope_base=int(config.get("rope_theta", 500_000)),
        norm_eps=config.get("rms_norm_eps", 1e-5),
        tie_word_embeddings=config.get("tie_word_embeddings", family == "llama3_2"), family=family,
    )


def load_hf_checkpoint(path: str | Path, *, device: str | torch.device = "cpu"):
    """Load a local Hugging Face Llama checkpoint (config.json + *.safetensors) through torchtune's
    ``FullModelHFCheckpointer``; returns ``(model, tokenizer, meta)``."""
    from torchtune.training import FullModelHFCheckpointer

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    args = hf_model_args(config)
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    with tempfile.TemporaryDirectory() as out:
        checkpointer = FullModelHFCheckpointer(
            checkpoint_dir=str(path), checkpoint_files=files,
            model_type="LLAMA3_2" if args.tie_word_embeddings else "LLAMA3", output_dir=out,
        )
        state = checkpointer.load_checkpoint()["model"]
    with torch.device("meta"):
        model = build_model(args)
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True, assign=True)
    _init_rope(model, device)
    meta = {"format": "huggingface", "model_args": args.to_dict(), "path": str(path)}
    return model.eval(), load_tokenizer(path), meta
