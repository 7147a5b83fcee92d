"""Model cards: the README.md that `save_pretrained` / `push_to_hub` write next to a checkpoint.

The text is `model_cards/template.md` (shipped in the package as `model_card_template.md`); this module fills it from
the checkpoint itself, so any tool can refresh a card with `write_model_card(directory)`:

- `config.json` → the design choices (DESIGN §1–4), sizes and hub tags;
- the weights (`*.safetensors`) → the parameter count;
- `linear_decay_training.json` (written by `examples/run_clm.py` and `python -m linear_decay.sweep`) → datasets, base
  model, how it was trained; a final training loss it lacks (no loss line was logged: `logging_steps` exceeded the
  steps) comes from what transformers' Trainer saved beside it (`trainer_state.json`, `train_results.json`);
- `lm_eval_results.json` (written by `examples/evaluate.py --write_to_checkpoint`) → eval results in the metadata.

A README.md that this module did not write (no `GENERATED_MARKER`) is never overwritten.
"""

import json
import math
import os
import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCardData

from .configuration_linear_decay import LinearDecayConfig
from .decay import DECAY_REGISTRY

TEMPLATE = Path(__file__).resolve().parent / "model_card_template.md"
TRAINING_FILE = "linear_decay_training.json"
LM_EVAL_FILE = "lm_eval_results.json"
TRAINER_STATE_FILE = "trainer_state.json"  # transformers' Trainer.save_state()
TRAINER_METRICS_FILES = ("train_results.json", "all_results.json")  # transformers' Trainer.save_metrics("train", ...)
GENERATED_MARKER = "<!-- written by linear-decay; delete this line to keep your own edits when the model is saved again -->"
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

POSITION_MEANING = {
    "none": "no positional encoding (the decay alone orders tokens)",
    "rope": "rotary position embedding on q and k",
    "lrpe": "the cosine relative encoding the paper's code ran as RoPE (key dim doubles)",
    "tpe": "a learned per-head EMA filter over token embeddings",
}


def hub_tags(config):
    """Tags that make the design choices searchable on the Hub."""
    return [
        "linear-decay",
        "linear-attention",
        f"decay-{config.decay_type.replace('_', '-')}",
        f"{config.decay_granularity}-decay",
        "shared-decay" if config.share_decay else "separate-decay",
        f"position-{config.position_encoding}",
    ]


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def count_parameters(directory):
    """Number of stored parameters (tied weights once), read from the safetensors headers without loading tensors."""
    total = 0
    for path in Path(directory).glob("*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        total += sum(math.prod(entry["shape"]) for key, entry in header.items() if key != "__metadata__")
    return total or None


def _hub_id(name, bare=False):
    """`name` when it can be a Hub repo id (`org/name`, or a bare canonical name if `bare`) and is not a local path."""
    name = str(name or "")
    if not HUB_NAME.match(name) or os.path.exists(name) or ("/" not in name and not bare):
        return None
    return name


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def lm_eval_metrics(lm_eval):
    """The metrics of lm-eval's `results` dict ({task: {"metric,filter": value, ...}}) as rows (task, metric, filter,
    value, stderr, documents), sorted. Only "metric,filter" keys are metrics (lm-eval >= 0.4 names every metric so);
    the task's other fields — `alias`, `name`, `sample_len` (the number of documents evaluated, reported as
    `documents`) — are not, and "<metric>_stderr,filter" is the standard error of its metric (None where lm-eval
    gives "N/A"). Non-numeric or non-finite values are left out."""
    rows = []
    for task, fields in sorted((lm_eval or {}).items()):
        if not isinstance(fields, dict):
            continue
        documents = _number(fields.get("sample_len"))
        for key, value in sorted(fields.items()):
            metric, comma, filter_name = key.partition(",")
            if not comma or metric.endswith("_stderr") or _number(value) is None:
                continue
            stderr = _number(fields.get(f"{metric}_stderr,{filter_name}"))
            rows.append((task, metric, filter_name, float(value), stderr, documents))
    return rows


def _metric_label(metric, filter_name):
    return metric if filter_name in ("", "none") else f"{metric} ({filter_name})"


def _eval_results(lm_eval):
    """lm-eval's metrics (`lm_eval_metrics`) as Hub eval results."""
    return [EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task, metric_type=metric,
                       metric_name=_metric_label(metric, filter_name), metric_value=round(value, 6))
            for task, metric, filter_name, value, _, _ in lm_eval_metrics(lm_eval)]


