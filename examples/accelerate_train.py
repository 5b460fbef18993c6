"""A plain training loop under Hugging Face accelerate, with lowbit's optimizer, QAT and float8.

    python examples/accelerate_train.py --output-dir runs/acc --steps 200 --optimizer adamw8bit --qat 8da4w
    accelerate launch --num_processes 2 --cpu examples/accelerate_train.py --output-dir runs/acc2
    python examples/accelerate_train.py --output-dir runs/acc --steps 400 --resume      # from the last save

Nothing lowbit-specific happens in the loop: ``accelerator.prepare(model, AdamW8bit(...), dataloader,
scheduler)``, ``accelerator.accumulate`` for gradient accumulation, and ``accelerator.save_state`` /
``load_state`` for checkpoints (the quantized optimizer state is an ordinary optimizer state dict).
It trains lowbit's ``tiny`` preset on the generated corpus, offline.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset
from torchtune.training.lr_schedulers import get_cosine_schedule_with_warmup

from lowbit import optim, qat
from lowbit.data import generate_corpus, pack_documents
from lowbit.float8 import Float8TrainingConfig, convert_to_float8_training
from lowbit.models.presets import ModelArgs, build_model, get_preset, init_weights
from lowbit.models.tokenizer import load_tokenizer, train_bpe_tokenizer

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adamw8bit": optim.AdamW8bit, "adamw4bit": optim.AdamW4bit,
              "adamwfp8": optim.AdamWFp8}


class Progress:
    """Optimizer steps done; saved with ``save_state`` (``register_for_checkpointing``)."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = int(state["step"])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", required=True)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps in total")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw8bit")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--qat", choices=list(qat.SCHEMES), default=None, help="fake-quantize the linears")
    p.add_argument("--float8", choices=["tensorwise", "rowwise", "rowwise_with_gw_hp"], default=None)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch per process")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--num-docs", type=int, default=1024)
    p.add_argument("--dim", type=int, default=None, help="override the preset's embed_dim (smaller = faster)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="continue from the last state in --output-dir")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build(args, out: Path, accelerator: Accelerator):
    texts = generate_corpus(num_docs=args.num_docs, seed=args.seed)
    tok_dir = out / "tokenizer"
    with accelerator.main_process_first():
        if not (tok_dir / "tokenizer.json").exists():
            train_bpe_tokenizer(texts, 1024, tok_dir)
    rows = pack_documents(load_tokenizer(tok_dir), texts, args.seq_len)
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed))]
    # whole optimizer steps per epoch on every process, so accumulation never straddles an epoch end
    per_epoch = args.batch_size * args.grad_accum * accelerator.num_processes
    if len(rows) < per_epoch:
        raise SystemExit(f"{len(rows)} rows of {args.seq_len + 1} tokens: fewer than one optimizer step "
                         f"({per_epoch} rows); use more --num-docs or a smaller --batch-size")
    rows = rows[: len(rows) // per_epoch * per_epoch]

    preset = get_preset("tiny").to_dict()
    if args.dim:
        preset.update(embed_dim=args.dim, intermediate_dim=3 * args.dim)
    torch.manual_seed(args.seed)
    model = init_weights(build_model(ModelArgs.from_dict(preset)))
    if args.qat:
        qat.prepare(model, qat.get_scheme(args.qat))
    if args.float8:
        model = convert_to_float8_training(model, config=Float8TrainingConfig.from_recipe(args.float8))
    return model, rows


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.output_dir)
    accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum)
    model, rows = build(args, out, accelerator)
    optimizer = OPTIMIZERS[args.optimizer](
        model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=10, num_training_steps=args.steps)
    # no shuffling in the loader (the rows are permuted once, seeded), so a resumed run skips exactly
    # the batches it has seen; the epoch repeats the same order
    loader = DataLoader(TensorDataset(rows), batch_size=args.batch_size, shuffle=False, drop_last=True)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)

    saves = sorted(out.glob("state_step_*"), key=lambda p: int(p.name.rsplit("_", 1)[1]))
    if args.resume and saves:
        accelerator.load_state(str(saves[-1]))
        accelerator.print(f"resumed from {saves[-1]} at step {progress.step}")
    metrics = out / "metrics.jsonl"
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        kept = [r for r in metrics.read_text().splitlines() if json.loads(r)["step"] <= progress.step] \
            if metrics.exists() and args.resume else []
        metrics.write_text("".join(r + "\n" for r in kept))

    model.train()
    done_micro = progress.step * args.grad_accum
    while progress.step < args.steps:
        epoch_pos = done_micro % len(loader)
        batches = accelerator.skip_first_batches(loader, epoch_pos) if epoch_pos else loader
        total = 0.0
        for (batch,) in batches:
            with accelerator.accumulate(model):
                logits = model(batch[:, :-1])
                loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            done_micro += 1
            total += accelerator.gather(loss.detach()).mean().item() / args.grad_accum
            if not accelerator.sync_gradients:
                continue
            progress.step += 1
            if accelerator.is_main_process:
                with open(metrics, "a") as f:
                    f.write(json.dumps({"step": progress.step, "loss": total}) + "\n")
            total = 0.0
            if progress.step % args.save_every == 0 or progress.step == args.steps:
                accelerator.save_state(str(out / f"state_step_{progress.step:06d}"))
            if progress.step >= args.steps:
                break
    accelerator.print(f"done: {progress.step} steps, metrics in {metrics}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
