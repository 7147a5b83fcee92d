"""examples/run_clm.py, generate.py: data paths, resume, fine-tuning, and the errors a user sees for bad input."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from linear_decay.quickstart import CORPUS

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"
SMALL_MODEL = "hidden_size=32,num_hidden_layers=2,num_heads=2,intermediate_size=64,decay_rank=8"


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_clm = load_example("run_clm")
generate_example = load_example("generate")


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
        seen.append(torch._C._is_multithreading_enabled())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(run_clm.Trainer, "training_step", training_step)
    corpus, _ = small_corpus
    for flag, expected in (((), False), (("--autograd_multithreading",), True)):
        seen.clear()
        run_clm.main(common_args(tmp_path / f"run{expected}", corpus, "--do_train", "--max_steps", "2",
                                 "--block_size", "64", "--validation_split_percentage", "0", "--save_strategy", "no",
                                 "--config_overrides", SMALL_MODEL, *flag))
        assert seen == [expected, expected]
        assert torch._C._is_multithreading_enabled()


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
    expect_usage_error(common_args(tmp_path, corpus, "--do_train", "--model_name_or_path", str(mismatched_checkpoint)),
                       "do not match its config", "decay_type='gla'", "A_log")


def test_command_line_errors_print_one_line_without_traceback(tmp_path, mismatched_checkpoint):
    cases = [
        ([EXAMPLES / "run_clm.py", "--output_dir", tmp_path, "--do_train", "--train_file", tmp_path / "none.json"],
         "no such file"),
        ([EXAMPLES / "generate.py", mismatched_checkpoint, "--max_new_tokens", "2"], "do not match its config"),
    ]
    for argv, fragment in cases:
        result = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, cwd=tmp_path,
                                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        assert result.returncode != 0
        assert "Traceback" not in result.stderr, result.stderr[-2000:]
        assert fragment in result.stderr


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
