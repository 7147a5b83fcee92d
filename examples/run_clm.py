"""Train a linear-decay causal LM with the Hugging Face `Trainer`: pretraining from a preset (with any config
override) or fine-tuning a checkpoint, on local text/json/parquet files, a Hub dataset, or the bundled corpus.

Every `TrainingArguments` flag works (bf16, gradient accumulation, checkpoints, --resume_from_checkpoint, eval, logging,
--push_to_hub). Texts are tokenized, an EOS appended to each document, and packed into fixed-length blocks.

    # pretrain the tiny preset on the bundled Shakespeare corpus (offline default)
    python examples/run_clm.py --output_dir outputs/tiny-gla --do_train --do_eval --max_steps 200 \\
        --config_overrides decay_type=gla,decay_granularity=scalar

    # a paper size on local files, streamed
    python examples/run_clm.py --preset 160m --train_file data/*.jsonl --streaming --max_steps 20000 \\
        --block_size 2048 --per_device_train_batch_size 16 --bf16 --do_train --output_dir outputs/160m

    # fine-tune a checkpoint; continue an interrupted run
    python examples/run_clm.py --model_name_or_path outputs/tiny-gla --train_file my.txt --do_train ...
    python examples/run_clm.py ... --resume_from_checkpoint last

After training the output directory holds model, tokenizer, generation config, code, `linear_decay_training.json`
and a model card (README.md) that records how the model was trained.

Defaults that differ from the Trainer's, used only for flags the command line (or JSON file) does not give:

    pretraining from --preset (DESIGN §6's optimizer, the schedule of the quickstart and the sweeps):
      --learning_rate      3e-3 (tiny), 6e-4 (160m), 3e-4 (410m), 2e-4 (1.45b)
      --lr_scheduler_type  cosine
      --weight_decay       0.1
      --adam_beta2         0.95
    pretraining and fine-tuning (fine-tuning keeps the Trainer's learning rate 5e-5, linear schedule, no weight decay):
      --warmup_steps       5 % of --max_steps, rounded down (no warm-up under 20 steps); 0.05 (a ratio) without it
      --logging_steps      --max_steps // 20, at least 1; 0.05 (a ratio) without --max_steps
      --logging_first_step true (the first loss is printed at once)

An --output_dir that is not empty is refused unless --resume_from_checkpoint or --overwrite_output_dir is given.
--resume_from_checkpoint last takes the newest complete checkpoint-N of --output_dir (trainer_state.json, model
weights, optimizer, scheduler and RNG state all present and readable), says which ones it skipped and why, and
deletes the skipped ones (the resumed run writes them again); with none complete it trains from scratch when the
folder holds nothing else, and stops otherwise.
"""

import argparse
import ast
import dataclasses
import glob
import importlib
import json
import math
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

import linear_decay
from linear_decay import PRESETS, LinearDecayConfig, LinearDecayForCausalLM
from local_paths import missing_local_folder  # examples/local_paths.py
from linear_decay.model_card import TRAINING_FILE, write_model_card

PACKAGE_DIR = Path(linear_decay.__file__).resolve().parent
BUNDLED_CORPUS = PACKAGE_DIR / "data" / "corpus.txt"
BUNDLED_TOKENIZER = PACKAGE_DIR / "data" / "tokenizer"
BUNDLED_SEPARATOR = "\n\n\n"  # the bundled corpus separates its works by two blank lines
FILE_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
DEFAULT_PRESET = "tiny"

# Defaults for flags the command line does not give (see the module docstring, printed by --help).
PRETRAINING_LEARNING_RATES = {"tiny": 3e-3, "160m": 6e-4, "410m": 3e-4, "1.45b": 2e-4}
PRETRAINING_OPTIMIZER = {"lr_scheduler_type": "cosine", "weight_decay": 0.1, "adam_beta2": 0.95}
WARMUP_FRACTION = 0.05
LOGGING_INTERVALS = 20  # loss lines per run

