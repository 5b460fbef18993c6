"""The training loop shared by every recipe (torchtune style: setup / train / save_checkpoint / cleanup).

A recipe is a subclass that overrides hooks (``prepare_model``, ``on_step_start``,
``checkpoint_metadata``) and extends ``CONFIG_SCHEMA`` (a dataclass of ``lowbit.recipes.schema``);
nothing else is copied between recipes.

Determinism: batch ``s`` is a pure function of ``(seed, s)`` (a seeded permutation per epoch over
packed rows), and a checkpoint carries model, optimizer, scheduler and RNG state, so a run resumed
from step ``k`` reproduces the losses of an uninterrupted run.

Distributed (launched by torchrun with ``WORLD_SIZE > 1``): the model is sharded with FSDP2,
``batch_size`` stays the *global* batch (each rank takes its contiguous ``batch_size / world_size``
rows of every micro-batch), so the same config gives the same losses on any number of ranks, and
checkpoints (DCP) resume on any number of ranks.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from lowbit.data import generate_corpus, load_texts, make_world, pack_documents
from lowbit.data.real_text import SOURCES as TEXT_SOURCES
from lowbit.models.checkpoint import list_checkpoints, load_checkpoint, remove_stale_tmp
from lowbit.models.presets import ModelArgs, build_model, get_preset, init_weights
from lowbit.models.tokenizer import load_tokenizer, train_bpe_tokenizer, vocab_size_of
from lowbit.optim.sharding import local_state_bytes
from lowbit.quant.dtypes import DTYPE_NAMES
from lowbit.recipes import checkpointing, run_dir
from lowbit.recipes.config import ConfigError, instantiate
from lowbit.recipes.converters import model_converters
from lowbit.recipes.distributed import Runtime, clip_grad_norm, init_runtime, shard_model
from lowbit.recipes.schema import TrainingConfig, check_paths, normalized, validate_config

log = logging.getLogger("lowbit")



def trainable_summary(model: torch.nn.Module) -> str:
    """What trains, in words: ``"all"``, or the trainable and frozen parameter names with layer indices
    folded (``"layers.*.attn.q_proj.weight, ...; frozen: tok_embeddings.weight"``)."""
    def names(trainable: bool) -> str:
        return ", ".join(sorted({re.sub(r"\.\d+\.", ".*.", n) for n, p in model.named_parameters()
                                 if p.requires_grad == trainable}))

    frozen = names(False)
    return f"{names(True)}; frozen: {frozen}" if frozen else "all"


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run; the message says where its last complete checkpoint is."""


