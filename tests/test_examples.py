"""examples/run_clm.py, generate.py, evaluate.py, push_to_hub.py: data paths, run_clm.py's defaults, resume (also
after a crash while a checkpoint was being written), fine-tuning, output folders that are never overwritten
silently, and the errors a user sees for bad input (one line, at once)."""

import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from linear_decay.quickstart import CORPUS

pytestmark = pytest.mark.slow  # the example scripts in subprocesses

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"
SMALL_MODEL = "hidden_size=32,num_hidden_layers=2,num_heads=2,intermediate_size=64,decay_rank=8"


def load_example(name):
    """An example script as a module, importable as when run: its folder on sys.path (for examples/local_paths.py)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_clm = load_example("run_clm")
generate_example = load_example("generate")
evaluate_example = load_example("evaluate")
push_example = load_example("push_to_hub")


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """The first works of the bundled corpus (same separator), small enough to tokenize in a moment."""
    works = CORPUS.read_text(encoding="utf-8").split("\n\n\n")[:3]
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text("\n\n\n".join(works), encoding="utf-8")
    return path, [w for w in works if w.strip()]


def common_args(output_dir, corpus, *extra):
    return ["--output_dir", str(output_dir), "--train_file", str(corpus), "--document_separator", "\n\n\n",
            "--block_size", "32", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
            "--logging_steps", "1", "--report_to", "none", "--use_cpu", "--seed", "0",
            "--dataloader_num_workers", "0", "--save_strategy", "steps", "--save_steps", "3", *extra]


def parse(argv):
    parser = run_clm.HfArgumentParser((run_clm.ModelArguments, run_clm.DataArguments, run_clm.TrainingArguments))
    return parser.parse_args_into_dataclasses(args=argv)


def first_blocks(argv, count=6):
    model_args, data_args, _ = parse(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run_clm.BUNDLED_TOKENIZER)
    train, _ = run_clm.build_datasets(data_args, tokenizer)
    blocks = []
    for row in train:
        blocks.append(row["input_ids"])
        if len(blocks) == count:
            return blocks
    return blocks


def step_losses(output_dir):
    history = json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def test_streaming_and_map_style_data_give_the_same_first_batch(small_corpus, tmp_path):
    corpus, _ = small_corpus
    args = common_args(tmp_path, corpus)
    streamed, stored = first_blocks(args + ["--streaming"]), first_blocks(args)
    assert len(stored) == 6 and streamed == stored


def test_packing_appends_eos_to_each_document_and_cuts_fixed_blocks(small_corpus, tmp_path):
    from transformers import AutoTokenizer

    corpus, works = small_corpus
    tokenizer = AutoTokenizer.from_pretrained(run_clm.BUNDLED_TOKENIZER)
    expected = []
    for work in works:
        expected += tokenizer(work, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    blocks = first_blocks(common_args(tmp_path, corpus, "--validation_split_percentage", "0"), count=10_000)
    # one packing group here (3 documents < packing_batch_rows): the blocks are the stream's prefix
    assert [t for block in blocks for t in block] == expected[: len(blocks) * 32]
    assert len(blocks) == len(expected) // 32 and all(len(b) == 32 for b in blocks)


def test_document_boundaries_restart_positions_after_every_eos(small_corpus, tmp_path):
    from transformers import AutoTokenizer

    corpus, works = small_corpus
    tokenizer = AutoTokenizer.from_pretrained(run_clm.BUNDLED_TOKENIZER)
    lengths = [len(tokenizer(work, add_special_tokens=False)["input_ids"]) + 1 for work in works]  # + EOS
    expected_positions = [p for n in lengths for p in range(n)]
    _, data_args, _ = parse(common_args(tmp_path, corpus, "--validation_split_percentage", "0",
                                        "--document_boundaries"))
    train, _ = run_clm.build_datasets(data_args, tokenizer)
    rows = list(train)
    plain = first_blocks(common_args(tmp_path, corpus, "--validation_split_percentage", "0"), count=10_000)
    assert [row["input_ids"] for row in rows] == plain  # the same blocks, plus positions
    positions = [p for row in rows for p in row["position_ids"]]
    assert positions == expected_positions[: len(positions)]
    starts = [sum(lengths[:i]) for i in range(1, len(lengths))]  # stream offsets where documents 2.. start
    labels = [t for row in rows for t in row["labels"]]
    ids = [t for row in rows for t in row["input_ids"]]
    for offset in range(len(labels)):
        assert labels[offset] == (-100 if offset in starts or offset == 0 else ids[offset])


def test_training_runs_the_backward_on_the_calling_thread(small_corpus, tmp_path, monkeypatch):
    """The Trainer's backward runs with autograd's multithreading off (the calling thread) unless
    --autograd_multithreading; the thread's own setting is back afterwards."""
    seen = []
    original = run_clm.Trainer.training_step

    def training_step(self, *args, **kwargs):
        seen.append(torch.autograd.is_multithreading_enabled())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(run_clm.Trainer, "training_step", training_step)
    corpus, _ = small_corpus
    for flag, expected in (((), False), (("--autograd_multithreading",), True)):
        seen.clear()
        run_clm.main(common_args(tmp_path / f"run{expected}", corpus, "--do_train", "--max_steps", "2",
                                 "--block_size", "64", "--validation_split_percentage", "0", "--save_strategy", "no",
                                 "--config_overrides", SMALL_MODEL, *flag))
        assert seen == [expected, expected]
        assert torch.autograd.is_multithreading_enabled()


