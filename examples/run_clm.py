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
"""

import ast
import glob
import json
import math
import os
import shlex
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
from transformers.trainer_utils import get_last_checkpoint

import linear_decay
from linear_decay import PRESETS, LinearDecayConfig, LinearDecayForCausalLM
from linear_decay.model_card import TRAINING_FILE, write_model_card

PACKAGE_DIR = Path(linear_decay.__file__).resolve().parent
BUNDLED_CORPUS = PACKAGE_DIR / "data" / "corpus.txt"
BUNDLED_TOKENIZER = PACKAGE_DIR / "data" / "tokenizer"
BUNDLED_SEPARATOR = "\n\n\n"  # the bundled corpus separates its works by two blank lines
FILE_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported as one line, without a traceback."""


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Checkpoint (local or Hub) to fine-tune. Omit to pretrain from --preset."})
    preset: str = field(default="tiny", metadata={"help": f"Size to pretrain from scratch: {', '.join(PRESETS)}."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "Config fields for pretraining, e.g. 'decay_type=gla,decay_granularity=scalar'."})
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer; default: the checkpoint's, or the bundled 8192-token BPE."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Load a checkpoint's own code (auto_map)."})
    autograd_multithreading: bool = field(
        default=False, metadata={"help": "Run the backward on autograd's per-device threads (PyTorch's default) "
                                         "instead of the calling thread, which makes eager GPU steps faster "
                                         "(BENCHMARKS.md, seventh session)."})


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
        config = LinearDecayConfig.from_preset(model_args.preset, **overrides)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if config.vocab_size < len(tokenizer):
        raise UsageError(f"vocab_size={config.vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    return LinearDecayForCausalLM(config)


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


def run(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments):
    if not (training_args.do_train or training_args.do_eval):
        raise UsageError("nothing to do: pass --do_train and/or --do_eval")
    if data_args.streaming and training_args.do_train and training_args.max_steps <= 0:
        raise UsageError("--streaming needs --max_steps (a stream has no length to count epochs in)")
    if data_args.block_size < 2:
        raise UsageError("--block_size must be at least 2")
    for flag, path in (("--model_name_or_path", model_args.model_name_or_path),
                       ("--tokenizer_name", model_args.tokenizer_name)):
        looks_local = path and (path.startswith((".", "/", "~")) or path.count("/") > 1)  # not a Hub repo id
        if looks_local and not os.path.isdir(os.path.expanduser(path)):
            raise UsageError(f"{flag} {path}: no such directory")
    resume = training_args.resume_from_checkpoint
    if resume == "last":
        resume = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if resume is None:
            raise UsageError(f"--resume_from_checkpoint last: no checkpoint-* in {training_args.output_dir}")
    elif resume and not os.path.isdir(resume):
        raise UsageError(f"--resume_from_checkpoint {resume}: no such directory")

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


def main(argv=None):
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    try:
        return run(model_args, data_args, training_args)
    except UsageError as error:
        sys.exit(f"run_clm.py: error: {error}")


if __name__ == "__main__":
    main()
