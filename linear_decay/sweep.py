"""Train one model per configuration of an experiment grid (DESIGN.md §6) and tabulate loss, recall and decay (§5).

    python -m linear_decay.sweep --grid T1 --size tiny --data corpus --steps 300 --seeds 0,1 --output_dir sweeps/t1
    python -m linear_decay.sweep --grid my_grid.json --data mqar --mqar_num_pairs 32 --steps 500 --output_dir DIR
    python -m linear_decay.sweep --grid T3 --model_overrides hidden_size=256,num_heads=4 --shard 0/4 --output_dir DIR

`--grid` is a named grid (T1–T4, encoded in GRIDS below) or a .json / .yaml file holding a list of
{"name": ..., "overrides": {config field: value}}. Every run of a sweep sees the same data in the same order, the same
seed and the same token budget (steps × batch × sequence length); only the config overrides differ. The optimizer is
the paper's (AdamW 0.9 / 0.95, weight decay 0.1, clip 1.0; DESIGN §6) with a cosine schedule.

Data: `corpus` — the bundled corpus, its last 2 % of characters held out for evaluation (perplexity); `gutenberg` —
the bundled corpus and public-domain texts fetched and verified at run time (linear_decay/texts.py), each work's last
2 % held out; `mqar` — multi-query associative recall (linear_decay/mqar.py), a held-out set generated with another
seed (accuracy), its queries close to the context (`--mqar_query_gaps power`) or anywhere after it (`uniform`), its
training examples at one pair count or a mixture of counts (`--mqar_min_pairs`).

Output: DIR/<name>-seed<s>/ holds the final model — its model card (README.md) filled from the training record beside
it, linear_decay_training.json — and result.json (final train loss, eval loss and perplexity or accuracy, tokens/s,
per-layer decay statistics); DIR/results.csv, DIR/results.md and DIR/decay.png (median λ per layer, one line per
configuration, averaged over seeds) summarise every finished run. A run whose result.json exists is skipped, so an
interrupted sweep continues where it stopped, and `--time_budget SECONDS` starts no run that would end after the budget
(judged by the runs before it), leaving it for the next sweep; a configuration the config rejects is reported and
skipped. `--model_overrides` changes the preset for every run (the grid's own overrides win). `--shard K/N` trains only
runs K, K+N, K+2N, ... of the plan, so N processes (on one GPU or several) can share one output directory; a last run
without `--shard` then finds everything done and writes the summaries (`--summarize_only` writes them for the runs
finished so far and trains nothing). `--processes N` does the sharding itself: it starts N shard processes (spread over
the visible GPUs), waits for them and writes the summaries; small models leave a GPU mostly idle, so several processes
on one GPU finish a grid sooner.
"""

import argparse
import ast
import copy
import csv
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

MAMBA2_FAMILY = ("mamba2", "mamba2_no_a", "mamba2_no_dt", "mamba2_no_a_no_dt")
MAIN_DECAYS = ("mamba2", "gla", "hgrn2", "lightnet")
SIMPLE_DECAY_P = (0.8, 0.9, 0.95, 0.99)


def _grid_t1():
    """Parameterization (vector decay, own decay projection): mamba2 and its three ablations, gla, hgrn2, lightnet,
    Simple Decay with p ∈ {0.8, 0.9, 0.95, 0.99}."""
    entries = [{"name": decay, "overrides": {"decay_type": decay}} for decay in (*MAMBA2_FAMILY, "gla", "hgrn2",
                                                                                 "lightnet")]
    entries += [{"name": f"simple-p{p}", "overrides": {"decay_type": "simple", "simple_decay_init": p}}
                for p in SIMPLE_DECAY_P]
    return entries


def _grid_t2():
    """Sharing (DESIGN §3): {mamba2, gla, hgrn2, lightnet} × {own decay projection, keys derived from the decay}."""
    return [{"name": f"{decay}-{'shared' if share else 'own'}",
             "overrides": {"decay_type": decay, "decay_granularity": "vector", "share_decay": share}}
            for decay in MAIN_DECAYS for share in (False, True)]


def _grid_t3():
    """Granularity: {mamba2, gla, hgrn2, lightnet} × {vector, scalar}, plus the static tnl and tnl_l (scalar)."""
    entries = [{"name": f"{decay}-{granularity}",
                "overrides": {"decay_type": decay, "decay_granularity": granularity}}
               for decay in MAIN_DECAYS for granularity in ("vector", "scalar")]
    return entries + [{"name": f"{decay}-scalar", "overrides": {"decay_type": decay, "decay_granularity": "scalar"}}
                      for decay in ("tnl", "tnl_l")]


def _grid_t4():
    """Position encoding (DESIGN §4), scalar decay: {mamba2, gla, hgrn2, lightnet, tnl, tnl_l} × {none, rope, lrpe,
    tpe}. The paper's "RoPE" column is what the authors ran, lrpe; true rope is run beside it."""
    return [{"name": f"{decay}-{position}",
             "overrides": {"decay_type": decay, "decay_granularity": "scalar", "position_encoding": position}}
            for decay in (*MAIN_DECAYS, "tnl", "tnl_l") for position in ("none", "rope", "lrpe", "tpe")]


