"""Multi-process training through accelerate (examples/accelerate/), on CPU with gloo.

- `accelerate launch --config_file examples/accelerate/cpu_ddp.yaml examples/run_clm.py`: two processes, each with half
  of every global batch, end with the same weights and losses as one process with the whole batch.
- FSDP2 with the wrap units fsdp.yaml gives (the model's `_no_split_modules`), two sharded optimizer steps, a
  SHARDED_STATE_DICT checkpoint, `accelerate merge-weights`, `from_pretrained`: the weights of the single-process run.
- The GPU configs (ddp.yaml, fsdp.yaml) resolve to what their comments promise.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # accelerate launches in subprocesses

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "examples" / "accelerate"
SMALL_MODEL = "decay_type=gla,hidden_size=32,num_hidden_layers=2,num_heads=2,intermediate_size=64,decay_rank=8"
TIMEOUT = 300  # seconds per subprocess; a run takes ~20 s on two cores


def load_run_clm():
    spec = importlib.util.spec_from_file_location("example_run_clm_accelerate", REPO_ROOT / "examples" / "run_clm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def subprocess_env(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"), "PYTHONPATH": str(REPO_ROOT)}
    for name in [k for k in env if k.startswith(("ACCELERATE_", "FSDP_"))]:  # no launcher state from outside
        del env[name]
    return env


def run(command, tmp_path, name):
    """Run a command; on failure or timeout show its output (the last 6000 characters)."""
    log = tmp_path / f"{name}.log"
    try:
        result = subprocess.run([str(c) for c in command], cwd=tmp_path, env=subprocess_env(tmp_path),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as error:
        output = error.stdout.decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        pytest.fail(f"{name} timed out after {TIMEOUT} s:\n{output[-6000:]}")
    log.write_text(result.stdout)
    assert result.returncode == 0, f"{name} failed ({result.returncode}):\n{result.stdout[-6000:]}"
    return result.stdout


def relative_error(actual, expected):
    return float((actual.double() - expected.double()).norm() / expected.double().norm().clamp(min=1e-12))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The opening of the bundled corpus: 52 blocks of 32 tokens, enough for two steps of 4 blocks."""
    from linear_decay.quickstart import CORPUS

    path = tmp_path_factory.mktemp("accelerate-data") / "small.txt"
    path.write_text(CORPUS.read_text(encoding="utf-8")[:6000], encoding="utf-8")
    return path


def clm_args(output_dir, corpus, per_device_batch):
    # sequential sampling (no shuffle), drop_last, fixed seed, no dropout in the model, fp32: the data of each
    # optimizer step is blocks [4k, 4k+4), split by accelerate's BatchSamplerShard into [4k, 4k+2) on rank 0 and
    # [4k+2, 4k+4) on rank 1 when two processes take 2 each.
    return ["--output_dir", output_dir, "--train_file", corpus, "--validation_split_percentage", "0",
            "--block_size", "32", "--per_device_train_batch_size", str(per_device_batch), "--max_steps", "2",
            "--learning_rate", "3e-3", "--train_sampling_strategy", "sequential", "--dataloader_drop_last",
            "--dataloader_num_workers", "0", "--seed", "0", "--use_cpu", "--do_train", "--save_strategy", "no",
            "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true",
            "--config_overrides", SMALL_MODEL]


def logged(output_dir):
    history = json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: (entry["loss"], entry["grad_norm"]) for entry in history if "loss" in entry}


def test_two_ddp_processes_through_accelerate_match_one_process_with_the_whole_batch(corpus, tmp_path):
    """DDP (+ gradient checkpointing) on two gloo processes vs one process without either: same losses, gradient
    norms and weights after two AdamW steps."""
    run_clm = load_run_clm()
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"

    # two processes, 2 blocks each, launched with the CI config, with activation checkpointing (recomputing the
    # layers in the backward pass must not change DDP's gradient all-reduce)
    output = run([sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
                  CONFIGS / "cpu_ddp.yaml", REPO_ROOT / "examples" / "run_clm.py",
                  *clm_args(ddp_dir, corpus, per_device_batch=2), "--gradient_checkpointing"], tmp_path, "ddp")
    assert output.count("model: 0.") == 2, output[-3000:]  # both ranks built the model
    # the independent reference: one process, 4 blocks per step, in this process (no launcher)
    run_clm.main([str(a) for a in clm_args(single_dir, corpus, per_device_batch=4)])

    for directory, world in ((ddp_dir, 2), (single_dir, 1)):
        record = json.loads((directory / "linear_decay_training.json").read_text())
        assert record["hardware"].startswith(f"{world} ×"), record["hardware"]
        assert record["global_batch_size"] == 4 and record["steps"] == 2

    ddp_log, single_log = logged(ddp_dir), logged(single_dir)
    assert sorted(ddp_log) == sorted(single_log) == [1, 2]
    for step in (1, 2):  # loss is the mean over both ranks; grad_norm of the all-reduced gradient
        assert ddp_log[step][0] == pytest.approx(single_log[step][0], rel=1e-5), step
        assert ddp_log[step][1] == pytest.approx(single_log[step][1], rel=1e-4), step

    # the weights: both runs start from the same initialisation (seed 0) ...
    from transformers import AutoTokenizer, set_seed

    model_args, _, _ = run_clm.HfArgumentParser(
        (run_clm.ModelArguments, run_clm.DataArguments, run_clm.TrainingArguments)
    ).parse_args_into_dataclasses(args=[str(a) for a in clm_args(tmp_path / "unused", corpus, 4)])
    set_seed(0)
    initial = run_clm.build_model(model_args, AutoTokenizer.from_pretrained(run_clm.BUNDLED_TOKENIZER)).state_dict()
    ddp, single = load_file(ddp_dir / "model.safetensors"), load_file(single_dir / "model.safetensors")
    assert ddp.keys() == single.keys() and len(single) > 20
    # ... the two updates agree to far better than their own size (a different split of the data, or a
    # gradient summed instead of averaged, would change them by O(1))
    for name, reference in single.items():
        update, ddp_update = reference - initial[name], ddp[name] - initial[name]
        assert update.norm() > 0, name
        assert relative_error(ddp[name], reference) < 1e-5, name
        assert relative_error(ddp_update, update) < 1e-3, (name, relative_error(ddp_update, update))
    total_update = torch.cat([(single[n] - initial[n]).flatten() for n in single]).norm()
    total_initial = torch.cat([initial[n].flatten() for n in single]).norm()
    assert total_update > 0.01 * total_initial  # training moved the weights noticeably