CHECKPOINT_FOLDER = re.compile(r"^checkpoint-(\d+)$")
# what an earlier run leaves in its output folder that a new run into it would not rewrite or would merge with
EARLIER_RUN_FILES = ("trainer_state.json", "all_results.json", "train_results.json", "eval_results.json",
                     "lm_eval_results.json", TRAINING_FILE)


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported as one line, without a traceback."""


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Checkpoint (local or Hub) to fine-tune. Omit to pretrain from --preset."})
    preset: str | None = field(
        default=None, metadata={"help": f"Size to pretrain from scratch: {', '.join(PRESETS)}. Not with "
                                        "--model_name_or_path."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "Config fields for pretraining, e.g. 'decay_type=gla,decay_granularity=scalar'."})
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer; default: the checkpoint's, or the bundled 8192-token BPE."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Load a checkpoint's own code (auto_map)."})
    autograd_multithreading: bool = field(
        default=False, metadata={"help": "Run the backward on autograd's per-device threads (PyTorch's default) "
                                         "instead of the calling thread (slower eager GPU steps: the hand-off "
                                         "to that thread adds host time)."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A dataset on the Hub (datasets.load_dataset)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    train_file: list[str] | None = field(
        default=None, metadata={"help": "Local .txt/.json/.jsonl/.parquet file(s) or glob(s). Default: bundled corpus."})
    validation_file: list[str] | None = field(default=None, metadata={"help": "Local validation file(s)."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text (json/parquet/Hub)."})
    document_separator: str | None = field(
        default=None, metadata={"help": "Split .txt files into documents at this string (e.g. '\\n\\n\\n'); "
                                        "default: one document per file."})
    block_size: int = field(default=256, metadata={"help": "Tokens per packed training sequence."})
    document_boundaries: bool = field(
        default=False, metadata={"help": "Blocks carry position_ids that restart after every EOS, so every document "
                                         "starts from a zero state (transformers' DataCollatorWithFlattening "
                                         "convention; the kernels run the documents as packed sequences) and the "
                                         "first token of a document is not a training target."})
    validation_split_percentage: float = field(
        default=2.0, metadata={"help": "Without a validation set: the last %% of packed blocks are held out."})
    streaming: bool = field(default=False, metadata={"help": "Stream the data (IterableDataset); needs --max_steps."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    packing_batch_rows: int = field(
        default=1000, metadata={"help": "Rows tokenized and packed together; a partial last block of each group is "
                                        "dropped."})


@dataclass
class OutputArguments:
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Train into an --output_dir that is not empty, starting from scratch: its "
                                         "checkpoint-* folders and the earlier run's records (trainer_state.json, "
                                         "*_results.json, lm_eval_results.json, linear_decay_training.json) are "
                                         "deleted first, the rest is overwritten. Without it such a folder is "
                                         "refused unless --resume_from_checkpoint is given."})


# TrainingArguments of transformers 5 has no overwrite flag; an installed version that has one keeps its own.
OWN_OVERWRITE_FLAG = "overwrite_output_dir" not in {f.name for f in dataclasses.fields(TrainingArguments)}


def parse_overrides(text):
    """'a=1,b=gla' -> {'a': 1, 'b': 'gla'} (values parsed as Python literals where they are one)."""
    overrides = {}
    for pair in filter(None, (p.strip() for p in (text or "").split(","))):
        if "=" not in pair:
            raise UsageError(f"--config_overrides expects FIELD=VALUE pairs separated by commas, got {pair!r}")
        key, value = (s.strip() for s in pair.split("=", 1))
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return overrides


def expand_files(patterns, flag):
    files = []
    for pattern in patterns or []:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise UsageError(f"{flag} {pattern}: no such file")
        files.extend(matches)
    builders = {FILE_BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if None in builders:
        raise UsageError(f"{flag}: unsupported file type in {files}; use {', '.join(sorted(FILE_BUILDERS))}")
    if len(builders) > 1:
        raise UsageError(f"{flag}: mix of file types {sorted(builders)}; use one")
    return files, builders.pop() if builders else None


def load_raw_datasets(args: DataArguments):
    """{'train': rows, 'validation': rows or None}: rows have a `text` column. Streaming gives IterableDatasets."""
    from datasets import load_dataset

    if args.dataset_name:
        raw = load_dataset(args.dataset_name, args.dataset_config_name, streaming=args.streaming)
        splits = {"train": raw["train"], "validation": raw["validation"] if "validation" in raw else None}
        separator = args.document_separator
    else:
        train_files, builder = expand_files(args.train_file, "--train_file")
        validation_files, validation_builder = expand_files(args.validation_file, "--validation_file")
        separator = args.document_separator
        if not train_files:
            train_files, builder, separator = [str(BUNDLED_CORPUS)], "text", separator or BUNDLED_SEPARATOR
        if validation_files and validation_builder != builder:
            raise UsageError("--train_file and --validation_file must be the same file type")
        options = {"sample_by": "document"} if builder == "text" else {}
        data_files = {"train": train_files, **({"validation": validation_files} if validation_files else {})}
        raw = load_dataset(builder, data_files=data_files, streaming=args.streaming, **options)
        splits = {"train": raw["train"], "validation": raw.get("validation")}
    for name, rows in list(splits.items()):
        if rows is None:
            continue
        columns = list(rows.column_names or next(iter(rows), {}).keys())  # a stream may not declare its columns
        if args.text_column not in columns:
            raise UsageError(f"the {name} data has no column {args.text_column!r} (columns: {columns}); "
                             "pick one with --text_column")
        if columns != ["text"] or separator:
            splits[name] = rows.map(split_documents, batched=True, remove_columns=columns,
                                    fn_kwargs={"column": args.text_column, "separator": separator})
    return splits


def split_documents(batch, column, separator):
    texts = batch[column]
    if separator:
        texts = [part for text in texts for part in text.split(separator)]
    return {"text": [t for t in texts if t.strip()]}


def tokenize_and_pack(rows, tokenizer, args: DataArguments):
    """Tokenize each document, append EOS, and cut the concatenation into blocks of `block_size` (labels = inputs).
    With --document_boundaries also position_ids (restarting at every document) and labels -100 at each document's
    first token (it would be predicted from the previous document)."""
    eos = tokenizer.eos_token_id
    block = args.block_size
    if args.document_boundaries and eos is None:
        raise UsageError("--document_boundaries needs a tokenizer with an EOS token to separate documents")

    def pack(batch):
        encoded = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        stream = list(chain.from_iterable(ids + [eos] if eos is not None else ids for ids in encoded))
        usable = len(stream) // block * block
        blocks = [stream[i: i + block] for i in range(0, usable, block)]
        if not args.document_boundaries:
            return {"input_ids": blocks, "labels": [list(b) for b in blocks]}
        positions = list(chain.from_iterable(range(len(ids) + 1) for ids in encoded))
        position_blocks = [positions[i: i + block] for i in range(0, usable, block)]
        labels = [[-100 if p == 0 else t for t, p in zip(b, ps)] for b, ps in zip(blocks, position_blocks)]
        return {"input_ids": blocks, "labels": labels, "position_ids": position_blocks}

    options = {} if args.streaming else {"num_proc": args.preprocessing_num_workers, "desc": "tokenize and pack"}
    return rows.map(pack, batched=True, batch_size=args.packing_batch_rows, remove_columns=["text"], **options)


def build_datasets(data_args: DataArguments, tokenizer):
    """(train, eval) packed datasets. Without a validation set, the tail of the packed blocks is held out (not
    possible when streaming: give --validation_file, or evaluate without a held-out set)."""
    raw = load_raw_datasets(data_args)
    train = tokenize_and_pack(raw["train"], tokenizer, data_args)
    if raw["validation"] is not None:
        return train, tokenize_and_pack(raw["validation"], tokenizer, data_args)
    if data_args.streaming or data_args.validation_split_percentage <= 0:
        return train, None
    if len(train) < 2:
        raise UsageError(f"the training data gives {len(train)} block(s) of {data_args.block_size} tokens; "
                         "need more data or a smaller --block_size")
    held_out = max(1, int(len(train) * data_args.validation_split_percentage / 100))
    return train.select(range(len(train) - held_out)), train.select(range(len(train) - held_out, len(train)))


def build_model(model_args: ModelArguments, tokenizer):
    if model_args.model_name_or_path:
        if model_args.config_overrides:
            raise UsageError("--config_overrides applies to pretraining from --preset; a checkpoint's architecture "
                             "is fixed by its weights")
        try:
            return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path,
                                                        trust_remote_code=model_args.trust_remote_code)
        except (OSError, ValueError) as error:
            raise UsageError(f"cannot load --model_name_or_path {model_args.model_name_or_path}: {error}") from None
    overrides = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                 "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                 **parse_overrides(model_args.config_overrides)}
    try:
        config = LinearDecayConfig.from_preset(model_args.preset or DEFAULT_PRESET, **overrides)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if config.vocab_size < len(tokenizer):
        raise UsageError(f"vocab_size={config.vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    return LinearDecayForCausalLM(config)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: which are complete, which one `last` is, and what an output folder may be reused for
# ---------------------------------------------------------------------------------------------------------------


def checkpoint_folders(output_dir):
    """The checkpoint-N folders of `output_dir`, newest (highest N) first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(match.group(1)), Path(output_dir) / entry.name) for entry in os.scandir(output_dir)
             if entry.is_dir() and (match := CHECKPOINT_FOLDER.match(entry.name))]
    return [path for _, path in sorted(found, reverse=True)]