GRIDS = {"T1": _grid_t1(), "T2": _grid_t2(), "T3": _grid_t3(), "T4": _grid_t4()}
RESULT_FILE = "result.json"
# what a resumed run must share with the sweep: its budget and every setting that shapes its training or data
RUN_KEYS = ("size", "model_overrides", "data", "steps", "batch_size", "seq_len", "learning_rate", "bf16", "data_seed",
            "eval_examples")
MQAR_KEYS = ("mqar_vocab_size", "mqar_num_pairs", "mqar_min_pairs", "mqar_num_queries", "mqar_query_gaps")
CSV_FIELDS = ("run", "config", "seed", "decay_type", "decay_granularity", "share_decay", "position_encoding",
              "overrides", "steps", "train_tokens", "final_train_loss", "eval_loss", "eval_perplexity",
              "eval_accuracy", "tokens_per_second", "train_seconds", "median_decay_per_layer")


class SweepError(Exception):
    """A mistake on the command line or in a grid file: reported as one line."""


def load_grid(spec):
    """The grid's entries [{name, overrides}]: a name in GRIDS, a .json / .yaml file, or several of those joined by
    commas (e.g. "T1,T3"; a configuration in two grids is trained once, see run_sweep). Malformed entries are kept
    with an `error` so that they are reported beside the runs, not silently dropped."""
    if "," in spec:
        entries = [entry for part in spec.split(",") if part.strip() for entry in load_grid(part.strip())]
        names = [entry["name"] for entry in entries]
        for entry in entries:
            if names.count(entry["name"]) > 1 and "error" not in entry:
                entry["error"] = "duplicate name (runs would share a folder)"
        return entries
    if spec in GRIDS:
        return [dict(entry) for entry in GRIDS[spec]]
    path = Path(spec)
    if not path.is_file():
        raise SweepError(f"--grid {spec}: neither a named grid ({', '.join(GRIDS)}) nor a file")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(text)
    else:
        raw = json.loads(text)
    if not isinstance(raw, list):
        raise SweepError(f"--grid {spec}: expected a list of {{name, overrides}}, got {type(raw).__name__}")
    entries, seen = [], set()
    for index, item in enumerate(raw):
        name = item.get("name") if isinstance(item, dict) else None
        overrides = item.get("overrides", {}) if isinstance(item, dict) else None
        entry = {"name": str(name) if name is not None else f"entry-{index}", "overrides": overrides or {}}
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            entry["error"] = f"entry {index} needs a 'name' usable as a folder name, got {name!r}"
        elif not isinstance(overrides, dict):
            entry["error"] = f"'overrides' must be a mapping of config fields, got {overrides!r}"
        elif name in seen:
            entry["error"] = "duplicate name (runs would share a folder)"
        seen.add(entry["name"])
        entries.append(entry)
    return entries


# ---------------------------------------------------------------- data


def bundled_tokenizer():
    from transformers import AutoTokenizer

    from .quickstart import TOKENIZER

    return AutoTokenizer.from_pretrained(TOKENIZER)


def _held_out_cut(text, fraction=0.02):
    """Where the last `fraction` of `text`'s characters start, moved back to a line start."""
    return text.rindex("\n", 0, int(len(text) * (1 - fraction))) + 1


def corpus_data(args, budget_examples, tokenizer):
    """(train, eval, decay_probe_ids). `corpus`: train blocks from the head of the bundled corpus (only as many works
    as the token budget needs are tokenized), eval blocks and the decay probe (DESIGN §5: one 2048-token text) from its
    held-out last 2 % of characters. `gutenberg`: the bundled works and the texts of `texts.GUTENBERG_SELECTIONS`
    (fetched and verified at run time), each work's last 2 % held out, eval blocks drawn from all of them, the
    probe from the longest; the budget passes over the training text as often as it needs (a run's `train_passes`)."""
    from .quickstart import CORPUS, TokenBlocks

    text = CORPUS.read_text(encoding="utf-8")
    needed = budget_examples * args.seq_len
    if args.data == "corpus":
        cut = _held_out_cut(text)
        works, held_out_texts = text[:cut].split("\n\n\n"), [text[cut:]]
    else:
        from .texts import GUTENBERG_SELECTIONS, TextSourceError, fetch_texts

        try:
            fetched = [work for _, work in fetch_texts(GUTENBERG_SELECTIONS, args.text_cache)]
        except TextSourceError as error:
            raise SweepError(str(error)) from None
        split = [(work, _held_out_cut(work)) for work in text.split("\n\n\n") + fetched if work.strip()]
        works = [work[:cut] for work, cut in split]
        held_out_texts = [work[cut:] for work, cut in split]
        needed = None  # every work: the mixture, not the budget, decides what is tokenized
    train_tokens = []
    for work in works:
        if needed is not None and len(train_tokens) >= needed:
            break
        train_tokens += tokenizer(work, add_special_tokens=False, verbose=False)["input_ids"] + [tokenizer.eos_token_id]
    held_out = [tokenizer(part, add_special_tokens=False, verbose=False)["input_ids"] for part in held_out_texts]
    train = TokenBlocks(train_tokens, args.seq_len)
    if args.data == "corpus":
        evaluation = TokenBlocks(held_out[0], args.seq_len)
        evaluation.blocks = evaluation.blocks[: args.eval_examples]
    else:  # blocks spread evenly over every work's held-out part
        evaluation = TokenBlocks([token for ids in held_out for token in ids + [tokenizer.eos_token_id]], args.seq_len)
        if len(evaluation) > args.eval_examples:
            evaluation.blocks = evaluation.blocks[torch.linspace(0, len(evaluation) - 1, args.eval_examples).long()]
    if len(train) == 0 or len(evaluation) == 0:
        raise SweepError(f"--seq_len {args.seq_len} leaves no training or held-out block")
    return train, evaluation, torch.tensor([max(held_out, key=len)[:2048]])