def test_fsdp2_sharded_checkpoint_merges_into_a_from_pretrained_folder(tmp_path):
    """Two gloo processes shard the model with FSDP2, train two steps and save a SHARDED_STATE_DICT checkpoint;
    `accelerate merge-weights` + the run's config.json give a folder that `from_pretrained` loads, holding the weights
    of the same two steps taken by one process on the whole batch."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        import fsdp_shard_script as script
    finally:
        sys.path.pop(0)
    output = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  Path(script.__file__), tmp_path], tmp_path, "fsdp")
    assert output.count("DTensor shards") == 2 and "'model.layers.0', 'model.layers.1'" in output, output[-3000:]
    shards = sorted(p.name for p in (tmp_path / "checkpoint" / "pytorch_model_fsdp_0").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"], shards

    merged = tmp_path / "merged"
    run([sys.executable, "-m", "accelerate.commands.accelerate_cli", "merge-weights",
         tmp_path / "checkpoint" / "pytorch_model_fsdp_0", merged], tmp_path, "merge")
    shutil.copy(tmp_path / "initial" / "config.json", merged / "config.json")

    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(merged)

    # single-process reference: same initial weights, whole batch, same optimizer (SGD: the
    # comparison is of the gradients themselves, with no Adam normalisation amplifying round-off in tiny gradients)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "initial")
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    optimizer = torch.optim.SGD(reference.parameters(), lr=script.LR)
    for ids in script.batches():
        reference(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    expected, actual = reference.state_dict(), loaded.state_dict()
    assert actual.keys() == expected.keys() and len(expected) > 20
    parameters = dict(reference.named_parameters())
    for name, tensor in expected.items():
        assert relative_error(actual[name], tensor) < 1e-5, name
        if name in parameters:  # the sharded update itself, not only the weights it is added to
            update = tensor - initial[name]
            assert update.norm() > 0, name
            assert relative_error(actual[name] - initial[name], update) < 1e-4, name
    total_update = torch.cat([(expected[n] - initial[n]).flatten() for n in parameters]).norm()
    assert total_update > 0.01 * torch.cat([initial[n].flatten() for n in parameters]).norm()


def test_gpu_configs_resolve_to_ddp_and_fsdp2_with_layer_wrapping():
    """What `accelerate launch --config_file X` turns ddp.yaml and fsdp.yaml into (no GPU needed to check)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.launch import prepare_multi_gpu_env

    from linear_decay import LinearDecayConfig, LinearDecayForCausalLM

    def resolve(name):
        args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "train.py"])
        args, _, _ = _validate_launch_command(args)
        return args

    ddp = resolve("ddp.yaml")
    assert ddp.multi_gpu and not ddp.use_fsdp and ddp.mixed_precision == "bf16" and ddp.num_machines == 1
    cpu = resolve("cpu_ddp.yaml")
    assert cpu.multi_gpu and cpu.num_processes == 2 and cpu.mixed_precision == "no" and not cpu.cpu

    fsdp = resolve("fsdp.yaml")
    assert fsdp.use_fsdp and fsdp.mixed_precision == "bf16"
    env = {k: v for k, v in prepare_multi_gpu_env(fsdp).items() if k.startswith(("FSDP_", "ACCELERATE_"))}
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT" and env["FSDP_ACTIVATION_CHECKPOINTING"] == "false"
    with patch_environment(**env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert "SHARDED_STATE_DICT" in str(plugin.state_dict_type)
    model = LinearDecayForCausalLM(LinearDecayConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_heads=2,
                                                     intermediate_size=64, decay_rank=8))
    assert list(model._no_split_modules) == ["LinearDecayBlock"]
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    assert [name for name, module in model.named_modules() if policy(module)] == [
        "model.layers.0", "model.layers.1", "model.layers.2"]
