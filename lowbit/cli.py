"""The ``lowbit`` command (the only command-line module; nothing in lowbit imports it).

    lowbit run RECIPE [torchrun options] --config NAME|PATH [key=value ...]
    lowbit eval --checkpoint DIR [--tasks hellaswag_local|hellaswag] [--task-file F] [--scheme S] [--compile]
    lowbit bench --checkpoint DIR | --preset NAME --schemes none,8w,4w,8da4w ...
    lowbit demo [--output DIR]
    lowbit data --output DIR            (write the generated corpus and hellaswag-format task)

``lowbit COMMAND --help`` describes each command.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

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
        raise SystemExit("usage: lowbit run RECIPE [torchrun options] --config NAME [key=value ...]; "
                         f"recipes: {known_recipes()}")
    recipe = argv[recipe_idx]
    check_recipe(recipe)
    cfg_idx = argv.index("--config")
    if cfg_idx < recipe_idx or cfg_idx + 1 >= len(argv):
        raise SystemExit("usage: lowbit run RECIPE [torchrun options] --config NAME [key=value ...]")
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
    p.add_argument("--checkpoint", required=True, help="lowbit checkpoint, run dir, or HF Llama dir")
    p.add_argument("--tasks", default="hellaswag_local", choices=["hellaswag_local", "hellaswag"])
    p.add_argument("--task-file", help="hellaswag-format jsonl (default: lowbit's generated set)")
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
        results = evaluate(a.checkpoint, task_file=a.task_file, tasks=a.tasks, limit=a.limit, scheme=a.scheme,
                           compile=a.compile, batch_size=a.batch_size, output_dir=a.output,
                           group_size=a.group_size, dtype=DTYPE_NAMES.get(a.dtype))
    except (FileNotFoundError, ValueError) as e:
        print(f"lowbit eval: error: {e}", file=sys.stderr)
        return 2
    print(make_table(results))
    info = results["lowbit"]
    print(f"checkpoint: {info['checkpoint']}  scheme: {info['scheme'] or 'none (float)'}  "
          f"compiled: {info['compiled']}")
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
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *sorted(DTYPE_NAMES)],
        help="auto: float baseline in the model's dtype, quantized schemes in their kernel's dtype",
    )
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
    """``lowbit demo``: pretrain the tiny preset offline, evaluate it, run the arms, write a report."""
    from lowbit.demo import ARMS, DEFAULT_ARMS

    p = argparse.ArgumentParser(prog="lowbit demo", description="Pretrain the tiny preset offline, evaluate "
                                "it, run each feature's arm and write one markdown report.")
    p.add_argument("--output", default="lowbit_demo", help="directory for runs and report.md")
    p.add_argument("--steps", type=int, help="pretraining steps (default: the tiny_pretrain config's)")
    p.add_argument("--arm-steps", type=int, default=120, help="training steps of each arm's runs")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                   help=f"comma-separated subset of {','.join(ARMS)}, or none "
                        f"(default: {','.join(DEFAULT_ARMS)})")
    p.add_argument("--items", type=int, default=500, help="evaluation items")
    a = p.parse_args(argv)
    arms = [] if a.arms in ("", "none") else a.arms.split(",")
    unknown = [x for x in arms if x not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    from lowbit.demo import run_demo

    result = run_demo(Path(a.output), steps=a.steps, arm_steps=a.arm_steps, arms=arms, num_items=a.items)
    if result["failures"]:
        print(f"demo arms failed: {result['failures']} (details in the report)")
        return 1
    return 0


def _data(argv: list[str]) -> int:
    """``lowbit data``: write lowbit's generated corpus and hellaswag-format task."""
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


COMMANDS = {"run": _run, "eval": _eval, "bench": _bench, "demo": _demo, "data": _data}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lowbit`` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return COMMANDS[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