def test_training_with_document_boundaries_feeds_the_restarts_to_the_model(small_corpus, tmp_path):
    """Two Trainer steps with --document_boundaries; the batches the Trainer collates carry the position_ids, and
    with them the model's loss on a block that holds a boundary is the loss of the documents run apart."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator

    corpus, _ = small_corpus
    args = common_args(tmp_path / "run", corpus, "--do_train", "--max_steps", "2", "--block_size", "64",
                       "--validation_split_percentage", "0", "--save_strategy", "no", "--document_boundaries",
                       "--config_overrides", f"decay_type=simple,simple_decay_init=0.999,{SMALL_MODEL}")
    run_clm.main(args)
    assert sorted(step_losses(tmp_path / "run")) == [1, 2]
    record = json.loads((tmp_path / "run" / "linear_decay_training.json").read_text())
    assert record["document_boundaries"] is True

    _, data_args, _ = parse(args)
    train, _ = run_clm.build_datasets(data_args, AutoTokenizer.from_pretrained(run_clm.BUNDLED_TOKENIZER))
    row = next(r for r in train if 0 in r["position_ids"][1:])  # a block where a document starts inside
    batch = default_data_collator([row])
    cut = row["position_ids"].index(0, 1)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run").eval()
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits[0]
        ids = batch["input_ids"]
        apart = torch.cat([model(input_ids=ids[:, :cut], use_cache=False).logits[0],
                           model(input_ids=ids[:, cut:], use_cache=False).logits[0]])
        joined = model(input_ids=ids, use_cache=False).logits[0]
    assert torch.allclose(packed, apart, atol=1e-5)
    assert not torch.allclose(packed[cut:], joined[cut:], atol=1e-3)  # λ ≈ 0.999: the boundary matters


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_json_and_parquet_files_give_the_same_blocks_as_text(small_corpus, tmp_path, fmt):
    corpus, works = small_corpus
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"body": w}) + "\n" for w in works), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"body": works}), path)
    from_text = first_blocks(common_args(tmp_path, corpus), count=20)
    from_file = first_blocks(common_args(tmp_path, path, "--text_column", "body"), count=20)
    assert from_file == from_text


def test_held_out_blocks_are_the_tail_and_disjoint_from_training(small_corpus, tmp_path):
    from transformers import AutoTokenizer

    corpus, _ = small_corpus
    _, data_args, _ = parse(common_args(tmp_path, corpus, "--validation_split_percentage", "10"))
    tokenizer = AutoTokenizer.from_pretrained(run_clm.BUNDLED_TOKENIZER)
    train, held_out = run_clm.build_datasets(data_args, tokenizer)
    everything = first_blocks(common_args(tmp_path, corpus, "--validation_split_percentage", "0"), count=10**6)
    assert len(held_out) == int(len(everything) * 0.1)
    assert list(train["input_ids"]) + list(held_out["input_ids"]) == everything


# ---------------------------------------------------------------------------------------------------------------
# Training: resume, fine-tune, model card
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_run(small_corpus, tmp_path_factory):
    corpus, _ = small_corpus
    output = tmp_path_factory.mktemp("full")
    args = common_args(output, corpus, "--do_train", "--do_eval", "--max_steps", "6",
                       "--config_overrides", f"decay_type=gla,{SMALL_MODEL}")
    metrics = run_clm.main(args)
    return output, args, metrics


def test_resumed_run_continues_the_loss_curve(full_run, tmp_path):
    output, args, _ = full_run
    reference = step_losses(output)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6] and reference[6] < reference[1]
    resumed_dir = tmp_path / "resumed"
    resumed_args = [a if a != str(output) else str(resumed_dir) for a in args]
    run_clm.main(resumed_args + ["--resume_from_checkpoint", str(output / "checkpoint-3")])
    resumed = step_losses(resumed_dir)
    for step in (4, 5, 6):  # 4 is the first step after the resume
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-5), step
    from safetensors.torch import load_file

    final, final_resumed = load_file(output / "model.safetensors"), load_file(resumed_dir / "model.safetensors")
    for name, tensor in final.items():
        torch.testing.assert_close(final_resumed[name], tensor, rtol=1e-4, atol=1e-6)


def test_resume_from_last_checkpoint_finds_it(full_run, tmp_path):
    output, args, _ = full_run
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    resumed_args = [a if a != str(output) else str(copy) for a in args]
    resumed_args[resumed_args.index("--max_steps") + 1] = "7"
    run_clm.main(resumed_args + ["--resume_from_checkpoint", "last"])
    assert max(step_losses(copy)) == 7


def test_training_output_is_a_complete_checkpoint_with_a_card(full_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output, _, metrics = full_run
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md",
                 "modeling_linear_decay.py", "linear_decay_training.json"):
        assert (output / name).is_file(), name
    config = json.loads((output / "config.json").read_text())
    assert config["use_cache"] is True and config["decay_type"] == "gla"
    record = json.loads((output / "linear_decay_training.json").read_text())
    assert record["steps"] == 6 and record["train_tokens"] == 6 * 4 * 32 and record["sequence_length"] == 32
    assert record["eval_loss"] == pytest.approx(metrics["eval_loss"])
    card = (output / "README.md").read_text()
    assert "- optimizer steps: 6" in card and "decay-gla" in card and f"{metrics['eval_loss']:.4g}" in card
    model = AutoModelForCausalLM.from_pretrained(output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert model.config.decay_type == "gla" and len(tokenizer) == model.config.vocab_size


def test_fine_tuning_a_checkpoint_records_its_base(trained_checkpoint, small_corpus, tmp_path):
    corpus, _ = small_corpus
    output = tmp_path / "tuned"
    run_clm.main(common_args(output, corpus, "--do_train", "--max_steps", "2", "--model_name_or_path",
                             str(trained_checkpoint)))
    record = json.loads((output / "linear_decay_training.json").read_text())
    assert record["base_model"] == str(trained_checkpoint)
    assert f"fine-tuned from: {trained_checkpoint}" in (output / "README.md").read_text()
    tuned, base = json.loads((output / "config.json").read_text()), json.loads((trained_checkpoint / "config.json").read_text())
    assert tuned["hidden_size"] == base["hidden_size"] and tuned["decay_type"] == base["decay_type"]


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one clear line, no traceback from deep inside
# ---------------------------------------------------------------------------------------------------------------


def expect_usage_error(argv, *fragments):
    with pytest.raises(SystemExit) as exit_info:
        run_clm.main(argv)
    message = str(exit_info.value.code)
    assert message.startswith("run_clm.py: error: "), message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_data_file_is_a_clear_error(tmp_path):
    expect_usage_error(["--output_dir", str(tmp_path), "--do_train", "--train_file", str(tmp_path / "nope.txt")],
                       "--train_file", "nope.txt", "no such file")


def test_unknown_preset_is_a_clear_error(small_corpus, tmp_path):
    corpus, _ = small_corpus
    expect_usage_error(common_args(tmp_path, corpus, "--do_train", "--preset", "7b"), "preset='7b'", "tiny", "160m")


def test_unknown_override_key_is_a_clear_error(small_corpus, tmp_path):
    corpus, _ = small_corpus
    expect_usage_error(common_args(tmp_path, corpus, "--do_train", "--config_overrides", "decay_tpye=gla"),
                       "no field 'decay_tpye'", "did you mean decay_type")


def test_invalid_override_value_is_a_clear_error(small_corpus, tmp_path):
    corpus, _ = small_corpus
    expect_usage_error(common_args(tmp_path, corpus, "--do_train", "--config_overrides",
                                   "decay_type=tnl,decay_granularity=vector"), "tnl", "vector")


@pytest.fixture
def mismatched_checkpoint(trained_checkpoint, tmp_path):
    """The trained (mamba2) checkpoint with config.json edited to another decay type afterwards."""
    path = tmp_path / "mismatched"
    shutil.copytree(trained_checkpoint, path)
    config = json.loads((path / "config.json").read_text())
    config["decay_type"] = "gla"
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_checkpoint_whose_config_does_not_match_its_weights_is_a_clear_error(mismatched_checkpoint, small_corpus,
                                                                            tmp_path):
    corpus, _ = small_corpus
    expect_usage_error(common_args(tmp_path / "out", corpus, "--do_train", "--model_name_or_path",
                                   str(mismatched_checkpoint)),
                       "do not match its config", "decay_type='gla'", "A_log")


def test_command_line_errors_print_one_line_without_traceback(tmp_path, mismatched_checkpoint, trained_checkpoint):
    """Run as a user runs them; the last two as if `datasets` / lm-eval were not installed (their import fails the
    way a missing module's does)."""
    cases = [
        ([EXAMPLES / "run_clm.py", "--output_dir", tmp_path / "out", "--do_train", "--train_file",
          tmp_path / "none.json"], None, "no such file"),
        ([EXAMPLES / "generate.py", mismatched_checkpoint, "--max_new_tokens", "2"], None, "do not match its config"),
        ([EXAMPLES / "run_clm.py", "--output_dir", tmp_path / "out", "--do_train", "--max_steps", "2"], "datasets",
         "needs the `datasets` library"),
        ([EXAMPLES / "evaluate.py", trained_checkpoint, "--limit", "2"], "lm_eval", "needs lm-evaluation-harness"),
    ]
    for argv, missing, fragment in cases:
        command = [sys.executable, *map(str, argv)]
        if missing:
            command = [sys.executable, "-c", f"import runpy, sys; sys.modules[{missing!r}] = None; "
                       f"sys.argv = {list(map(str, argv))!r}; sys.path.insert(0, {str(EXAMPLES)!r}); "  # as `python script.py` does
                       f"runpy.run_path(sys.argv[0], run_name='__main__')"]
        result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path,
                                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        assert result.returncode != 0
        assert "Traceback" not in result.stderr, result.stderr[-2000:]
        assert fragment in result.stderr
        lines = [line for line in result.stderr.splitlines() if "error:" in line]
        assert len(lines) == 1 and fragment in lines[0] and (missing is None or "pip install" in lines[0]), lines
    assert not (tmp_path / "out").exists()


def test_streaming_without_max_steps_is_a_clear_error(small_corpus, tmp_path):
    corpus, _ = small_corpus
    expect_usage_error(common_args(tmp_path, corpus, "--do_train", "--streaming"), "--max_steps")


# ---------------------------------------------------------------------------------------------------------------
# generate.py
# ---------------------------------------------------------------------------------------------------------------


def test_generate_batched_prompts_match_one_by_one(trained_checkpoint):
    prompts = ["The king", "To be, or not to be, that is", "O"]
    argv = [str(trained_checkpoint), "--max_new_tokens", "12", "--device", "cpu"]
    for prompt in prompts:
        argv += ["--prompt", prompt]
    batched = generate_example.main(argv + ["--batch_size", "3"])
    single = generate_example.main(argv + ["--batch_size", "1"])
    assert batched == single and len(batched) == 3 and all(batched)


# ---------------------------------------------------------------------------------------------------------------
# run_clm.py's defaults: only for the flags the command line does not give
# ---------------------------------------------------------------------------------------------------------------

def readme_run_clm_commands():
    """The arguments of every `python examples/run_clm.py` command in README.md (continuation lines joined,
    comments dropped)."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("python examples/run_clm.py "):
                commands.append(shlex.split(line, comments=True)[2:])
    return commands


README_PRETRAINING = readme_run_clm_commands()[0]  # the first: pretraining the tiny preset on the bundled corpus


def settings(training_args):
    return dict(learning_rate=training_args.learning_rate, warmup_steps=training_args.warmup_steps,
                logging_steps=training_args.logging_steps, logging_first_step=training_args.logging_first_step,
                lr_scheduler_type=str(getattr(training_args.lr_scheduler_type, "value",
                                              training_args.lr_scheduler_type)),
                weight_decay=training_args.weight_decay, adam_beta2=training_args.adam_beta2)


def parsed_settings(argv):
    return settings(run_clm.parse_command_line(argv)[2])


PRETRAINING_200 = dict(learning_rate=3e-3, warmup_steps=10, logging_steps=10, logging_first_step=True,
                       lr_scheduler_type="cosine", weight_decay=0.1, adam_beta2=0.95)


def test_defaults_of_the_readme_pretraining_command():
    assert README_PRETRAINING == ["--output_dir", "outputs/tiny-gla", "--do_train", "--do_eval", "--max_steps", "200",
                                  "--config_overrides", "decay_type=gla,decay_granularity=scalar"]
    assert parsed_settings(README_PRETRAINING) == PRETRAINING_200


def test_a_flag_given_in_any_spelling_keeps_its_value():
    given = ["--learning_rate=1e-4", "--warmup-steps", "3", "--logging_steps", "7", "--logging_first_step", "false",
             "--lr_scheduler_type", "linear", "--weight_decay", "0", "--adam_beta2", "0.999"]
    assert parsed_settings(README_PRETRAINING + given) == dict(
        learning_rate=1e-4, warmup_steps=3, logging_steps=7, logging_first_step=False, lr_scheduler_type="linear",
        weight_decay=0.0, adam_beta2=0.999)
    # one given, the others still take run_clm.py's values
    assert parsed_settings(README_PRETRAINING + ["--learning-rate", "5e-05"]) == {**PRETRAINING_200,
                                                                                  "learning_rate": 5e-5}


def test_defaults_follow_the_run_length_the_size_and_fine_tuning(tmp_path, monkeypatch):
    base = ["--output_dir", str(tmp_path), "--do_train"]
    # the learning rate of each preset
    assert parsed_settings(base + ["--preset", "160m", "--max_steps", "1000"]) == {
        **PRETRAINING_200, "learning_rate": 6e-4, "warmup_steps": 50, "logging_steps": 50}
    assert parsed_settings(base + ["--preset", "1.45b", "--max_steps", "20000"])["learning_rate"] == 2e-4
    # short runs: no warm-up below 20 steps, a loss line every step
    assert parsed_settings(base + ["--max_steps", "19"])["warmup_steps"] == 0
    assert parsed_settings(base + ["--max_steps", "19"])["logging_steps"] == 1
    # counted in epochs: ratios of the total, which the Trainer resolves
    by_epochs = parsed_settings(base + ["--num_train_epochs", "2"])
    assert by_epochs["warmup_steps"] == 0.05 and by_epochs["logging_steps"] == 0.05
    # fine-tuning keeps the Trainer's optimizer settings; warm-up and loss lines as for pretraining
    tuned = parsed_settings(base + ["--model_name_or_path", str(tmp_path), "--max_steps", "100"])
    assert tuned == dict(learning_rate=5e-5, warmup_steps=5, logging_steps=5, logging_first_step=True,
                         lr_scheduler_type="linear", weight_decay=0.0, adam_beta2=0.999)
    # a JSON file of arguments: its keys count as given
    arguments = tmp_path / "args.json"
    arguments.write_text(json.dumps({"output_dir": str(tmp_path), "do_train": True, "max_steps": 40,
                                     "learning_rate": 1e-3}))
    monkeypatch.setattr(sys, "argv", ["run_clm.py", str(arguments)])
    assert parsed_settings(None) == {**PRETRAINING_200, "learning_rate": 1e-3, "warmup_steps": 2,
                                     "logging_steps": 2}


def test_a_run_with_the_defaults_warms_up_decays_and_logs(small_corpus, tmp_path):
    """What the Trainer did with the defaults, read from the run's log: a loss line at step 1 and every
    max_steps // 20 steps, and the learning rate of a 5 % linear warm-up to 3e-3 followed by a cosine decay."""
    corpus, _ = small_corpus
    steps = 40
    run_clm.main(["--output_dir", str(tmp_path / "run"), "--train_file", str(corpus), "--document_separator",
                  "\n\n\n", "--block_size", "32", "--per_device_train_batch_size", "2", "--report_to", "none",
                  "--use_cpu", "--seed", "0", "--dataloader_num_workers", "0", "--save_strategy", "no", "--do_train",
                  "--max_steps", str(steps), "--validation_split_percentage", "0", "--config_overrides", SMALL_MODEL])
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    logged = {entry["step"]: entry for entry in history if "loss" in entry}
    assert sorted(logged) == [1] + list(range(2, steps + 1, 2))
    warmup = 2

    def multiplier(done):  # the schedule's factor for the update that follows `done` updates
        if done < warmup:
            return done / warmup
        return 0.5 * (1 + math.cos(math.pi * (done - warmup) / (steps - warmup)))

    for step, entry in logged.items():  # the line of step k reports the learning rate of the k-th update
        assert entry["learning_rate"] == pytest.approx(3e-3 * multiplier(step - 1), rel=1e-6, abs=1e-12), step
    record = json.loads((tmp_path / "run" / "linear_decay_training.json").read_text())
    assert record["learning_rate"] == 3e-3 and record["warmup_steps"] == warmup
    assert record["lr_scheduler"] == "cosine" and "weight decay 0.1" in record["optimizer"]


def test_preset_with_a_checkpoint_is_an_error(trained_checkpoint, small_corpus, tmp_path):
    corpus, _ = small_corpus
    expect_usage_error(common_args(tmp_path / "out", corpus, "--do_train", "--model_name_or_path",
                                   str(trained_checkpoint), "--preset", "160m"), "--preset", "--model_name_or_path")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# --resume_from_checkpoint last after a crash while a checkpoint was being written
# ---------------------------------------------------------------------------------------------------------------


def crash_args(output_dir, corpus, *extra):
    return common_args(output_dir, corpus, "--do_train", "--max_steps", "10", "--save_steps", "5",
                       "--validation_split_percentage", "0", "--config_overrides", f"decay_type=gla,{SMALL_MODEL}",
                       *extra)


@pytest.fixture(scope="module")
def uninterrupted(small_corpus, tmp_path_factory):
    """Ten steps with a checkpoint every five, never interrupted: the reference."""
    corpus, _ = small_corpus
    output = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_clm.main(crash_args(output, corpus))
    return output


def write_partial_checkpoint(complete, target, kind):
    """What a run killed while the Trainer writes `complete` leaves behind (the Trainer writes config and code,
    then the weights, optimizer, scheduler, RNG state and trainer_state.json last)."""
    shutil.copytree(complete, target)
    if kind == "code only":
        for path in target.iterdir():
            if path.suffix != ".py" and path.name != "config.json":
                path.unlink()
    elif kind == "weights without optimizer":
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
            (target / name).unlink()
    elif kind == "truncated optimizer":  # every other file in place: only reading optimizer.pt can tell
        data = (target / "optimizer.pt").read_bytes()
        (target / "optimizer.pt").write_bytes(data[: len(data) // 2])
    else:
        raise ValueError(kind)


def assert_same_weights(actual_dir, expected_dir):
    from safetensors.torch import load_file

    actual, expected = load_file(actual_dir / "model.safetensors"), load_file(expected_dir / "model.safetensors")
    assert actual.keys() == expected.keys() and len(expected) > 10
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_the_uninterrupted_checkpoints_are_complete(uninterrupted):
    assert [p.name for p in run_clm.checkpoint_folders(uninterrupted)] == ["checkpoint-10", "checkpoint-5"]
    for folder in run_clm.checkpoint_folders(uninterrupted):
        assert run_clm.checkpoint_problems(folder) == []


@pytest.mark.parametrize("kind, reason", [
    ("code only", "no trainer_state.json; no model weights; no optimizer.pt; no scheduler.pt; no rng_state.pth"),
    ("weights without optimizer", "no trainer_state.json; no optimizer.pt; no scheduler.pt; no rng_state.pth"),
    ("truncated optimizer", "optimizer.pt cannot be read"),
], ids=["code-only", "weights-without-optimizer", "truncated-optimizer"])
def test_last_skips_a_checkpoint_cut_short_and_resumes_from_the_one_before(uninterrupted, small_corpus, tmp_path,
                                                                           capsys, kind, reason):
    corpus, _ = small_corpus
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(uninterrupted / "checkpoint-5", crashed / "checkpoint-5")
    write_partial_checkpoint(uninterrupted / "checkpoint-10", crashed / "checkpoint-10", kind)
    assert reason in "; ".join(run_clm.checkpoint_problems(crashed / "checkpoint-10"))

    run_clm.main(crash_args(crashed, corpus, "--resume_from_checkpoint", "last"))
    out = capsys.readouterr().out
    assert f"skipping {crashed / 'checkpoint-10'}, incomplete: " in out and reason in out
    assert f"resuming from {crashed / 'checkpoint-5'}" in out
    # the resumed run continued where checkpoint-5 left off and ends where the uninterrupted run ended
    assert sorted(step_losses(crashed)) == list(range(1, 11))  # 1-5 from checkpoint-5's trainer_state.json
    for step in range(6, 11):
        assert step_losses(crashed)[step] == pytest.approx(step_losses(uninterrupted)[step], rel=1e-6), step
    assert_same_weights(crashed, uninterrupted)
    assert run_clm.checkpoint_problems(crashed / "checkpoint-10") == []  # written again, whole


def test_last_with_no_complete_checkpoint_trains_from_scratch(uninterrupted, small_corpus, tmp_path, capsys):
    corpus, _ = small_corpus
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    write_partial_checkpoint(uninterrupted / "checkpoint-5", crashed / "checkpoint-5", "weights without optimizer")
    run_clm.main(crash_args(crashed, corpus, "--resume_from_checkpoint", "last"))
    out = capsys.readouterr().out
    assert "no complete checkpoint in" in out and "training from scratch" in out
    assert sorted(step_losses(crashed))[0] == 1
    assert_same_weights(crashed, uninterrupted)


def test_last_with_no_complete_checkpoint_beside_a_finished_model_stops(uninterrupted, small_corpus, tmp_path):
    corpus, _ = small_corpus
    finished = tmp_path / "finished"
    shutil.copytree(uninterrupted, finished, ignore=shutil.ignore_patterns("checkpoint-*"))
    before = (finished / "model.safetensors").read_bytes()
    expect_usage_error(crash_args(finished, corpus, "--resume_from_checkpoint", "last"),
                       "no complete checkpoint in", "config.json", "--overwrite_output_dir")
    assert (finished / "model.safetensors").read_bytes() == before


def test_resuming_from_an_incomplete_checkpoint_named_by_hand_is_a_clear_error(uninterrupted, small_corpus,
                                                                               tmp_path):
    corpus, _ = small_corpus
    partial = tmp_path / "checkpoint-10"
    write_partial_checkpoint(uninterrupted / "checkpoint-10", partial, "truncated optimizer")
    expect_usage_error(crash_args(tmp_path / "out", corpus, "--resume_from_checkpoint", str(partial)),
                       "not a complete checkpoint", "optimizer.pt cannot be read")
    expect_usage_error(crash_args(tmp_path / "out", corpus, "--resume_from_checkpoint", str(tmp_path / "nope")),
                       "no such folder")


# ---------------------------------------------------------------------------------------------------------------
# An output folder is never overwritten silently
# ---------------------------------------------------------------------------------------------------------------


def test_rerun_into_a_finished_output_dir_is_refused(uninterrupted, small_corpus, tmp_path):
    corpus, _ = small_corpus
    finished = tmp_path / "finished"
    shutil.copytree(uninterrupted, finished)
    snapshot = {p.relative_to(finished): p.read_bytes() for p in finished.rglob("*") if p.is_file()}
    message = expect_usage_error(crash_args(finished, corpus), f"--output_dir {finished} is not empty",
                                 "--overwrite_output_dir", "--resume_from_checkpoint last")
    assert "\n" not in message
    assert {p.relative_to(finished): p.read_bytes() for p in finished.rglob("*") if p.is_file()} == snapshot


def test_overwrite_output_dir_starts_afresh_without_the_earlier_runs_leftovers(uninterrupted, small_corpus, tmp_path,
                                                                              capsys):
    corpus, _ = small_corpus
    finished = tmp_path / "finished"
    shutil.copytree(uninterrupted, finished)
    (finished / "lm_eval_results.json").write_text("{}")  # the earlier model's evaluation
    (finished / "notes.txt").write_text("mine")
    run_clm.main(common_args(finished, corpus, "--do_train", "--max_steps", "4", "--save_steps", "2",
                             "--validation_split_percentage", "0", "--config_overrides", SMALL_MODEL,
                             "--overwrite_output_dir"))
    assert "removed" in capsys.readouterr().out
    # the earlier run's checkpoints 5 and 10 are gone, so a later `last` cannot pick them up
    assert [p.name for p in run_clm.checkpoint_folders(finished)] == ["checkpoint-4", "checkpoint-2"]
    assert not (finished / "lm_eval_results.json").exists() and (finished / "notes.txt").read_text() == "mine"
    assert json.loads((finished / "trainer_state.json").read_text())["global_step"] == 4


# ---------------------------------------------------------------------------------------------------------------
# A path that looks local and is not there: "no such folder" at once, never a Hub lookup
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory holding an outputs/ folder with one checkpoint-like folder."""
    (tmp_path / "outputs" / "tiny-gla").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


LOCAL_LOOKING = ["outputs/nope", "./nope", "../nope", "/nope/at/all", "~/surely-not-a-folder-here", "a/b/c",
                 "outputs/tiny-gla/nope", "not an id/x"]
HUB_LOOKING = ["owner/name", "EleutherAI/pythia-160m", "gpt2", "outputs/tiny-gla", "outputs"]  # or existing


@pytest.mark.parametrize("module", [run_clm, generate_example, evaluate_example], ids=["run_clm", "generate",
                                                                                       "evaluate"])
def test_which_names_are_missing_local_folders(workdir, module):
    assert [name for name in LOCAL_LOOKING if not module.missing_local_folder(name)] == []
    assert [name for name in HUB_LOOKING if module.missing_local_folder(name)] == []


def test_every_example_reports_a_missing_local_folder_at_once(workdir, small_corpus, capsys):
    corpus, _ = small_corpus
    for name in ("outputs/nope", "./nope", "~/surely-not-a-folder-here"):
        expect_usage_error(common_args(workdir / "out", corpus, "--do_train", "--model_name_or_path", name),
                           f"--model_name_or_path: no such folder: {name}")
        expect_usage_error(common_args(workdir / "out", corpus, "--do_train", "--tokenizer_name", name),
                           f"--tokenizer_name: no such folder: {name}")
        with pytest.raises(SystemExit) as exit_info:
            generate_example.main([name, "--max_new_tokens", "1"])
        assert str(exit_info.value.code) == f"generate.py: error: no such folder: {name}"
        with pytest.raises(SystemExit) as exit_info:
            evaluate_example.main([name])
        assert exit_info.value.code == 2 and f": error: no such folder: {name}\n" in capsys.readouterr().err
        with pytest.raises(SystemExit) as exit_info:
            push_example.main([name, "someone/tiny-gla"])
        assert str(exit_info.value.code) == f"push_to_hub.py: error: no such folder: {name}"
    assert not (workdir / "out").exists()


def test_a_hub_id_still_goes_to_the_hub(workdir, small_corpus):
    """owner/name is looked up on the Hub (switched off in the tests: HF_HUB_OFFLINE), not reported as a folder."""
    corpus, _ = small_corpus
    message = expect_usage_error(common_args(workdir / "out", corpus, "--do_train", "--model_name_or_path",
                                             "someone/tiny-gla"), "someone/tiny-gla")
    assert "no such folder" not in message and "cannot load" in message
    with pytest.raises(SystemExit) as exit_info:
        generate_example.main(["someone/tiny-gla", "--max_new_tokens", "1"])
    assert "no such folder" not in str(exit_info.value.code) and "cannot load someone/tiny-gla" in str(
        exit_info.value.code)