def _torch_file_problem(path):
    """None when torch.load reads `path` (as the Trainer does: weights only, tensors memory-mapped rather than
    read), else why not. A file cut short loses the archive's directory, which sits at its end."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    # numpy's RNG state in rng_state.pth: the types the Trainer itself allows when it loads that file
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(allowed):
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap can only be used" not in str(error):
                    raise
                torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except Exception as error:  # noqa: BLE001 — any failure to read makes the checkpoint unusable
        reason = str(error).strip().split("\n")[0][:120] or type(error).__name__
        return f"{path.name} cannot be read ({reason})"
    return None


def _safetensors_problem(path):
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as error:  # noqa: BLE001
        return f"{path.name} cannot be read ({str(error).strip()[:120]})"
    return None


def _sharded_state_problem(folder, what):
    """torch.distributed.checkpoint folders (FSDP sharded state): their .metadata is written once every shard is."""
    return None if (folder / ".metadata").is_file() else f"{folder.name} ({what}) has no .metadata"


def checkpoint_problems(folder):
    """Why the Trainer checkpoint `folder` cannot be resumed from ([] when it is complete): trainer_state.json,
    model weights, optimizer state, scheduler state and RNG state must all be there and readable. Weights are
    model.safetensors (or its shards), pytorch_model.bin or FSDP's sharded pytorch_model_fsdp_*; optimizer state is
    optimizer.pt, optimizer.bin or FSDP's optimizer_*; a DeepSpeed checkpoint (its `latest` file) holds both."""
    folder = Path(folder)
    problems = []
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
        if not isinstance(state.get("global_step"), int):
            problems.append("trainer_state.json has no global_step")
    except FileNotFoundError:
        problems.append("no trainer_state.json")
    except (OSError, ValueError) as error:
        problems.append(f"trainer_state.json cannot be read ({str(error)[:80]})")

    deepspeed = (folder / "latest").is_file() and (folder / (folder / "latest").read_text().strip()).is_dir()
    weights = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    fsdp_models = sorted(folder.glob("pytorch_model_fsdp*"))
    if weights.is_file():
        problems += filter(None, [_safetensors_problem(weights)])
    elif index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as error:
            problems.append(f"{index.name} cannot be read ({str(error)[:80]})")
        else:
            for shard in shards:
                problem = (_safetensors_problem(folder / shard) if (folder / shard).is_file()
                           else f"no {shard} (listed in {index.name})")
                problems += filter(None, [problem])
    elif (folder / "pytorch_model.bin").is_file():
        problems += filter(None, [_torch_file_problem(folder / "pytorch_model.bin")])
    elif fsdp_models:
        for path in fsdp_models:
            problems += filter(None, [_sharded_state_problem(path, "sharded weights") if path.is_dir()
                                      else _torch_file_problem(path)])
    elif not deepspeed:
        problems.append("no model weights")

    optimizer_shards = [p for p in folder.glob("optimizer_*") if p.is_dir()]
    if (folder / "optimizer.pt").is_file():
        problems += filter(None, [_torch_file_problem(folder / "optimizer.pt")])
    elif (folder / "optimizer.bin").is_file():
        problems += filter(None, [_torch_file_problem(folder / "optimizer.bin")])
    elif optimizer_shards:
        problems += filter(None, [_sharded_state_problem(p, "sharded optimizer state") for p in optimizer_shards])
    elif not deepspeed:
        problems.append("no optimizer.pt")

    if (folder / "scheduler.pt").is_file():
        problems += filter(None, [_torch_file_problem(folder / "scheduler.pt")])
    elif not deepspeed:
        problems.append("no scheduler.pt")

    rng_states = sorted(folder.glob("rng_state*.pth"))
    if not rng_states:
        problems.append("no rng_state.pth")
    problems += filter(None, map(_torch_file_problem, rng_states))
    return problems