class TrainingRecipe:
    """Causal-LM training of a torchtune decoder on packed text, with atomic checkpoints and resume."""

    recipe_name = "finetune_recipe"
    CONFIG_SCHEMA: type = TrainingConfig  # the typed keys (lowbit.recipes.schema)

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg = validate_config(cfg, self.CONFIG_SCHEMA)
        self.output_dir = Path(cfg.output_dir)
        self.step = 0
        self.losses: list[float] = []
        self.rt = Runtime()
        self.converters: list = []  # model converters (float8): convert() in setup, a hook after each step

    # ----------------------------------------------------------------- hooks for recipes
    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Transform the float model before training (QAT wrappers, ...). Default: unchanged."""
        return model

    def on_step_start(self, step: int) -> None:
        """Called before each optimizer step ``step`` (1-based)."""

    def checkpoint_metadata(self) -> dict:
        """Extra keys for ``lowbit.json`` (e.g. ``qat_scheme``)."""
        return {}

    def param_groups(self, model: torch.nn.Module) -> list:
        """What the optimizer trains: the parameters that require grad (or param-group dicts)."""
        return [p for p in model.parameters() if p.requires_grad]

    def float_weights(self, state_dict: dict) -> dict:
        """The checkpoint's plain float model (``model.safetensors``) from the full model state dict."""
        return state_dict

    def after_optimizer_step(self) -> None:
        """Called after each optimizer step (e.g. to project parameters back into their valid range)."""

    # ----------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        check_paths(cfg, self.CONFIG_SCHEMA)
        torch.manual_seed(cfg.seed)
        self.dtype = DTYPE_NAMES[cfg.dtype]
        self.autocast_dtype = DTYPE_NAMES[cfg.autocast] if cfg.get("autocast") else None
        if self.autocast_dtype is not None and cfg.get("float8"):
            raise ConfigError("config keys 'autocast' and 'float8' exclude each other: float8 training "
                              "casts its matmuls itself (set autocast: null)")
        self.rt = rt = init_runtime(cfg.get("device"))
        if cfg.batch_size % rt.world_size:
            raise ConfigError(f"config key 'batch_size' ({cfg.batch_size}, the global batch) must be "
                              f"divisible by the number of processes ({rt.world_size})")
        self.run = run_dir.start_run(self.output_dir, OmegaConf.to_container(cfg, resolve=True), rt,
                                     normalize=lambda saved: normalized(saved, self.CONFIG_SCHEMA))
        if rt.is_main:
            remove_stale_tmp(self.output_dir / "checkpoints")
        rt.barrier()

        model, self.tokenizer, self.tokenizer_dir, self.model_args = self._build_model_and_tokenizer()
        self.rows = self._load_data()
        model = self.prepare_model(model.to(device=rt.device, dtype=self.dtype))
        self.converters = model_converters(cfg, rt)
        for converter in self.converters:
            model = converter.convert(model)
        if rt.distributed:
            model = shard_model(model, rt)
        self.model = model
        groups = self.param_groups(model)
        trainable = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
        if not trainable:
            raise ConfigError("no parameter is trainable with this config (every parameter is frozen)")
        self.optimizer = instantiate(cfg, "optimizer", groups)
        self.lr_scheduler = None
        if cfg.get("lr_scheduler"):
            self.lr_scheduler = instantiate(
                cfg, "lr_scheduler", self.optimizer, num_training_steps=cfg.max_steps
            )
        if cfg.resume:
            self._resume()
        if cfg.get("compile", False):
            self.model.compile()  # in place: state-dict keys stay those of the plain model
        log.info("%s: %d params (%d trainable: %s), %d rows x %d tokens", self.recipe_name,
                 sum(p.numel() for p in model.parameters()), sum(p.numel() for p in trainable),
                 trainable_summary(model), *self.rows.shape)

    def _build_model_and_tokenizer(self):
        cfg = self.cfg
        if cfg.get("base_checkpoint"):
            model, tokenizer, meta = load_checkpoint(cfg.base_checkpoint)
            tok_dir = Path(meta["tokenizer_dir"])
            return model.train(), tokenizer, tok_dir, ModelArgs.from_dict(meta["model_args"])
        args = get_preset(cfg.model.preset)
        if cfg.model.get("overrides"):
            args = ModelArgs.from_dict({**args.to_dict(), **OmegaConf.to_container(cfg.model.overrides)})
        if cfg.tokenizer.get("path"):
            tok_dir = Path(cfg.tokenizer.path)
        else:
            tok_dir = self.output_dir / "tokenizer"
            if cfg.tokenizer.vocab_size is None and not (tok_dir / "tokenizer.json").exists():
                raise ConfigError("config key 'tokenizer.vocab_size' is null, but without tokenizer.path or "
                                  "base_checkpoint a tokenizer must be trained: set its vocabulary size")
            if self.rt.is_main and not (tok_dir / "tokenizer.json").exists():
                train_bpe_tokenizer(self._texts(), cfg.tokenizer.vocab_size, tok_dir)
            self.rt.barrier()
        tokenizer = load_tokenizer(tok_dir)
        if vocab_size_of(tokenizer) > args.vocab_size:
            raise ConfigError(
                f"tokenizer at {tok_dir} has {vocab_size_of(tokenizer)} tokens but model preset "
                f"{cfg.model.preset!r} has vocab_size {args.vocab_size}"
            )
        return init_weights(build_model(args)), tokenizer, tok_dir, args

    def _texts(self) -> list[str]:
        data = self.cfg.data
        if data.source == "generated":
            world = make_world(data.world_seed, data.get("num_activities") or 64)
            return generate_corpus(num_docs=data.num_docs, seed=data.world_seed, world=world)
        if data.source in TEXT_SOURCES:  # real text that ships with the install (lowbit.data.real_text)
            return TEXT_SOURCES[data.source]()
        return load_texts(data.source, text_field=data.get("text_field", "text"))

    def _load_data(self) -> torch.Tensor:
        return pack_documents(self.tokenizer, self._texts(), self.cfg.data.seq_len)

    # ----------------------------------------------------------------- data order
    def batch(self, step: int) -> torch.Tensor:
        """Rows for optimizer step ``step`` (1-based), all ranks': ``[accum * batch_size, seq_len + 1]``."""
        n, b = self.rows.shape[0], self.cfg.batch_size * self.cfg.get("gradient_accumulation_steps", 1)
        start = (step - 1) * b
        idx = []
        for pos in range(start, start + b):
            epoch, off = divmod(pos, n)
            if getattr(self, "_perm", (None,))[0] != epoch:
                g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
                self._perm = (epoch, torch.randperm(n, generator=g))
            idx.append(self._perm[1][off])
        return self.rows[torch.stack(idx)]

    # ----------------------------------------------------------------- train
    def local_micro_batches(self, step: int) -> list[torch.Tensor]:
        """This rank's rows of each micro-batch of step ``step``, on the training device."""
        rt, b = self.rt, self.cfg.batch_size
        per_rank = b // rt.world_size
        rows = self.batch(step).to(rt.device)
        return [micro[rt.rank * per_rank:(rt.rank + 1) * per_rank] for micro in rows.split(b)]

    def loss_on(self, rows: torch.Tensor) -> torch.Tensor:
        logits = self.model(rows[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())

    def autocast(self) -> torch.autocast:
        """The forward's precision context: ``torch.autocast`` to ``cfg.autocast`` when set, else a no-op."""
        on = self.autocast_dtype is not None
        return torch.autocast(self.rt.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=on)

    def train(self) -> None:
        cfg = self.cfg
        accum = cfg.get("gradient_accumulation_steps", 1)
        tokens_per_step = cfg.batch_size * accum * cfg.data.seq_len
        every = cfg.get("checkpoint_every", 0) or cfg.max_steps
        main = self.rt.is_main
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=self.recipe_name, unit="step",
                   disable=not (cfg.get("progress_bar", True) and main), dynamic_ncols=True)
        metrics = open(self.output_dir / "metrics.jsonl", "a") if main else None
        self.model.train()
        try:
            while self.step < cfg.max_steps:
                step = self.step + 1
                self.on_step_start(step)
                t0 = time.perf_counter()
                total = 0.0
                for micro in self.local_micro_batches(step):
                    with self.autocast():
                        loss = self.loss_on(micro) / accum
                    loss.backward()
                    total += loss.item()
                total = self.rt.mean(total)
                grad_norm = None
                if cfg.get("clip_grad_norm"):
                    grad_norm = clip_grad_norm(self.model.parameters(), cfg.clip_grad_norm, self.rt)
                self.optimizer.step()
                for converter in self.converters:
                    converter.post_optimizer_hook(self.model)
                self.after_optimizer_step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.lr_scheduler is not None:
                    self.lr_scheduler.step()
                dt = time.perf_counter() - t0
                self.step = step
                self.losses.append(total)
                if not math.isfinite(total):
                    raise FloatingPointError(f"loss is {total} at step {step}")
                record = {"step": step, "loss": total, "lr": self.optimizer.param_groups[0]["lr"],
                          "grad_norm": grad_norm, "step_s": dt, "tokens_per_s": tokens_per_step / dt}
                record["lr"] = float(record["lr"])
                if metrics is not None:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                bar.update(1)
                if step % cfg.get("log_every", 1) == 0:
                    bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{tokens_per_step / dt:,.0f}")
                if step % every == 0 or step == cfg.max_steps:
                    self.save_checkpoint(step)
        except KeyboardInterrupt as e:
            done = list_checkpoints(self.output_dir)
            where = f"last complete checkpoint: {done[-1]}" if done else "no checkpoint was written yet"
            # the command line prints this as its last line (lowbit.recipes.errors)
            raise TrainingInterrupted(f"interrupted at step {self.step}; {where} "
                                      "(continue with resume=true)") from e
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()

    # ----------------------------------------------------------------- checkpoints
    def save_checkpoint(self, step: int) -> Path:
        """Write ``checkpoints/step_<step>`` atomically and keep only the last ``keep_last``."""
        final = self.output_dir / "checkpoints" / f"step_{step:06d}"
        meta = {
            "model_args": self.model_args.to_dict(), "step": step, "recipe": self.recipe_name,
            "dtype": self.cfg.get("dtype", "fp32"), "qat_scheme": None, "qat_group_size": None,
            "config": OmegaConf.to_container(self.cfg, resolve=True), "run_id": self.run.run_id,
            **self.checkpoint_metadata(),
        }
        state = {
            "step": step, "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler else None,
            "rng": torch.get_rng_state(), "losses": self.losses,
        }
        checkpointing.save(final, self.rt, self.model, self.optimizer, meta, state, self.tokenizer_dir,
                           self.float_weights)
        state_bytes = self.rt.gather(local_state_bytes(self.optimizer))
        if not self.rt.is_main:
            return final
        mine = [c for c in list_checkpoints(self.output_dir) if run_dir.run_id_of(c) == self.run.run_id]
        for old in mine[: -self.cfg.keep_last]:
            shutil.rmtree(old)
        summary = {"step": step, "final_loss": self.losses[-1] if self.losses else None,
                   "checkpoint": str(final), "world_size": self.rt.world_size,
                   "optimizer_state_bytes_per_rank": state_bytes, **self._timing()}
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return final

    def _timing(self) -> dict:
        path = self.output_dir / "metrics.jsonl"
        recs = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        steady = [r["step_s"] for r in recs[min(3, len(recs) - 1):]] if recs else []
        tokens = (self.step * self.cfg.batch_size * self.cfg.get("gradient_accumulation_steps", 1)
                  * self.cfg.data.seq_len)
        return {"train_tokens": tokens, "train_seconds": sum(r["step_s"] for r in recs),
                "mean_step_ms": 1000 * sum(steady) / len(steady) if steady else None}

    def _resume(self) -> None:
        ckpt = self.run.resume_from  # the newest intact checkpoint, chosen by run_dir.start_run
        if ckpt is None:
            return
        checkpointing.check_compatible(ckpt, self.model_args.to_dict(), self.optimizer)
        state = checkpointing.load(ckpt, self.rt, self.model, self.optimizer)
        if self.lr_scheduler is not None and state["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        torch.set_rng_state(state["rng"])
        self.step, self.losses = state["step"], list(state["losses"])
        # metrics.jsonl may hold steps logged after the checkpoint: drop them, they will be redone.
        path = self.output_dir / "metrics.jsonl"
        if self.rt.is_main and path.exists():
            keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            path.write_text("".join(line + "\n" for line in keep))
        log.info("resumed from %s at step %d", ckpt, self.step)

    def cleanup(self) -> None:
        self.rt.close()


def run(recipe_cls: type[TrainingRecipe], cfg: DictConfig) -> TrainingRecipe:
    """Set up, train and clean up a recipe; returns it (``.losses``, ``.output_dir``)."""
    recipe = recipe_cls(cfg)
    recipe.setup()
    try:
        recipe.train()
    finally:
        recipe.cleanup()
    return recipe
