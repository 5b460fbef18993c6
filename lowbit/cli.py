"""The ``lowbit`` command (the only command-line module; nothing in lowbit imports it).

    lowbit run RECIPE [torchrun options] --config NAME|PATH [key=value ...]
    lowbit eval --checkpoint DIR|GGUF|NAME [--tasks T1,T2] [--task-file F] [--kl-reference CKPT] [--scheme S]
    lowbit bench --checkpoint DIR | --preset NAME --schemes none,8w,4w,8da4w ...
    lowbit demo [--output DIR]
    lowbit data --output DIR            (write the generated corpus and hellaswag-format task)
    lowbit data cloze --from FILE.txt|python-docs --output ITEMS.jsonl   (cloze items from real text)
    lowbit convert SRC --to hf DIR      (a Hugging Face Llama directory from a GGUF / checkpoint / name)
    lowbit export CKPT --to gguf --type q4_0|q8_0|f16|f32 OUT.gguf   (a llama.cpp GGUF, QAT numerics kept)

``lowbit COMMAND --help`` describes each command.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from lowbit.recipes.errors import UsageError

RUN_USAGE = """usage: lowbit run RECIPE [torchrun options] --config NAME|PATH [key=value ...]

Run a training recipe through torchtune's `tune run` (which starts torchrun when torchrun options such
as --nproc_per_node 2 are given). NAME is a bundled config (tiny_pretrain, tiny_qat, ...) or a YAML path;
key=value pairs override config keys (dotted: optimizer.lr=1e-3; ~key removes one).

recipes: {recipes}
configs: {configs}
"""


def _run_usage() -> str:
    from lowbit.recipes.config import CONFIG_DIR
    from lowbit.recipes.runner import known_recipes

    configs = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    return RUN_USAGE.format(recipes=", ".join(known_recipes()), configs=", ".join(configs))


def _run(argv: list[str]) -> int:
    """``lowbit run``: resolve recipe and config names, then hand over to torchtune's ``tune run``."""
    if "--config" not in argv and any(a in ("-h", "--help") for a in argv):
        print(_run_usage())
        return 0
    from lowbit.recipes.config import resolve_config_path
    from lowbit.recipes.runner import check_recipe, known_recipes

    recipe_idx = next((i for i, a in enumerate(argv) if a in known_recipes() or a.endswith("_recipe")), None)
    if recipe_idx is None or "--config" not in argv:
        raise UsageError("usage: lowbit run RECIPE [torchrun options] --config NAME [key=value ...]; "
                         f"recipes: {known_recipes()}")
    recipe = argv[recipe_idx]
    check_recipe(recipe)
    cfg_idx = argv.index("--config")
    if cfg_idx < recipe_idx or cfg_idx + 1 >= len(argv):
        raise UsageError("usage: lowbit run RECIPE [torchrun options] --config NAME [key=value ...]")
    from torchtune._cli.tune import TuneCLIParser

    # torchrun options may come before or after the recipe name; tune run wants them before it.
    launcher = argv[:recipe_idx] + argv[recipe_idx + 1:cfg_idx]
    config = str(resolve_config_path(argv[cfg_idx + 1]).resolve())
    # A relative path: tune run turns it into the module path lowbit.recipes.<recipe>.
    args = [*launcher, f"lowbit/recipes/{recipe}.py", "--config", config, *argv[cfg_idx + 2:]]
    sys.argv = ["tune", "run", *args]
    parser = TuneCLIParser()
    parser.run(parser.parse_args())
    return 0