def _names(paths, shown=5):
    names = [Path(p).name for p in paths]
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _remove(paths, say, why):
    paths = [Path(p) for p in paths]
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()
    if paths:
        say(f"removed {_names(paths)} from {paths[0].parent} ({why})")


def prepare_output_dir(training_args, overwrite, say=print):
    """The checkpoint to resume from (None: train from scratch), after checking that --output_dir may be written.

    - No --resume_from_checkpoint: the folder must be absent or empty, unless `overwrite` (the earlier run's
      checkpoints and records are deleted).
    - A checkpoint folder: it must be complete.
    - `last`: the newest complete checkpoint-N; newer incomplete ones are reported and deleted. None complete: train
      from scratch if the folder holds nothing but incomplete checkpoints (deleted) or `overwrite`, else stop.
    Only the main process (`say` prints) deletes anything; every process comes to the same answer.
    """
    output_dir = Path(training_args.output_dir)
    main_process = training_args.process_index == 0
    say = say if main_process else (lambda *_: None)
    remove = _remove if main_process else (lambda *_: None)
    resume = training_args.resume_from_checkpoint
    entries = sorted(output_dir.iterdir()) if output_dir.is_dir() else []

    if resume and resume != "last":
        if not os.path.isdir(os.path.expanduser(resume)):
            raise UsageError(f"--resume_from_checkpoint: no such folder: {resume}")
        problems = checkpoint_problems(os.path.expanduser(resume))
        if problems:
            raise UsageError(f"--resume_from_checkpoint {resume} is not a complete checkpoint: {'; '.join(problems)}")
        return os.path.expanduser(resume)

    if resume == "last":
        skipped = []
        for folder in checkpoint_folders(output_dir):
            problems = checkpoint_problems(folder)
            if not problems:
                for path, why in skipped:
                    say(f"--resume_from_checkpoint last: skipping {path}, incomplete: {why}")
                say(f"--resume_from_checkpoint last: resuming from {folder} (the newest complete checkpoint)")
                remove([path for path, _ in skipped], say, "incomplete, written again by the resumed run")
                return str(folder)
            skipped.append((folder, "; ".join(problems)))
        for path, why in skipped:
            say(f"--resume_from_checkpoint last: skipping {path}, incomplete: {why}")
        others = [p for p in entries if p not in {path for path, _ in skipped}]
        if others and not overwrite:
            raise UsageError(f"--resume_from_checkpoint last: no complete checkpoint in {output_dir}, which holds "
                             f"{_names(others)}; pass --overwrite_output_dir to train from scratch into it")
        say(f"--resume_from_checkpoint last: no complete checkpoint in {output_dir}: training from scratch")
        remove([path for path, _ in skipped], say, "incomplete checkpoints")
        entries = others

    if entries:
        if not overwrite:
            raise UsageError(f"--output_dir {output_dir} is not empty (it holds {_names(entries)}): pass "
                             "--overwrite_output_dir to train into it from scratch, or --resume_from_checkpoint last "
                             "to continue its run")
        remove([p for p in entries if p.name in EARLIER_RUN_FILES or (p.is_dir() and CHECKPOINT_FOLDER.match(p.name))],
               say, "--overwrite_output_dir: left by an earlier run")
    return None