class ArrayExamples(torch.utils.data.Dataset):
    """Rows of equally long int64 arrays as {name: tensor} examples (the MQAR sets held in memory: building a
    `datasets.Dataset` of 10⁵ rows would cost more than a small run's training)."""

    def __init__(self, **columns):
        self.columns = {name: torch.as_tensor(array) for name, array in columns.items()}

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitem__(self, index):
        return {name: column[index] for name, column in self.columns.items()}


def mqar_data(args, budget_examples, tokenizer=None):
    """(train, eval, decay_probe_ids): exactly one epoch of MQAR examples for the budget (seed --data_seed; pair
    counts mixed from --mqar_min_pairs up where it is given) and a held-out set from another seed at the full
    --mqar_num_pairs (linear_decay/mqar.py, the arrays of `mqar_dataset`); the decay probe is 8 held-out examples."""
    from .mqar import mqar_examples

    knobs = dict(vocab_size=args.mqar_vocab_size, num_pairs=args.mqar_num_pairs, num_queries=args.mqar_num_queries,
                 seq_len=args.seq_len, query_gap_power=None if args.mqar_query_gaps == "uniform" else 0.01)

    def examples(count, seed, min_pairs=None):
        arrays = mqar_examples(count, **knobs, seed=seed, min_pairs=min_pairs)
        return ArrayExamples(**dict(zip(("input_ids", "labels"), arrays)))

    try:
        train = examples(budget_examples, args.data_seed, args.mqar_min_pairs)
        evaluation = examples(args.eval_examples, args.data_seed + 1_000_003)
    except ValueError as error:
        raise SweepError(str(error)) from None
    return train, evaluation, evaluation.columns["input_ids"][:8]


# ---------------------------------------------------------------- one run


def parse_model_overrides(text):
    """'hidden_size=256,num_heads=4' -> {'hidden_size': 256, 'num_heads': 4} (values as Python literals where they
    are one)."""
    overrides = {}
    for pair in filter(None, (p.strip() for p in (text or "").split(","))):
        key, equals, value = (s.strip() for s in pair.partition("="))
        if not equals or not key:
            raise SweepError(f"--model_overrides expects FIELD=VALUE pairs separated by commas, got {pair!r}")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return overrides


def build_config(size, overrides, data_fields, model_overrides=None):
    """LinearDecayConfig.from_preset(size, data fields + model overrides + the entry's overrides); ValueError for an
    unsupported entry."""
    from .configuration_linear_decay import LinearDecayConfig

    config = LinearDecayConfig.from_preset(size, **{**data_fields, **(model_overrides or {}), **overrides})
    if config.vocab_size < data_fields["vocab_size"]:
        raise ValueError(f"vocab_size={config.vocab_size} is smaller than the data's {data_fields['vocab_size']}")
    return config