def _eval(argv: list[str]) -> int:
    """``lowbit eval``: lm-eval (hellaswag) on a checkpoint, optionally quantized and compiled for CPU."""
    from lowbit.quant.dtypes import DTYPE_NAMES

    p = argparse.ArgumentParser(prog="lowbit eval", description="lm-eval (hellaswag) on a checkpoint, "
                                "optionally quantized and compiled for CPU.")
    p.add_argument("--checkpoint", required=True,
                   help="lowbit checkpoint, run dir, HF Llama dir, GGUF file, or a model name (smollm2-135m)")
    p.add_argument("--tasks", default="hellaswag_local",
                   help="comma-separated: hellaswag_local, perplexity_local, any lm-eval task cached "
                        "locally, or none")
    p.add_argument("--task-file", help="hellaswag_local items: a hellaswag-format jsonl, or a text source "
                                       "(python-docs, package-docs, FILE.txt) to build cloze items from "
                                       "(default: the generated set for models trained on it, else "
                                       "python-docs)")
    p.add_argument("--text", help="perplexity_local / --kl-reference text: a jsonl with a text field, or a "
                                  "text source (default: python-docs)")
    p.add_argument("--kl-reference", help="checkpoint to compare next-token distributions with (e.g. the "
                                          "float model): KL divergence and top-1 agreement on --text")
    p.add_argument("--kl-windows", type=int, default=32, help="windows of 512 tokens for --kl-reference")
    p.add_argument("--limit", type=int, help="evaluate only the first N items")
    p.add_argument("--scheme", default="auto",
                   help="inference quantization: none, 8w, 8da8w, 4w, 8da4w (default: the QAT scheme "
                        "recorded in the checkpoint, else none)")
    p.add_argument("--group-size", type=int,
                   help="weight group size for 4w / 8da4w (default: the QAT recipe's, else the scheme's)")
    p.add_argument("--dtype", choices=["auto", *sorted(DTYPE_NAMES)], default="auto",
                   help="inference dtype (default: bf16 for 4w / 8w / 8da4w, whose fast CPU kernels take "
                        "bf16; fp32 reproduces an fp32 QAT model's fake-quant numbers exactly)")
    p.add_argument("--compile", action="store_true", help="torch.compile with the Xeon Inductor flags")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--output", default=None, help="directory for results.json")
    a = p.parse_args(argv)

    from lm_eval.utils import make_table

    from lowbit.eval.evaluate import evaluate

    try:
        results = evaluate(a.checkpoint, task_file=a.task_file, tasks=a.tasks, text=a.text, limit=a.limit,
                           scheme=a.scheme, compile=a.compile, batch_size=a.batch_size, output_dir=a.output,
                           group_size=a.group_size, dtype=DTYPE_NAMES.get(a.dtype),
                           kl_reference=a.kl_reference, kl_windows=a.kl_windows)
    except (FileNotFoundError, ValueError) as e:
        from lowbit.data import DataError
        from lowbit.models.checksums import CorruptCheckpointError

        print(f"lowbit eval: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, DataError | CorruptCheckpointError) else 2  # bad files vs. bad arguments
    if results["results"]:
        print(make_table(results))
    if "kl" in results:
        k = results["kl"]
        print(f"vs {k['reference']} on {k['tokens']} tokens of {k['text']}: KL {k['kl_mean']:.5f} "
              f"± {k['kl_stderr']:.5f} (p99 {k['kl_p99']:.4f}), top-1 agreement {k['top1_agreement']:.4f} "
              f"± {k['top1_stderr']:.4f}, perplexity {k['ppl']:.3f} (reference {k['ppl_reference']:.3f})")
    info = results["lowbit"]
    embs = info["quantized_embeddings"]
    print(f"checkpoint: {info['checkpoint']}  scheme: {info['scheme'] or 'none (float)'}  deployed: "
          f"{info['deployed']} {info['dtype'].removeprefix('torch.')}"
          f"{'  quantized embeddings: ' + ', '.join(embs) if embs else ''}  compiled: {info['compiled']}")
    if a.output:
        print(f"wrote {a.output}/results.json")
    return 0


def _bench_parser() -> argparse.ArgumentParser:
    from lowbit.quant.dtypes import DTYPE_NAMES

    p = argparse.ArgumentParser(prog="lowbit bench",
                                description="CPU inference throughput per quantization scheme")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="lowbit checkpoint dir (or run dir: its latest checkpoint)")
    src.add_argument("--preset", help="model preset with random weights (speed only), e.g. small_150m")
    p.add_argument("--schemes", default="none,8w,4w,8da4w", help="comma-separated: none,8w,8da8w,4w,8da4w")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--compile", dest="modes", action="store_const", const=("compiled",),
                      help="torch.compile with the CPU Inductor flags (default)")
    mode.add_argument("--eager", dest="modes", action="store_const", const=("eager",))
    mode.add_argument("--both", dest="modes", action="store_const", const=("eager", "compiled"))
    p.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPE_NAMES)],
                   help="auto: float baseline in the model's dtype, quantized schemes in their kernel's "
                        "dtype")
    p.add_argument("--group-size", type=int, default=None, help="group size for 4w / 8da4w")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-profile", action="store_true", help="skip the host/kernel time profile")
    p.add_argument("--output", help="directory for bench.json and bench.md")
    p.set_defaults(modes=("compiled",))
    return p


