"""Evaluate a linear-decay checkpoint with lm-evaluation-harness (lm-eval's Python API, `hf` model, remote code).

    python examples/evaluate.py CHECKPOINT [--tasks shakespeare] [--limit N] [--batch_size B] [--device cpu]
                                [--output results.json] [--write_to_checkpoint] [--paper]

--tasks        comma-separated lm-eval task or group names. The default, `shakespeare`, is the offline task pack
               shipped in `linear_decay/eval_tasks/` (added with include_path automatically); any built-in lm-eval
               task works too when its data set can be downloaded.
--paper        the paper's evaluation list (DESIGN.md §6): wikitext, lambada_openai, boolq, piqa, hellaswag,
               winogrande, arc_easy, arc_challenge, openbookqa, social_iqa. Needs the Hugging Face hub (online).
--output       where to write the results JSON (lm-eval's full output: results, configs, versions, ...).
--write_to_checkpoint
               also write `lm_eval_results.json` (lm-eval's `results` dict, {task: {"metric,filter": value}})
               into the checkpoint folder and refresh its model card (README.md) with them.

It prints a compact table: one row per task and metric. The same evaluation from the command line, from any folder:

    lm_eval --model hf --model_args pretrained=CHECKPOINT,trust_remote_code=True \\
        --include_path "$(python -m linear_decay.eval_tasks)" --tasks shakespeare

CHECKPOINT is a local folder or a Hub id (owner/name); a path that does not exist is reported at once.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from local_paths import HUB_ID, missing_local_folder  # examples/local_paths.py

PAPER_TASKS = ["wikitext", "lambada_openai", "boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
               "openbookqa", "social_iqa"]
BUNDLED_PREFIX = "shakespeare"
RESULTS_FILE = "lm_eval_results.json"


def bundled_tasks_dir():
    """The offline task pack (`python -m linear_decay.eval_tasks` prints it): inside the installed package, else
    beside this example in a source checkout."""
    try:
        import linear_decay
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import linear_decay
    return Path(linear_decay.__file__).resolve().parent / "eval_tasks"


def check_checkpoint(parser, checkpoint, write_to_checkpoint):
    """A clear error before anything heavy is imported: a local folder needs config.json; anything that is not a
    folder must be a Hub id (owner/name), and one that looks like a local path is reported as a missing folder."""
    path = Path(checkpoint).expanduser()
    if path.exists():
        if not path.is_dir():
            parser.error(f"checkpoint {checkpoint!r} is a file; pass the folder written by save_pretrained")
        if not (path / "config.json").is_file():
            parser.error(f"checkpoint folder {checkpoint!r} has no config.json; pass the folder written by "
                         "save_pretrained")
        return str(path.resolve())
    local = missing_local_folder(checkpoint)
    if local or not HUB_ID.fullmatch(checkpoint):
        parser.error(f"no such folder: {checkpoint}" + ("" if local else " (and not a Hub id of the form owner/name)"))
    if write_to_checkpoint:
        parser.error(f"no such folder: {checkpoint} (--write_to_checkpoint needs a local checkpoint folder)")
    return checkpoint


def metric_rows(results):
    """(task, metric, filter, value, stderr) for every numeric metric of every task, in lm-eval's order."""
    rows = []
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append((task, metric, filter_name, float(value),
                         float(stderr) if isinstance(stderr, (int, float)) else None))
    return rows