def train_one(entry, seed, config, data, tokenizer, args, run_dir):
    """Train, evaluate and measure one configuration; write the model and, last, result.json. Returns the result."""
    from transformers import Trainer, TrainingArguments, default_data_collator, set_seed

    from .analysis import decay_statistics
    from .model_card import TRAINING_FILE
    from .modeling_linear_decay import LinearDecayForCausalLM
    from .mqar import mqar_accuracy

    train, evaluation, probe_ids = data
    set_seed(seed)
    model = LinearDecayForCausalLM(copy.deepcopy(config))  # the seeds of one configuration share `config`
    on_gpu = torch.cuda.is_available() and not args.cpu
    training_args = TrainingArguments(
        output_dir=str(run_dir), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=args.learning_rate, lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 20), weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
        logging_steps=max(1, args.steps // 10), save_strategy="no", report_to=[], use_cpu=not on_gpu,
        bf16=args.bf16, seed=seed, data_seed=seed, dataloader_num_workers=0, disable_tqdm=True,
    )
    is_mqar = args.data == "mqar"
    trainer = Trainer(
        model=model, args=training_args, data_collator=default_data_collator, train_dataset=train,
        eval_dataset=evaluation,
        compute_metrics=(lambda p: {"accuracy": mqar_accuracy(p.predictions, p.label_ids)}) if is_mqar else None,
        preprocess_logits_for_metrics=(lambda logits, labels: logits.argmax(-1)) if is_mqar else None,
    )
    started = time.time()
    trained = trainer.train()
    train_seconds = time.time() - started
    metrics = trainer.evaluate()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    tokens = trainer.state.global_step * args.batch_size * args.seq_len
    stats = decay_statistics(model, probe_ids.to(model.device))

    result = {
        "run": run_dir.name, "config": entry["name"], "seed": seed, "overrides": entry["overrides"],
        "size": args.size, "model_overrides": args.model_overrides, "data": args.data, "steps": trainer.state.global_step, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "train_tokens": tokens,
        "train_passes": trainer.state.global_step * args.batch_size / len(train),
        "final_train_loss": losses[-1] if losses else trained.training_loss,
        "eval_loss": metrics["eval_loss"],
        "eval_perplexity": None if is_mqar else math.exp(min(metrics["eval_loss"], 50.0)),
        "eval_accuracy": metrics.get("eval_accuracy") if is_mqar else None,
        "tokens_per_second": tokens / train_seconds,
        "train_seconds": train_seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
        "decay_statistics": stats,
        "median_decay_per_layer": [row["median"] for row in stats],
        "model_config": {field: getattr(config, field) for field in ("decay_type", "decay_granularity",
                                                                     "share_decay", "position_encoding",
                                                                     "simple_decay_init", "hidden_size",
                                                                     "num_hidden_layers", "num_heads",
                                                                     "vocab_size")},
        "sweep_settings": dict(vars(args)),
        "environment": run_environment(model.device),
    }

    model.config.use_cache = True  # Trainer switches it off for training; decoding wants the recurrent cache
    model.generation_config.use_cache = True
    run_dir.mkdir(parents=True, exist_ok=True)
    record = training_record(entry, seed, args, training_args, result)  # first: the model card written next reads it
    (run_dir / TRAINING_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    trainer.save_model(str(run_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(run_dir))
    partial = run_dir / (RESULT_FILE + ".partial")
    partial.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    os.replace(partial, run_dir / RESULT_FILE)  # result.json appears only complete: it marks the run as done
    return result


def training_record(entry, seed, args, training_args, result):
    """What the model card of a run's checkpoint says about its training (`model_card.TRAINING_FILE`, the record
    `examples/run_clm.py` writes too), from the run's result."""
    if args.data == "corpus":
        data = {"data_files": ["bundled Shakespeare corpus (linear_decay/data/corpus.txt, public domain), "
                               "its last 2 % held out"]}
    elif args.data == "gutenberg":
        from .texts import GUTENBERG_SELECTIONS as source

        data = {"data_files": ["bundled Shakespeare corpus (linear_decay/data/corpus.txt, public domain)",
                               f"{source.provenance} ({source.url}, sha512 {source.sha512}; {source.licence})"],
                "data": f"each work's last 2 % held out; {result['train_passes']:.2f} passes over the training text"}
    else:
        gaps = "uniform" if args.mqar_query_gaps == "uniform" else "power-law (0.01)"
        mixed = ("" if args.mqar_min_pairs is None else
                 f" (training examples: {args.mqar_min_pairs} to {args.mqar_num_pairs}, uniformly; held out: "
                 f"{args.mqar_num_pairs})")
        data = {"data": f"multi-query associative recall (linear_decay/mqar.py): vocabulary {args.mqar_vocab_size}, "
                        f"{args.mqar_num_pairs} key-value pairs{mixed}, {args.mqar_num_queries} queries ({gaps} "
                        f"gaps), seed {args.data_seed}"}
    optimizer = getattr(training_args.optim, "value", training_args.optim)
    warmup, device = training_args.warmup_steps, result["environment"]["device"]
    return {
        "datasets": [],
        **data,
        "steps": result["steps"],
        "global_batch_size": args.batch_size,
        "sequence_length": args.seq_len,
        "train_tokens": result["train_tokens"],
        "learning_rate": args.learning_rate,
        "lr_scheduler": f"cosine, {warmup} warm-up step{'' if warmup == 1 else 's'}",
        "optimizer": f"{optimizer} (betas {training_args.adam_beta1}, {training_args.adam_beta2}), weight decay "
                     f"{training_args.weight_decay}, gradient clipping {training_args.max_grad_norm}",
        "precision": "bf16" if args.bf16 else "fp32",
        "final_train_loss": result["final_train_loss"],
        "eval_loss": result["eval_loss"],
        "eval_perplexity": result["eval_perplexity"],
        "eval_accuracy": result["eval_accuracy"],
        "hardware": f"1 × {'CPU' if device == 'cpu' else device}",
        "command": getattr(args, "command", None),
        "sweep": {"grid": args.grid, "configuration": entry["name"], "seed": seed, "overrides": entry["overrides"]},
    }


def run_environment(device):
    """Versions, device and recurrence backend of a run (tokens/s depend on them; with several shard processes on
    one GPU they are a share of it, not a speed benchmark)."""
    import transformers

    from .recurrence import resolve_backend

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "backend": resolve_backend(device.type)}


# ---------------------------------------------------------------- summaries


def _csv_row(result):
    config = result["model_config"]
    row = {field: result.get(field) for field in CSV_FIELDS}
    row.update({key: config[key] for key in ("decay_type", "decay_granularity", "share_decay", "position_encoding")})
    row["overrides"] = json.dumps(result["overrides"], sort_keys=True)
    row["median_decay_per_layer"] = ";".join(f"{m:.4f}" for m in result["median_decay_per_layer"])
    return row


def _mean_std(values, digits=4):
    """'mean ± std' over seeds ('—' when there is no value)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def by_configuration(results):
    grouped = {}
    for result in results:
        grouped.setdefault(result["config"], []).append(result)
    return grouped


# Design fields whose one-at-a-time changes the grids test (DESIGN §6: T3, T2, T4), each with its values in the order
# in which a paired comparison subtracts them (the first is the reference).
PAIRED_FIELDS = {"decay_granularity": ("vector", "scalar"), "share_decay": (False, True),
                 "position_encoding": ("none", "rope", "lrpe", "tpe")}


def paired_comparisons(grouped, key):
    """[(field, reference, other, [per-seed differences other − reference of `key`])] for every two configurations
    whose model configs differ in exactly one of PAIRED_FIELDS, over the seeds both ran."""
    configs = {name: runs[0]["model_config"] for name, runs in grouped.items()}
    rows = []
    for field, order in PAIRED_FIELDS.items():
        for reference, ref_config in configs.items():
            for other, other_config in configs.items():
                if ref_config.get(field) not in order or other_config.get(field) not in order:
                    continue
                if order.index(ref_config[field]) >= order.index(other_config[field]):
                    continue
                if any(ref_config.get(f) != other_config.get(f) for f in set(ref_config) | set(other_config)
                       if f != field):
                    continue
                by_seed = {run["seed"]: run[key] for run in grouped[reference] if run.get(key) is not None}
                differences = [run[key] - by_seed[run["seed"]] for run in grouped[other]
                               if run["seed"] in by_seed and run.get(key) is not None]
                if differences:
                    rows.append((field, reference, other, differences))
    return rows


def _paired_lines(grouped, key, metric, lower_is_better):
    rows = paired_comparisons(grouped, key)
    if not rows:
        return []
    better = "lower" if lower_is_better else "higher"
    lines = ["", f"Paired comparisons (configurations that differ in one design field, same seeds): B − A of the "
                 f"{metric}, mean ± std over seeds; B better in: seeds where B's {metric} is {better}.", "",
             "| differs in | A | B | seeds | B − A | B better in |", "|---|---|---|---|---|---|"]
    for field, reference, other, differences in rows:
        wins = sum((d < 0) if lower_is_better else (d > 0) for d in differences)
        lines.append(f"| {field} | {reference} | {other} | {len(differences)} | {_mean_std(differences)} | "
                     f"{wins}/{len(differences)} |")
    return lines


def _ranks(values):
    """Ranks 1..n of `values`, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(xs, ys):
    """Spearman's rank correlation of two equally long lists (None when it is undefined)."""
    if len(xs) < 3:
        return None
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def decay_relation(grouped, key):
    """[(configuration, mean median λ, [metric per seed])] sorted by the mean median λ (each run's per-layer medians
    averaged over layers, then over seeds: DESIGN §5's statistic), and Spearman's ρ between that λ and the metric's
    mean over the configurations (DESIGN §6, claim 1: good configurations sit near a median λ of about 0.8)."""
    rows = []
    for name, runs in grouped.items():
        values = [run[key] for run in runs if run.get(key) is not None]
        if values:
            rows.append((name, statistics.mean(statistics.mean(run["median_decay_per_layer"]) for run in runs),
                         values))
    rows.sort(key=lambda row: row[1])
    rho = spearman([row[1] for row in rows], [statistics.mean(row[2]) for row in rows])
    return rows, rho


def _decay_relation_lines(grouped, key, metric):
    rows, rho = decay_relation(grouped, key)
    if not rows:
        return []
    lines = ["", f"Median λ and {metric}, by mean median λ (per-layer medians averaged over layers and seeds); "
                 f"Spearman's ρ between the two over {len(rows)} configurations: "
                 + ("undefined" if rho is None else f"{rho:+.2f}") + ".", "",
             f"| configuration | mean median λ | {metric} |", "|---|---|---|"]
    lines += [f"| {name} | {decay:.3f} | {_mean_std(values)} |" for name, decay, values in rows]
    return lines


def _mqar_task(result):
    """' (vocabulary V, N pairs, ...)' from an MQAR run's recorded settings; '' for text or an older record."""
    settings = result.get("sweep_settings", {})
    if result["data"] != "mqar" or "mqar_num_pairs" not in settings:
        return ""
    low = settings.get("mqar_min_pairs")
    pairs = (f"{settings['mqar_num_pairs']} key-value pairs" if low is None else
             f"training examples of {low} to {settings['mqar_num_pairs']} key-value pairs, held-out ones of "
             f"{settings['mqar_num_pairs']}")
    return (f" (vocabulary {settings['mqar_vocab_size']}, {pairs}, {settings['mqar_num_queries']} queries, "
            f"{settings.get('mqar_query_gaps', 'power')} gaps)")


def write_summaries(results, invalid, output_dir, title, aliases=()):
    """results.csv (one row per run), results.md (per configuration, mean ± std over seeds; the paired comparisons of
    `paired_comparisons`; median λ against the metric, `decay_relation`; the invalid entries), decay.png (median λ vs
    layer per configuration, averaged over seeds; DESIGN §5)."""
    with open(output_dir / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(_csv_row(result) for result in results)

    grouped = by_configuration(results)
    recall = any(result["data"] == "mqar" for result in results)
    metric, key = ("eval accuracy", "eval_accuracy") if recall else ("eval perplexity", "eval_perplexity")
    lines = [f"# {title}", "",
             f"| configuration | overrides | seeds | final train loss | eval loss | {metric} | tokens/s | "
             "median λ per layer |",
             "|---|---|---|---|---|---|---|---|"]
    for name, runs in grouped.items():
        layers = zip(*(run["median_decay_per_layer"] for run in runs))
        medians = " ".join(f"{statistics.mean(layer):.3f}" for layer in layers)
        overrides = ", ".join(f"{k}={v}" for k, v in runs[0]["overrides"].items())
        lines.append(f"| {name} | {overrides} | {','.join(str(r['seed']) for r in runs)} | "
                     f"{_mean_std([r['final_train_loss'] for r in runs])} | {_mean_std([r['eval_loss'] for r in runs])}"
                     f" | {_mean_std([r[key] for r in runs])} | {_mean_std([r['tokens_per_second'] for r in runs], 0)}"
                     f" | {medians} |")
    if results:
        first = results[0]
        size = first["size"] + (f" ({first['model_overrides']})" if first.get("model_overrides") else "")
        lines += ["", f"{size} preset, {first['data']} data{_mqar_task(first)}, {first['steps']} steps × "
                      f"{first['batch_size']} × {first['seq_len']} tokens = {first['train_tokens']:,} training tokens per run."]
    lines += _paired_lines(grouped, key, metric, lower_is_better=not recall)
    lines += _decay_relation_lines(grouped, key, metric)
    if aliases:
        lines += ["", "Same configuration under two names (trained once): "
                  + ", ".join(f"{alias} = {name}" for alias, name in aliases) + "."]
    if invalid:
        lines += ["", "Skipped (invalid configuration):", ""]
        lines += [f"- {name}: {reason}" for name, reason in invalid]
    (output_dir / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if grouped:
        plot_median_decay(grouped, output_dir / "decay.png", title)


def plot_median_decay(grouped, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.0, 4.4))
    colors, styles = plt.get_cmap("tab10").colors, ("-", "--", ":", "-.")  # 40 distinguishable lines
    for index, (name, runs) in enumerate(grouped.items()):
        medians = [statistics.mean(layer) for layer in zip(*(run["median_decay_per_layer"] for run in runs))]
        axes.plot(range(len(medians)), medians, marker="o", markersize=3, color=colors[index % 10],
                  linestyle=styles[index // 10 % 4], label=name)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_xlabel("layer")
    axes.set_ylabel("median λ" + (" (mean over seeds)" if any(len(r) > 1 for r in grouped.values()) else ""))
    axes.set_ylim(0.0, 1.02)
    axes.set_title(f"Median decay per layer — {title}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="x-small", ncol=1 + len(grouped) // 16, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(figure)


# ---------------------------------------------------------------- driver


def _duration(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m linear_decay.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", required=True,
                        help=f"{', '.join(GRIDS)} or a .json/.yaml list of {{name, overrides}}")
    parser.add_argument("--size", default="tiny", help="config preset (tiny, 160m, 410m, 1.45b)")
    parser.add_argument("--model_overrides", default="",
                        help="FIELD=VALUE,... applied to the preset for every run, e.g. hidden_size=256,num_heads=4")
    parser.add_argument("--summarize_only", action="store_true",
                        help="write results.csv/.md and decay.png for the finished runs; train nothing")
    parser.add_argument("--time_budget", type=float, default=None, metavar="SECONDS",
                        help="start no run that would end after this many seconds from the sweep's start, judged "
                             "by the mean time of the runs it has trained so far (its first run always starts); "
                             "the rest stay for a later sweep into the same --output_dir")
    parser.add_argument("--processes", type=int, default=1,
                        help="run the plan in this many shard processes (over the visible GPUs), then summarise")
    parser.add_argument("--shard", default=None, metavar="K/N",
                        help="train only runs K, K+N, ... of the plan (N processes sharing --output_dir)")
    parser.add_argument("--data", choices=("corpus", "gutenberg", "mqar"), default="corpus",
                        help="corpus: the bundled corpus; gutenberg: it and public-domain texts fetched at run time "
                             "(linear_decay/texts.py); mqar: synthetic recall")
    parser.add_argument("--text_cache", default=None,
                        help="folder for fetched texts (default ~/.cache/linear_decay/texts)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds (model init and data order)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=256, help="tokens per training sequence (block or MQAR length)")
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--eval_examples", type=int, default=128, help="held-out sequences evaluated per run")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    parser.add_argument("--cpu", action="store_true", help="train on CPU even where a GPU is present")
    parser.add_argument("--data_seed", type=int, default=1234, help="MQAR generation seed (the same for every run)")
    parser.add_argument("--mqar_vocab_size", type=int, default=8192)
    parser.add_argument("--mqar_num_pairs", type=int, default=16)
    parser.add_argument("--mqar_min_pairs", type=int, default=None,
                        help="each training example draws its pair count uniformly from this to --mqar_num_pairs "
                             "(Zoology's mixture of easy and hard examples); held-out examples have --mqar_num_pairs")
    parser.add_argument("--mqar_num_queries", type=int, default=None, help="default: --mqar_num_pairs")
    parser.add_argument("--mqar_query_gaps", choices=("power", "uniform"), default="power",
                        help="where queries sit after the context: mostly close to it (Zoology's power law, 0.01) or "
                             "uniformly over the rest of the sequence")
    args = parser.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds expects comma-separated integers, got {args.seeds!r}")
    if not args.seeds:
        parser.error("--seeds names no seed")
    for flag in ("steps", "batch_size", "seq_len", "eval_examples"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be positive")
    if args.mqar_num_queries is None:
        args.mqar_num_queries = args.mqar_num_pairs
    if args.mqar_min_pairs is not None and not 1 <= args.mqar_min_pairs <= args.mqar_num_pairs:
        parser.error(f"--mqar_min_pairs must lie in [1, --mqar_num_pairs={args.mqar_num_pairs}]")
    if args.processes < 1:
        parser.error("--processes must be positive")
    if args.time_budget is not None and args.time_budget <= 0:
        parser.error("--time_budget must be positive")
    if args.processes > 1 and (args.shard is not None or args.summarize_only):
        parser.error("--processes starts its own shards: not with --shard or --summarize_only")
    if args.shard is not None:
        try:
            index, count = (int(part) for part in args.shard.split("/"))
        except ValueError:
            parser.error(f"--shard expects K/N, got {args.shard!r}")
        if not 0 <= index < count:
            parser.error(f"--shard {args.shard}: need 0 <= K < N")
        args.shard = (index, count)
    return args


def differing_settings(result, args):
    """["key=recorded value", ...] for each of RUN_KEYS (and MQAR_KEYS for MQAR) in which a finished run's record
    differs from this sweep's arguments; a setting the record does not hold (an older record) is not compared."""
    recorded = {**result.get("sweep_settings", {}), **{key: result[key] for key in RUN_KEYS if key in result}}
    keys = RUN_KEYS + (MQAR_KEYS if args.data == "mqar" else ())
    return [f"{key}={recorded[key]!r}" for key in keys if key in recorded and recorded[key] != getattr(args, key)]


def run_sweep(args):
    """Train every (valid configuration, seed) without a result.json, then rewrite the summaries. Returns the list
    of results in grid order."""
    from .configuration_linear_decay import PRESETS

    if args.size not in PRESETS:
        raise SweepError(f"--size {args.size}: allowed: {', '.join(PRESETS)}")
    entries = load_grid(args.grid)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    tokenizer = bundled_tokenizer() if args.data != "mqar" else None
    if tokenizer is not None:
        data_fields = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    else:
        from .mqar import check_mqar_knobs

        try:
            check_mqar_knobs(args.mqar_vocab_size, args.mqar_num_pairs, args.mqar_num_queries, args.seq_len)
        except ValueError as error:
            raise SweepError(str(error)) from None
        data_fields = dict(vocab_size=args.mqar_vocab_size)

    model_overrides = parse_model_overrides(args.model_overrides)
    invalid, planned, trained_as, aliases = [], [], {}, []  # trained_as: the configuration's settings -> the first entry's name
    for entry in entries:
        reason = entry.get("error")
        if reason is None:
            try:
                config = build_config(args.size, entry["overrides"], data_fields, model_overrides)
            except (ValueError, TypeError) as error:
                reason = str(error)
        if reason is not None:
            invalid.append((entry["name"], reason))
            print(f"invalid: {entry['name']}: {reason} — skipped", flush=True)
            continue
        settings = config.to_json_string(use_diff=False)
        if settings in trained_as:  # e.g. T1's gla is T3's gla-vector
            print(f"same configuration: {entry['name']} = {trained_as[settings]} (trained once, as the latter)",
                  flush=True)
            aliases.append((entry["name"], trained_as[settings]))
            continue
        trained_as[settings] = entry["name"]
        planned += [(entry, seed, config) for seed in args.seeds]
    if args.shard is not None:
        index, count = args.shard
        planned = planned[index::count]
    if args.summarize_only:
        missing = [f"{e['name']}-seed{s}" for e, s, _ in planned
                   if not (output_dir / f"{e['name']}-seed{s}" / RESULT_FILE).is_file()]
        planned = [(e, s, c) for e, s, c in planned if f"{e['name']}-seed{s}" not in missing]
        if missing:
            print(f"--summarize_only: {len(missing)} run(s) not finished: {', '.join(missing)}", flush=True)

    data = None  # built when the first run needs it, so that a finished sweep only rewrites its summaries
    results, trained_seconds, trained_runs, deferred = [], 0.0, 0, []
    to_train = sum(not (output_dir / f"{e['name']}-seed{s}" / RESULT_FILE).is_file() for e, s, _ in planned)
    sweep_started = time.time()
    for index, (entry, seed, config) in enumerate(planned, start=1):
        run_dir = output_dir / f"{entry['name']}-seed{seed}"
        tag = f"[{index}/{len(planned)}] {run_dir.name}"
        if (run_dir / RESULT_FILE).is_file():
            print(f"{tag}: skip (result.json exists)", flush=True)
            result = json.loads((run_dir / RESULT_FILE).read_text(encoding="utf-8"))
            differing = differing_settings(result, args)
            if differing:
                print(f"{tag}: warning: its result.json was trained with {', '.join(differing)} (delete the folder "
                      "to retrain it with this sweep's settings)", flush=True)
            results.append(result)
            continue
        if (args.time_budget is not None and trained_runs
                and time.time() - sweep_started + trained_seconds / trained_runs > args.time_budget):
            deferred.append(run_dir.name)
            continue
        print(f"{tag}: start ({', '.join(f'{k}={v}' for k, v in entry['overrides'].items()) or 'preset defaults'})",
              flush=True)
        started = time.time()
        if data is None:
            data = (mqar_data if args.data == "mqar" else corpus_data)(args, args.steps * args.batch_size, tokenizer)
        result = train_one(entry, seed, config, data, tokenizer, args, run_dir)
        trained_seconds += time.time() - started
        trained_runs += 1
        results.append(result)
        score = (f"accuracy {result['eval_accuracy']:.4f}" if args.data == "mqar"
                 else f"perplexity {result['eval_perplexity']:.2f}")
        remaining = to_train - trained_runs
        print(f"{tag}: done in {_duration(time.time() - started)} — train loss {result['final_train_loss']:.4f}, "
              f"eval loss {result['eval_loss']:.4f}, {score}, {result['tokens_per_second']:,.0f} tokens/s; "
              f"{remaining} to go, ETA {_duration(trained_seconds / trained_runs * remaining)}", flush=True)

    if deferred:
        print(f"--time_budget {args.time_budget:g} s: {len(deferred)} run(s) not started, left for a later sweep "
              f"into {output_dir}: {', '.join(deferred)}", flush=True)
    if args.shard is not None and not args.summarize_only:  # the other shards may still be running: one run without --shard summarises
        print(f"shard {args.shard[0]}/{args.shard[1]}: {len(results)} runs finished in {output_dir}", flush=True)
        return results
    title = f"sweep {Path(args.grid).stem if args.grid not in GRIDS else args.grid}"
    write_summaries(results, invalid, output_dir, title, aliases)
    print(f"{len(results)} runs, {len(invalid)} invalid configuration(s): {output_dir / 'results.md'}, "
          f"{output_dir / 'results.csv'}" + (f", {output_dir / 'decay.png'}" if results else ""), flush=True)
    return results


def run_processes(argv, processes):
    """Run `python -m linear_decay.sweep ARGV --shard k/N` for k < N at once (process k on GPU k mod #GPUs), their
    output prefixed with [shard k]; then summarise every finished run. The shards are stopped if this one is."""
    import subprocess
    import threading

    gpus = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpu_ids = visible.split(",") if visible else [str(i) for i in range(gpus)]
    children, pumps = [], []
    for k in range(processes):
        env = dict(os.environ)
        if gpu_ids and gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpu_ids[k % len(gpu_ids)]
        child = subprocess.Popen([sys.executable, "-m", "linear_decay.sweep", *argv, "--processes", "1",  # last wins
                                  "--shard", f"{k}/{processes}"],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        children.append(child)

        def pump(stream=child.stdout, prefix=f"[shard {k}] "):
            for line in stream:
                print(prefix + line, end="", flush=True)

        pumps.append(threading.Thread(target=pump, daemon=True))
        pumps[-1].start()
    try:
        codes = [child.wait() for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
        for thread in pumps:
            thread.join(timeout=5)
    failed = [k for k, code in enumerate(codes) if code != 0]
    if failed:
        print(f"shard(s) {', '.join(map(str, failed))} failed; summarising the finished runs", flush=True)
    return failed


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.command = shlex.join(["python", "-m", "linear_decay.sweep", *argv])  # recorded with every checkpoint
    try:
        if args.processes > 1:
            failed = run_processes(argv, args.processes)
            args.summarize_only, args.processes = True, 1
            run_sweep(args)
            return 1 if failed else 0
        run_sweep(args)
    except SweepError as error:
        sys.exit(f"linear_decay.sweep: error: {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