def trainer_losses(directory):
    """(last logged training loss, mean training loss of the run, global step) from what transformers' Trainer saved
    in `directory`: `trainer_state.json`'s log_history holds one {"loss": ...} entry per logging step (the mean over
    that interval) and a last entry with "train_loss" (the mean over all steps of the run), which
    `train_results.json` / `all_results.json` hold too. None for what is not there."""
    directory = Path(directory)
    state = _read_json(directory / TRAINER_STATE_FILE) or {}
    history = [entry for entry in state.get("log_history") or [] if isinstance(entry, dict)]
    logged = [entry["loss"] for entry in history if _number(entry.get("loss")) is not None]
    means = [entry["train_loss"] for entry in history if _number(entry.get("train_loss")) is not None]
    for name in TRAINER_METRICS_FILES if not means else ():
        mean = _number((_read_json(directory / name) or {}).get("train_loss"))
        if mean is not None:
            means = [mean]
            break
    step = state.get("global_step") if _is_count(state.get("global_step")) else None
    return (logged[-1] if logged else None), (means[-1] if means else None), step


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def training_record(directory):
    """The training record of the checkpoint in `directory` (`linear_decay_training.json`), its final training loss
    completed from the Trainer's files where the record has none (`trainer_losses`): the last logged loss, else the
    run's mean loss — what a run gives whose `logging_steps` exceed its steps — marked as such. Without a record but
    with a Trainer state: the steps and that loss. None when neither exists."""
    directory = Path(directory)
    record = _read_json(directory / TRAINING_FILE)
    last_logged, run_mean, step = trainer_losses(directory)
    if record is None:
        if step is None and last_logged is None and run_mean is None:
            return None
        record = {"steps": step}
    record = dict(record)
    if _number(record.get("final_train_loss")) is None:
        if last_logged is not None:
            record["final_train_loss"] = last_logged
        elif run_mean is not None:
            record["final_train_loss"] = run_mean
            record["final_train_loss_note"] = "mean over the training run: no loss was logged at a finer interval"
    return record


def _design_rows(config):
    spec = DECAY_REGISTRY[config.decay_type]
    formula = (spec.module.__doc__ or "").strip().splitlines()[0]
    granularity = ("one λ per key channel (vector)" if config.decay_granularity == "vector"
                   else "one λ per head (scalar)")
    sharing = ("keys derived from the decay (no separate key projection, DESIGN §3)" if config.share_decay
               else "separate key and decay projections")
    rows = [
        ("`decay_type`", f"`{config.decay_type}`", formula),
        ("`decay_granularity`", f"`{config.decay_granularity}`", granularity),
        ("`share_decay`", f"`{config.share_decay}`", sharing),
        ("`position_encoding`", f"`{config.position_encoding}`", POSITION_MEANING[config.position_encoding]),
    ]
    if config.decay_type == "simple":
        rows.append(("`simple_decay_init`", f"`{config.simple_decay_init}`", "p: λ starts near p (SD-p)"))
    if config.decay_type == "gla":
        rows.append(("`gla_denominator`", f"`{config.gla_denominator}`", "log λ = logsigmoid(z / denominator)"))
    if config.decay_type == "hgrn2":
        rows.append(("`hgrn2_lower_bound`", f"`{config.hgrn2_lower_bound}`", "learned per-layer lower bound γ_l"))
    return "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)


def _architecture_rows(config, num_parameters):
    rows = [
        ("parameters", f"{num_parameters / 1e6:.2f}M" if num_parameters else "unknown"),
        ("layers × hidden size", f"{config.num_hidden_layers} × {config.hidden_size}"),
        ("heads × head dim", f"{config.num_heads} × {config.head_dim}"),
        ("SwiGLU hidden size", str(config.intermediate_size)),
        ("vocabulary", str(config.vocab_size)),
        ("output gate", "sigmoid low-rank gate before RMSNorm" if config.use_output_gate else "none"),
        ("tied embeddings", str(config.tie_word_embeddings)),
    ]
    return "\n".join(f"| {a} | {b} |" for a, b in rows)