def format_table(rows):
    header = ("task", "metric", "filter", "value", "stderr")
    lines = [(task, metric, filter_name, f"{value:.4f}", "" if stderr is None or math.isnan(stderr)
              else f"± {stderr:.4f}") for task, metric, filter_name, value, stderr in rows]
    widths = [max(len(str(row[i])) for row in [header] + lines) for i in range(len(header))]
    rule = "  ".join("-" * width for width in widths)
    render = lambda row: "  ".join(str(cell).ljust(width) if i < 3 else str(cell).rjust(width)  # noqa: E731
                                   for i, (cell, width) in enumerate(zip(row, widths)))
    return "\n".join([render(header), rule] + [render(row) for row in lines])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("checkpoint", help="folder written by save_pretrained (or a hub id, online)")
    parser.add_argument("--tasks", default=BUNDLED_PREFIX, help="comma-separated lm-eval tasks or groups")
    parser.add_argument("--paper", action="store_true", help="the paper's task list (DESIGN §6); online only")
    parser.add_argument("--limit", type=float, default=None, help="at most this many items per task (testing)")
    parser.add_argument("--num_fewshot", type=int, default=None)
    parser.add_argument("--batch_size", default="1", help="an integer, or auto")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:0, ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="model dtype, e.g. bfloat16 (default: the checkpoint's)")
    parser.add_argument("--output", default="results.json", help="results JSON (default: %(default)s)")
    parser.add_argument("--write_to_checkpoint", action="store_true",
                        help=f"also write {RESULTS_FILE} into the checkpoint folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    checkpoint = check_checkpoint(parser, args.checkpoint, args.write_to_checkpoint)
    tasks = PAPER_TASKS if args.paper else [task.strip() for task in args.tasks.split(",") if task.strip()]
    if not tasks:
        parser.error("--tasks is empty")
    batch_size = args.batch_size if args.batch_size.startswith("auto") else int(args.batch_size)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    offline_only = all(task.startswith(BUNDLED_PREFIX) for task in tasks)
    local = Path(checkpoint).is_dir()
    if offline_only and local:
        # the bundled pack and a local checkpoint need no network: don't let the hub clients try it
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ.setdefault(name, "1")
    elif os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        print(f"warning: {', '.join(t for t in tasks if not t.startswith(BUNDLED_PREFIX))} download their data "
              "from the Hugging Face hub, but the hub is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)",
              file=sys.stderr)

    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import handle_non_serializable
    except ImportError as error:
        parser.exit(1, f"evaluate.py: error: needs lm-evaluation-harness ({error}): pip install 'lm_eval>=0.4.9' "
                       "(or install this package with its examples extra: pip install -e '.[examples]')\n")
    import torch

    model_args = {"pretrained": checkpoint, "trust_remote_code": True}
    if args.dtype:
        model_args["dtype"] = args.dtype
    # Indexing lm-eval's thousands of built-in tasks takes seconds: skip it when only the bundled pack is asked for.
    task_manager = TaskManager(include_path=str(bundled_tasks_dir()), include_defaults=not offline_only)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")  # lm-eval itself assumes cuda
    started = time.time()
    try:
        results = lm_eval.simple_evaluate(
            model="hf", model_args=model_args, tasks=tasks, task_manager=task_manager, num_fewshot=args.num_fewshot,
            batch_size=batch_size, device=device, limit=limit, random_seed=args.seed, numpy_random_seed=args.seed,
            torch_random_seed=args.seed, fewshot_random_seed=args.seed,
        )
    except OSError as error:  # what transformers and datasets raise when the hub cannot be reached or has no such repo
        hints = []
        if not local:
            hints.append(f"{checkpoint!r} is not a folder here, and it could not be loaded from the hub as a model id")
        if not offline_only:
            hints.append("tasks other than the bundled pack download their data from the Hugging Face hub: run them "
                         "with network access, or use the offline pack (--tasks shakespeare)")
        if not hints:
            raise
        raise SystemExit(f"error: {error}\n" + "\n".join(hints)) from error
    if results is None:  # a non-zero rank of a distributed run
        return 0
    elapsed = time.time() - started

    print(f"\n{checkpoint}: {', '.join(tasks)}" + (f" (limit {limit})" if limit is not None else "")
          + f", {elapsed:.0f}s")
    print(format_table(metric_rows(results)))

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n", encoding="utf-8")
    print(f"results: {output}")
    if args.write_to_checkpoint:
        target = Path(checkpoint) / RESULTS_FILE
        target.write_text(json.dumps(results["results"], indent=2, default=handle_non_serializable) + "\n",
                          encoding="utf-8")
        print(f"results for the model card: {target}")
        from linear_decay.model_card import write_model_card

        card = write_model_card(checkpoint)  # a hand-written README.md is left alone
        print(f"model card refreshed: {card}" if card else "model card: README.md is hand-written, left unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