def _bench(argv: list[str]) -> int:
    """``lowbit bench``: prints a markdown table (and writes bench.json / bench.md with --output)."""
    args = _bench_parser().parse_args(argv)
    import torch

    from lowbit.eval.bench import bench_rows, markdown_table, parse_schemes
    from lowbit.eval.compile import CompilerNotFoundError
    from lowbit.quant.dtypes import DTYPE_NAMES

    try:
        schemes = parse_schemes(args.schemes)
        rows, desc = bench_rows(
            args.checkpoint or args.preset, schemes, modes=args.modes, dtype=DTYPE_NAMES.get(args.dtype),
            group_size=args.group_size, prompt_len=args.prompt_len, decode_tokens=args.decode_tokens,
            batch_size=args.batch_size, repeats=args.repeats, profile=not args.no_profile,
        )
    except (ValueError, KeyError, FileNotFoundError, CompilerNotFoundError) as e:
        print(f"lowbit bench: error: {e}")
        return 2
    md = (f"{desc}; torch {torch.__version__}, {torch.get_num_threads()} threads; prompt {args.prompt_len}, "
          f"{args.decode_tokens} decode steps, batch {args.batch_size}\n\n{markdown_table(rows)}")
    print(md)
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps({"description": desc, "rows": rows}, indent=2))
        (out / "bench.md").write_text(md + "\n")
    return 0