class LinearDecayTrainer(Trainer):
    """`Trainer` whose model card (written for --push_to_hub) is this family's card, with the training record."""

    def create_model_card(self, *args, **kwargs):
        if self.is_world_process_zero():
            write_model_card(self.args.output_dir, self.model.config, repo_id=getattr(self, "hub_model_id", None),
                             tags=[t for t in [kwargs.get("tags")] if isinstance(t, str)])


def training_record(model_args, data_args, training_args, trainer, metrics):
    """What the model card says about training (linear_decay_training.json)."""
    world = training_args.world_size
    global_batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * world
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if data_args.dataset_name:
        data_files = []
    else:
        data_files = [os.path.relpath(f) if not str(f).startswith(str(PACKAGE_DIR)) else
                      "bundled Shakespeare corpus (linear_decay/data/corpus.txt, public domain)"
                      for f in (data_args.train_file or [str(BUNDLED_CORPUS)])]
    precision = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not training_args.use_cpu else "CPU"
    return {
        "base_model": model_args.model_name_or_path,
        "datasets": [data_args.dataset_name] if data_args.dataset_name else [],
        "data_files": data_files,
        "steps": trainer.state.global_step,
        "global_batch_size": global_batch,
        "sequence_length": data_args.block_size,
        "document_boundaries": data_args.document_boundaries,
        "train_tokens": trainer.state.global_step * global_batch * data_args.block_size,
        "learning_rate": training_args.learning_rate,
        "warmup_steps": training_args.get_warmup_steps(trainer.state.max_steps) if trainer.state.max_steps else 0,
        "lr_scheduler": str(getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)),
        "optimizer": f"{getattr(training_args.optim, 'value', training_args.optim)} (betas {training_args.adam_beta1}, "
                     f"{training_args.adam_beta2}), weight decay {training_args.weight_decay}",
        "precision": precision,
        "final_train_loss": losses[-1] if losses else None,
        "eval_loss": metrics.get("eval_loss"),
        "eval_perplexity": metrics.get("perplexity"),
        "hardware": f"{world} × {device}",
        "command": " ".join(["python", *map(shlex.quote, sys.argv)]),
        "versions": {"linear_decay": linear_decay.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
    }