def _training_section(training, base_model):
    if not training:
        lines = ["No training record was saved with this checkpoint (it was not written by `examples/run_clm.py`)."]
        if base_model:
            lines.append(f"\nIt derives from `{base_model}`.")
        return "".join(lines)
    labels = [
        ("base_model", "fine-tuned from"), ("datasets", "Hub datasets"), ("data_files", "data files"),
        ("data", "training data"), ("train_tokens", "training tokens"),
        ("steps", "optimizer steps"), ("global_batch_size", "global batch (sequences)"),
        ("sequence_length", "sequence length"), ("learning_rate", "peak learning rate"),
        ("lr_scheduler", "schedule"), ("optimizer", "optimizer"), ("precision", "precision"),
        ("final_train_loss", "final training loss"), ("eval_loss", "eval loss"),
        ("eval_perplexity", "eval perplexity"), ("eval_accuracy", "eval accuracy"), ("hardware", "hardware"),
        ("command", "command"),
    ]
    lines = []
    for key, label in labels:
        value = training.get(key)
        if value is None or value == []:
            continue
        if isinstance(value, list):
            value = ", ".join(map(str, value))
        elif isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, int):
            value = f"{value:,}"
        note = training.get(f"{key}_note")
        lines.append(f"- {label}: `{value}`" if key == "command" else
                     f"- {label}: {value}" + (f" ({note})" if isinstance(note, str) and note else ""))
    return "\n".join(lines)


def _evaluation_section(metrics):
    if not metrics:
        return ("No evaluation results were saved with this checkpoint; `python examples/evaluate.py CHECKPOINT "
                "--write_to_checkpoint` runs lm-evaluation-harness and records them here.")
    rows = [f"| {task} | {_metric_label(metric, filter_name)} | {value:.4f} | "
            f"{'—' if stderr is None else f'{stderr:.4f}'} | {'—' if documents is None else f'{documents:,}'} |"
            for task, metric, filter_name, value, stderr, documents in metrics]
    return ("lm-evaluation-harness:\n\n| task | metric | value | stderr | documents |\n|---|---|---|---|---|\n"
            + "\n".join(rows))


def render_model_card(config, *, repo_id=None, model_name=None, base_model=None, training=None, lm_eval=None,
                      num_parameters=None, tags=(), license="apache-2.0"):
    """The card's text (YAML metadata + body) from a config and optional training / evaluation records."""
    training = dict(training or {})
    base_model = base_model or training.get("base_model")
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else "linear-decay model")
    eval_results = _eval_results(lm_eval)
    datasets = [name for name in map(lambda d: _hub_id(d, bare=True), training.get("datasets", [])) if name]
    metadata = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license=training.get("license", license),
        tags=list(dict.fromkeys([*hub_tags(config), *tags])),
        datasets=datasets or None,
        base_model=_hub_id(base_model),
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )
    text = TEMPLATE.read_text(encoding="utf-8").format(
        metadata=metadata.to_yaml(),
        model_name=model_name,
        repo_id=repo_id or f"your-namespace/{model_name}",
        design_rows=_design_rows(config),
        architecture_rows=_architecture_rows(config, num_parameters),
        training=_training_section(training, base_model),
        evaluation=_evaluation_section(lm_eval_metrics(lm_eval)),
    )
    return text.rstrip() + "\n\n" + GENERATED_MARKER + "\n"


def render_model_card_for_directory(directory, config=None, *, repo_id=None, base_model=None, tags=()):
    """The card of the checkpoint saved in `directory` (config, weights and the training / eval records there)."""
    directory = Path(directory)
    config = config if config is not None else LinearDecayConfig.from_pretrained(directory)
    return render_model_card(
        config,
        repo_id=repo_id,
        model_name=repo_id.split("/")[-1] if repo_id else directory.resolve().name,
        base_model=base_model,
        training=training_record(directory),
        lm_eval=_read_json(directory / LM_EVAL_FILE),
        num_parameters=count_parameters(directory),
        tags=tags,
    )


def is_generated(readme):
    """Whether README.md at `readme` is absent or was written by this module (so it may be rewritten)."""
    readme = Path(readme)
    return not readme.exists() or GENERATED_MARKER in readme.read_text(encoding="utf-8")


def write_model_card(directory, config=None, *, repo_id=None, base_model=None, tags=(), overwrite=False):
    """Write (or refresh) `directory/README.md`; returns its path, or None when a hand-written README.md is there
    and `overwrite` is False."""
    readme = Path(directory) / "README.md"
    if not overwrite and not is_generated(readme):
        return None
    text = render_model_card_for_directory(directory, config, repo_id=repo_id, base_model=base_model, tags=tags)
    readme.write_text(text, encoding="utf-8")
    return readme