def _demo(argv: list[str]) -> int:
    """``lowbit demo``: float vs PTQ vs QAT on the real SmolLM2-135M (``--model tiny``: the tiny preset
    pretrained offline with the optimizer / QAT / float8 arms)."""
    from lowbit.demo import ARMS, DEFAULT_ARMS

    p = argparse.ArgumentParser(prog="lowbit demo", description="On SmolLM2-135M (default): float vs PTQ vs "
                                "QAT (8da4w g32, 4w g64) with perplexity, KL from float, top-1 agreement, "
                                "cloze acc_norm and decode tokens/s. With --model tiny: pretrain the tiny "
                                "preset offline, evaluate it, run each feature's arm. Writes report.md and "
                                "plots.")
    p.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    p.add_argument("--output", default="lowbit_demo", help="directory for runs and report.md")
    p.add_argument("--items", type=int, help="cloze items per arm (default: 60 smollm2, 500 tiny)")
    p.add_argument("--kl-windows", type=int, default=2, help="smollm2: 512-token windows for perplexity / KL")
    p.add_argument("--qat-steps", type=int, default=8, help="smollm2: steps of each QAT fine-tune")
    p.add_argument("--steps", type=int, help="tiny: pretraining steps (default: the tiny_pretrain config's)")
    p.add_argument("--arm-steps", type=int, default=120, help="tiny: training steps of each arm's runs")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                   help=f"tiny: comma-separated subset of {','.join(ARMS)}, or none "
                        f"(default: {','.join(DEFAULT_ARMS)})")
    a = p.parse_args(argv)
    if a.model == "smollm2":
        if a.steps is not None or a.arms != ",".join(DEFAULT_ARMS):
            p.error("--steps and --arms go with --model tiny (the SmolLM2 demo runs its own arms)")
        from lowbit.demo.smollm2 import run_smollm2_demo

        result = run_smollm2_demo(Path(a.output), items=a.items or 60, kl_windows=a.kl_windows,
                                  qat_steps=a.qat_steps)
        print((Path(a.output) / "report.md").read_text())
        print(f"wrote {Path(a.output) / 'report.md'} in {result['seconds']:.0f} s")
        return 0
    arms = [] if a.arms in ("", "none") else a.arms.split(",")
    unknown = [x for x in arms if x not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    from lowbit.demo import run_demo

    result = run_demo(Path(a.output), steps=a.steps, arm_steps=a.arm_steps, arms=arms,
                      num_items=a.items or 500)
    if result["failures"]:
        print(f"demo arms failed: {result['failures']} (details in the report)")
        return 1
    return 0


def _cloze(argv: list[str]) -> int:
    """``lowbit data cloze``: hellaswag-format items from any real text."""
    p = argparse.ArgumentParser(prog="lowbit data cloze", description="Build hellaswag-format cloze items "
                                "from real text: context = the start of a passage, endings = its true "
                                "continuation and three length-matched continuations from other passages.")
    p.add_argument("--from", dest="source", required=True,
                   help="a UTF-8 text file (paragraphs separated by blank lines) or a built-in source: "
                        "python-docs, package-docs")
    p.add_argument("--output", required=True, help="the jsonl file to write")
    p.add_argument("--num-items", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default=None, help="activity_label of every item (default: the source's name)")
    a = p.parse_args(argv)
    from lowbit.data import write_jsonl
    from lowbit.data.cloze import cloze_items
    from lowbit.data.real_text import load_source

    label = a.label or Path(a.source).stem.replace("-", " ").capitalize()
    items = cloze_items(load_source(a.source), a.num_items, seed=a.seed, label=label, source=a.source)
    write_jsonl(items, a.output)
    print(f"wrote {len(items)} items to {a.output}")
    return 0


def _data(argv: list[str]) -> int:
    """``lowbit data``: write lowbit's generated corpus and hellaswag-format task (``lowbit data cloze``:
    items from real text)."""
    if argv and argv[0] == "cloze":
        return _cloze(argv[1:])
    p = argparse.ArgumentParser(prog="lowbit data", description="Write lowbit's generated corpus and task.")
    p.add_argument("--output", default="lowbit_data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-docs", type=int, default=4096)
    p.add_argument("--num-items", type=int, default=500)
    p.add_argument("--num-activities", type=int, default=64, help="activities in the world (at most 320)")
    a = p.parse_args(argv)
    from lowbit.data import generate_corpus, generate_hellaswag, make_world, write_jsonl

    out = Path(a.output)
    world = make_world(a.seed, a.num_activities)
    write_jsonl([{"text": t} for t in generate_corpus(a.num_docs, a.seed, world)], out / "corpus.jsonl")
    write_jsonl(generate_hellaswag(a.num_items, a.seed, world), out / "hellaswag_local.jsonl")
    print(f"wrote {out / 'corpus.jsonl'} and {out / 'hellaswag_local.jsonl'}")
    return 0


def _convert(argv: list[str]) -> int:
    """``lowbit convert SRC --to hf DIR``: a Hugging Face Llama directory from a GGUF, a lowbit checkpoint or
    a model name."""
    p = argparse.ArgumentParser(prog="lowbit convert", description="Write a Hugging Face Llama directory "
                                "(config.json, model.safetensors, tokenizer files) from a GGUF file, a "
                                "lowbit checkpoint or run directory, or a model name (smollm2-135m).")
    p.add_argument("source")
    p.add_argument("--to", choices=["hf"], required=True, help="output format")
    p.add_argument("output", help="the directory to write")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    a = p.parse_args(argv)
    from lowbit.models.hf_export import export_hf

    print(f"wrote {export_hf(a.source, a.output, force=a.force)}")
    return 0


def _export(argv: list[str]) -> int:
    """``lowbit export CKPT --to gguf --type q4_0 OUT.gguf``: a llama.cpp GGUF whose blocks are exactly the
    weights the checkpoint's QAT scheme (q4_0 / q8_0) simulated."""
    from lowbit.eval.gguf_export import GGUF_TYPES, GGUFExportError, export_gguf

    p = argparse.ArgumentParser(prog="lowbit export", description="Write a llama.cpp GGUF file from a lowbit "
                                "checkpoint (QAT schemes q4_0 / q8_0 export bit-exactly; a float checkpoint "
                                "is quantized with llama.cpp's rule), a GGUF or a model name.")
    p.add_argument("source")
    p.add_argument("--to", choices=["gguf"], required=True, help="output format")
    p.add_argument("--type", required=True, help=f"tensor type of the linear layers: {', '.join(GGUF_TYPES)}")
    p.add_argument("--float-type", choices=["f32", "f16"], default="f32",
                   help="type of the matrices kept float (an unquantized embedding / tied head)")
    p.add_argument("output", help="the .gguf file to write")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    a = p.parse_args(argv)
    try:
        path = export_gguf(a.source, a.output, a.type, force=a.force, float_type=a.float_type)
    except (GGUFExportError, FileExistsError) as e:
        print(f"lowbit export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {a.type})")
    return 0


COMMANDS = {"run": _run, "eval": _eval, "bench": _bench, "demo": _demo, "data": _data, "convert": _convert,
            "export": _export}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lowbit`` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[argv[0]](argv[1:]) or 0
    except (Exception, KeyboardInterrupt) as e:
        from lowbit.recipes.errors import exit_status

        return exit_status(f"lowbit {argv[0]}", e)


if __name__ == "__main__":
    sys.exit(main())