def run(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments,
        output_args: OutputArguments | None = None):
    if not (training_args.do_train or training_args.do_eval):
        raise UsageError("nothing to do: pass --do_train and/or --do_eval")
    if model_args.model_name_or_path and model_args.preset:
        raise UsageError("--preset is for pretraining from scratch; with --model_name_or_path the checkpoint fixes "
                         "the size: pass one of them")
    if data_args.streaming and training_args.do_train and training_args.max_steps <= 0:
        raise UsageError("--streaming needs --max_steps (a stream has no length to count epochs in)")
    if data_args.block_size < 2:
        raise UsageError("--block_size must be at least 2")
    for flag, path in (("--model_name_or_path", model_args.model_name_or_path),
                       ("--tokenizer_name", model_args.tokenizer_name)):
        if path and missing_local_folder(path):
            raise UsageError(f"{flag}: no such folder: {path}")
    try:
        importlib.import_module("datasets")
    except ImportError as error:
        raise UsageError(f"reading the training data needs the `datasets` library ({error}): pip install "
                         "'datasets>=3' (or install this package with its examples extra: pip install -e "
                         "'.[examples]')") from None
    overwrite = getattr(output_args or training_args, "overwrite_output_dir", False)
    resume = prepare_output_dir(training_args, overwrite) if training_args.do_train else None

    set_seed(training_args.seed)
    tokenizer_name = model_args.tokenizer_name or model_args.model_name_or_path or str(BUNDLED_TOKENIZER)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name, trust_remote_code=model_args.trust_remote_code)
    except OSError as error:
        raise UsageError(f"cannot load the tokenizer {tokenizer_name}: {error}") from None
    model = build_model(model_args, tokenizer)
    train_set, eval_set = build_datasets(data_args, tokenizer)
    if training_args.do_eval and eval_set is None:
        raise UsageError("--do_eval needs held-out data: --validation_file, a dataset with a validation split, or "
                         "(not streaming) --validation_split_percentage > 0")
    n_params = sum(p.numel() for p in model.parameters())
    c = model.config
    print(f"model: {n_params / 1e6:.2f}M parameters, decay_type={c.decay_type} granularity={c.decay_granularity} "
          f"share={c.share_decay} position={c.position_encoding}")

    trainer = LinearDecayTrainer(model=model, args=training_args, data_collator=default_data_collator,
                                 train_dataset=train_set if training_args.do_train else None,
                                 eval_dataset=eval_set if training_args.do_eval else None,
                                 processing_class=tokenizer)
    metrics = {}
    if training_args.do_train:
        # thread-local, for this (the Trainer's) thread, restored after training
        with torch.autograd.set_multithreading_enabled(model_args.autograd_multithreading):
            result = trainer.train(resume_from_checkpoint=resume)
        metrics.update(result.metrics)
        model.config.use_cache = True  # Trainer switches it off for training; decoding wants the recurrent cache
        model.generation_config.use_cache = True
        if trainer.is_fsdp_enabled:  # checkpoints may be sharded; the final model is gathered so from_pretrained loads it
            trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        eval_metrics["perplexity"] = math.exp(min(eval_metrics["eval_loss"], 50.0))
        metrics.update(eval_metrics)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    if training_args.do_train and trainer.is_world_process_zero():
        record = training_record(model_args, data_args, training_args, trainer, metrics)
        with open(Path(training_args.output_dir) / TRAINING_FILE, "w") as f:
            json.dump(record, f, indent=2)
        write_model_card(training_args.output_dir, model.config, base_model=model_args.model_name_or_path)
        if training_args.push_to_hub:
            trainer.push_to_hub()
    return metrics


def given_flags(parser, argv):
    """The dests of the options that `argv` sets (in any spelling argparse accepts: --flag=v, --flag v, --flag-v,
    an abbreviation, --no_flag)."""
    unset = object()
    namespace = argparse.Namespace(**{action.dest: unset for action in parser._actions
                                      if action.dest != argparse.SUPPRESS})
    parser.parse_known_args(args=argv, namespace=namespace)
    return {dest for dest, value in vars(namespace).items() if value is not unset}


def default_training_values(given, model_args, training_args):
    """{TrainingArguments field: value} for the run_clm.py defaults (module docstring) of the fields not given."""
    values = {}
    steps = training_args.max_steps
    if "warmup_steps" not in given:
        values["warmup_steps"] = int(steps * WARMUP_FRACTION) if steps > 0 else WARMUP_FRACTION
    if "logging_steps" not in given:
        values["logging_steps"] = max(1, steps // LOGGING_INTERVALS) if steps > 0 else 1 / LOGGING_INTERVALS
    if "logging_first_step" not in given:
        values["logging_first_step"] = True
    if not model_args.model_name_or_path:
        preset = model_args.preset or DEFAULT_PRESET
        if "learning_rate" not in given and preset in PRETRAINING_LEARNING_RATES:
            values["learning_rate"] = PRETRAINING_LEARNING_RATES[preset]
        values.update({name: value for name, value in PRETRAINING_OPTIMIZER.items() if name not in given})
    return values


def make_parser():
    classes = (ModelArguments, DataArguments, TrainingArguments) + ((OutputArguments,) if OWN_OVERWRITE_FLAG else ())

    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    parser = HfArgumentParser(classes, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                              formatter_class=Formatter)
    # the Trainer's own default is only a fallback here: say what run_clm.py uses (%(default).0s keeps the help
    # formatter from appending "(default: ...)")
    notes = {
        "preset": "Default: tiny (pretraining).",
        "learning_rate": "run_clm.py default: 3e-3 pretraining tiny, 6e-4 / 3e-4 / 2e-4 pretraining 160m / 410m / "
                         "1.45b, the Trainer's %(default)s fine-tuning.",
        "lr_scheduler_type": "run_clm.py default: cosine pretraining, the Trainer's %(default)s fine-tuning.",
        "weight_decay": "run_clm.py default: 0.1 pretraining, the Trainer's %(default)s fine-tuning.",
        "adam_beta2": "run_clm.py default: 0.95 pretraining, the Trainer's %(default)s fine-tuning.",
        "warmup_steps": "run_clm.py default: 5%% of --max_steps, rounded down (0.05, a ratio, without --max_steps).",
        "logging_steps": "run_clm.py default: --max_steps // 20, at least 1 (0.05, a ratio, without --max_steps).",
        "logging_first_step": "run_clm.py default: true.",
    }
    for action in parser._actions:
        if action.dest in notes and action.option_strings and not action.option_strings[0].startswith("--no"):
            action.help = f"{action.help or ''} {notes[action.dest]}%(default).0s"
    return parser


def parse_command_line(argv=None):
    """(model, data, training, output arguments) from `argv` (default: the command line, or the one .json file it
    names), with the run_clm.py defaults for what it does not give."""
    parser = make_parser()
    json_file = argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json")
    if json_file:
        values = json.loads(Path(sys.argv[1]).read_text())
        parsed = parser.parse_dict(values)
        given = set(values)
    else:
        argv = list(sys.argv[1:] if argv is None else argv)
        parsed = parser.parse_args_into_dataclasses(args=argv)
        given = given_flags(parser, argv)
    defaults = default_training_values(given, parsed[0], parsed[2])
    if defaults:
        if json_file:
            parsed = parser.parse_dict({**values, **defaults})
        else:
            extra = [f"--{name}={value}" for name, value in defaults.items()]
            parsed = parser.parse_args_into_dataclasses(args=argv + extra)
    model_args, data_args, training_args, *rest = parsed
    return model_args, data_args, training_args, (rest[0] if rest else None)


def main(argv=None):
    model_args, data_args, training_args, output_args = parse_command_line(argv)
    try:
        return run(model_args, data_args, training_args, output_args)
    except UsageError as error:
        sys.exit(f"run_clm.py: error: {error}")


if __name__ == "__main__":
    main()
