"""lm-evaluation-harness on our model: the numbers lm-eval's `hf` model reports equal the model's own, and the offline
task pack (`linear_decay/eval_tasks`) runs end to end through the README's `lm_eval` command (from another folder,
against the package as a non-editable install ships it) and `examples/evaluate.py`.

Everything runs offline on the session's small trained checkpoint (conftest.trained_checkpoint), loaded the way
users load it: `trust_remote_code=True`, i.e. through the modeling code saved beside the weights.
"""

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("datasets")
pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from linear_decay import LinearDecayConfig, LinearDecayForCausalLM  # noqa: E402
from linear_decay.quickstart import CORPUS, load_bundled_tokens  # noqa: E402

pytestmark = pytest.mark.slow  # lm-eval in subprocesses

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "linear_decay" / "eval_tasks"
EVALUATE = REPO / "examples" / "evaluate.py"
# every metric each task of the pack reports, as "metric,filter" keys of lm-eval's results
PACK_METRICS = {
    "shakespeare_next_line": ["acc,none", "acc_norm,none"],
    "shakespeare_cloze": ["perplexity,none", "acc,none"],
    "shakespeare_perplexity": ["word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"],
    "shakespeare_continuation": ["exact_match,strip", "chrf,strip"],
}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
CLI_LIMIT = 8


def load_task_module():
    """The pack's loader, imported from its file the way lm-eval's `!function` does."""
    spec = importlib.util.spec_from_file_location("shakespeare_tasks_under_test", TASKS_DIR / "shakespeare_tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tasks_module():
    return load_task_module()


@pytest.fixture(scope="module")
def reference(trained_checkpoint):
    """The checkpoint loaded through our own package (not lm-eval, not the remote code), and its tokenizer."""
    model = LinearDecayForCausalLM.from_pretrained(trained_checkpoint).eval()
    return model, AutoTokenizer.from_pretrained(trained_checkpoint)


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def direct_logprob(model, context_ids, continuation_ids):
    """log p(continuation | context) and whether every continuation token is the argmax: one forward pass over
    context + continuation, log-softmax, gather."""
    ids = torch.tensor([context_ids + continuation_ids])
    logprobs = model(input_ids=ids).logits[0].double().log_softmax(-1)
    rows = torch.arange(len(context_ids) - 1, ids.shape[1] - 1)
    targets = torch.tensor(continuation_ids)
    greedy = bool((logprobs[rows].argmax(-1) == targets).all())
    return float(logprobs[rows, targets].sum()), greedy


@torch.no_grad()
def greedy_tokens(model, ids, count):
    ids = list(ids)
    for _ in range(count):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-count:]


def test_loglikelihood_equals_direct_log_probability(trained_checkpoint, reference, tasks_module):
    model, tokenizer = reference
    cloze = tasks_module.build_cloze()[3]
    pairs = [
        ("To be, or not to be, that is the question:", "\nWhether 'tis nobler in the mind to suffer"),
        ("KING.", " Where is the queen?"),
        (cloze["context"], cloze["target"]),
        ("The", " king"),
    ]
    # a continuation that is the model's own greedy choice: is_greedy must come back True
    greedy_context = "LEONTES.\nGood my lord,"
    greedy = greedy_tokens(model, encode(tokenizer, greedy_context), 1)
    assert encode(tokenizer, tokenizer.decode(greedy)) == greedy
    pairs.append((greedy_context, tokenizer.decode(greedy)))
    for context, continuation in pairs:  # contexts without trailing spaces: lm-eval moves those to the continuation
        assert context == context.rstrip()
        assert encode(tokenizer, context + continuation) == encode(tokenizer, context) + encode(tokenizer,
                                                                                                 continuation)

    lm = HFLM(pretrained=str(trained_checkpoint), trust_remote_code=True, batch_size=4, device="cpu")
    requests = [Instance("loglikelihood", {}, pair, index) for index, pair in enumerate(pairs)]
    requests.append(Instance("loglikelihood", {}, ("", "The king"), len(pairs)))  # empty context: prefix token
    reported = lm.loglikelihood(requests, disable_tqdm=True)

    expected = [direct_logprob(model, encode(tokenizer, c), encode(tokenizer, t)) for c, t in pairs]
    # lm-eval conditions an empty context on its prefix token, the end-of-text token for this tokenizer
    assert lm.prefix_token_id == tokenizer.eos_token_id
    expected.append(direct_logprob(model, [tokenizer.eos_token_id], encode(tokenizer, "The king")))
    for (logprob, is_greedy), (want_logprob, want_greedy) in zip(reported, expected, strict=True):
        assert logprob == pytest.approx(want_logprob, abs=1e-4)
        assert is_greedy == want_greedy
    assert reported[len(pairs) - 1][1] is True
    assert not all(is_greedy for _, is_greedy in reported)


def random_checkpoint(trained_checkpoint, path):
    """An untrained model of the same shape: the few-step model greedily emits newlines and full stops whatever the
    prompt, so it cannot show a padding bug; random weights give long, prompt-dependent generations that do."""
    config = LinearDecayConfig.from_pretrained(trained_checkpoint)
    torch.manual_seed(0)
    LinearDecayForCausalLM(config).eval().save_pretrained(path)
    AutoTokenizer.from_pretrained(trained_checkpoint).save_pretrained(path)
    return path


def test_batched_generate_until_with_left_padding_matches_batch_size_one(trained_checkpoint, tasks_module,
                                                                         tmp_path):
    prompts = ["O", "KING.\nWhat news?", "To be, or not to be, that is the question:\nWhether 'tis nobler"]
    prompts += [item["context"] for item in tasks_module.build_continuation()[:5]]
    assert len({len(prompt) for prompt in prompts}) == len(prompts)  # every batch of 4 is padded
    for checkpoint, until in ((trained_checkpoint, ["\n"]), (random_checkpoint(trained_checkpoint, tmp_path / "r"),
                                                             ["\n", "."])):
        outputs = {}
        for batch_size in (1, 4):
            lm = HFLM(pretrained=str(checkpoint), trust_remote_code=True, batch_size=batch_size, device="cpu")
            _, mask = lm.tok_batch_encode(prompts[:4])  # how lm-eval encodes a batch for generation
            assert bool((mask[:, 0] == 0).any()) and bool((mask[:, -1] == 1).all())  # left padding
            kwargs = {"until": until, "max_gen_toks": 12, "do_sample": False}
            requests = [Instance("generate_until", {}, (prompt, dict(kwargs)), i) for i, prompt in enumerate(prompts)]
            outputs[batch_size] = lm.generate_until(requests, disable_tqdm=True)
        assert outputs[4] == outputs[1]
    # the random model's generations are long and differ between prompts, so padding could not go unnoticed
    assert sum(len(text) > 20 for text in outputs[1]) >= len(prompts) // 2
    assert len(set(outputs[1])) == len(prompts)


@torch.no_grad()
def manual_rolling_logprob(model, token_ids, prefix_id, window):
    """Sum of log p(token) over a document scored in windows of `window` tokens, written from lm-eval's description
    (lm_eval.utils.get_rolling_token_windows, context_len=1): the document is cut into consecutive chunks of
    `window` tokens, each token is predicted exactly once, and a chunk is read from the `window` tokens of
    [prefix] + document that end just before its last token: the first chunk from the prefix, the middle chunks
    with one token of overlap, the last (shorter) chunk with as much earlier text as fits."""
    sequence = [prefix_id] + token_ids  # sequence[i] is what predicts token_ids[i]
    total, windows = 0.0, 0
    for begin in range(0, len(token_ids), window):
        end = min(begin + window, len(token_ids))
        start = max(0, end - window)
        logprobs = model(input_ids=torch.tensor([sequence[start:end]])).logits[0].double().log_softmax(-1)
        rows = torch.arange(begin, end) - start
        total += float(logprobs[rows, torch.tensor(token_ids[begin:end])].sum())
        windows += 1
    return total, windows


def test_loglikelihood_rolling_matches_manual_sliding_windows(trained_checkpoint, reference, tasks_module):
    model, tokenizer = reference
    documents = [doc["text"] for doc in tasks_module.build_perplexity()[:2]]
    window = 64
    lm = HFLM(pretrained=str(trained_checkpoint), trust_remote_code=True, batch_size=4, device="cpu",
              max_length=window)
    assert lm.max_length == window
    reported = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (doc,), i)
                                         for i, doc in enumerate(documents)], disable_tqdm=True)
    for document, logprob in zip(documents, reported, strict=True):
        tokens = encode(tokenizer, document)
        assert len(tokens) % window != 0  # a short last window, which reaches back into the previous chunk
        expected, windows = manual_rolling_logprob(model, tokens, tokenizer.eos_token_id, window)
        assert windows >= 8
        assert logprob == pytest.approx(expected, rel=1e-6, abs=1e-3)
        # and the windows matter: one pass over the whole document (all context) gives a different number
        whole, _ = direct_logprob(model, [tokenizer.eos_token_id], tokens)
        assert abs(whole - expected) > 1e-2


def finite_pack_metrics(results):
    """Check that every task of the pack reports every one of its metrics, finite and in range."""
    for task, keys in PACK_METRICS.items():
        assert task in results, f"{task} missing from {sorted(results)}"
        for key in keys:
            value = results[task][key]
            assert isinstance(value, (int, float)) and math.isfinite(value), (task, key, value)
            if key.startswith(("acc", "exact_match")):
                assert 0 <= value <= 1
            elif key.startswith("chrf"):
                assert 0 <= value <= 100
            else:
                assert value > 0
    return True


def run(command, cwd, timeout=300, pythonpath=REPO, path=None):
    env = {**os.environ, **OFFLINE, "PYTHONPATH": os.pathsep.join(filter(None, [str(pythonpath),
                                                                                os.environ.get("PYTHONPATH")]))}
    if path:
        env["PATH"] = os.pathsep.join([str(path), env.get("PATH", "")])
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} failed ({result.returncode}):\n{result.stdout[-3000:]}\n" \
                                   f"{result.stderr[-6000:]}"
    return result


def readme_command(program):
    """The README's command line that starts with `program` (continuation lines joined, comment dropped)."""
    for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith(program + " "):
                return re.sub(r"\s+#.*$", "", line)
    raise AssertionError(f"no `{program}` command in README.md")


@pytest.fixture(scope="module")
def installed_package(tmp_path_factory):
    """The package as a non-editable install has it: a wheel built from the source (setup.cfg decides which files
    ship) and unpacked into a folder of its own."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "linear_decay", source / "linear_decay", ignore=shutil.ignore_patterns("__pycache__"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
         str(root / "dist"), str(source)], cwd=root)
    wheels = list((root / "dist").glob("*.whl"))
    assert len(wheels) == 1, wheels
    site = root / "site"
    zipfile.ZipFile(wheels[0]).extractall(site)
    shipped = sorted(p.name for p in (site / "linear_decay" / "eval_tasks").iterdir())
    assert {"__main__.py", "shakespeare_tasks.py", "shakespeare.yaml"} <= set(shipped)
    assert {p.name for p in TASKS_DIR.glob("*.yaml")} <= set(shipped)
    return site


@pytest.fixture(scope="module")
def cli_results(trained_checkpoint, installed_package, tmp_path_factory):
    """The README's `lm_eval` command as written (its checkpoint replaced; --limit, --batch_size and --output_path
    added), run by bash from an unrelated folder with the package importable only as a non-editable install."""
    workdir = tmp_path_factory.mktemp("lm_eval_cli")
    bin_dir = workdir / "bin"  # `python` and `lm_eval` of this interpreter, whatever PATH holds
    bin_dir.mkdir()
    for name, runs in (("python", ""), ("lm_eval", " -m lm_eval")):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}"{runs} "$@"\n')
        (bin_dir / name).chmod(0o755)
    command = readme_command("lm_eval")
    assert "outputs/tiny-gla" in command and "--include_path" in command
    command = command.replace("outputs/tiny-gla", str(trained_checkpoint))
    command += f" --limit {CLI_LIMIT} --batch_size 4 --output_path out"
    result = run(["bash", "-xc", command], cwd=workdir, pythonpath=installed_package, path=bin_dir)
    # bash -x shows the command after expansion: the task pack came from the installed package
    assert f"--include_path {installed_package / 'linear_decay' / 'eval_tasks'} " in result.stderr, \
        result.stderr[:2000]
    files = sorted((workdir / "out").rglob("results_*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_lm_eval_cli_runs_the_offline_pack(cli_results):
    results = cli_results["results"]
    assert finite_pack_metrics(results)
    assert sorted(cli_results["group_subtasks"]["shakespeare"]) == sorted(PACK_METRICS)
    assert all(results[task]["sample_len"] == CLI_LIMIT for task in PACK_METRICS)


def test_evaluate_example_writes_results_into_checkpoint(trained_checkpoint, cli_results, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(trained_checkpoint, checkpoint)
    output = tmp_path / "full" / "results.json"
    result = run([sys.executable, str(EVALUATE), str(checkpoint), "--limit", str(CLI_LIMIT), "--batch_size", "4",
                  "--device", "cpu", "--output", str(output), "--write_to_checkpoint"], cwd=tmp_path)
    assert "shakespeare_perplexity" in result.stdout and "bits_per_byte" in result.stdout  # the table

    written = json.loads((checkpoint / "lm_eval_results.json").read_text())
    assert finite_pack_metrics(written)
    assert json.loads(output.read_text())["results"] == written
    # the wrapper evaluates exactly what the CLI does
    for task, keys in PACK_METRICS.items():
        for key in keys:
            assert written[task][key] == pytest.approx(cli_results["results"][task][key], rel=1e-6), (task, key)
    # ... and the refreshed model card carries them in its model-index
    card = (checkpoint / "README.md").read_text()
    assert "model-index:" in card and "shakespeare_next_line" in card and "bits_per_byte" in card


def test_evaluate_example_reports_a_missing_checkpoint(tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    result = subprocess.run([sys.executable, str(EVALUATE), str(missing)], capture_output=True, text=True,
                            timeout=120, env={**os.environ, **OFFLINE})
    assert result.returncode == 2
    assert f"no such folder: {missing}" in result.stderr


def test_task_pack_is_deterministic_and_held_out(tasks_module):
    corpus = CORPUS.read_text(encoding="utf-8")
    builders = {"next_line": tasks_module.build_next_line, "cloze": tasks_module.build_cloze,
                "perplexity": tasks_module.build_perplexity, "continuation": tasks_module.build_continuation}
    built = {name: build() for name, build in builders.items()}
    assert {name: builder() for name, builder in builders.items()} == built
    assert built == {name: getattr(load_task_module(), f"build_{name}")() for name in builders}  # fresh import
    assert {name: len(items) for name, items in built.items()} == {"next_line": 100, "cloze": 100, "perplexity": 45,
                                                                   "continuation": 100}
    dataset = tasks_module.next_line_dataset(version=1.0, pretrained="ignored")["test"]
    assert dataset.to_list() == built["next_line"]

    # the held-out tail starts after everything the quickstart trains on (the first 98 % of the corpus tokens)
    start, text = tasks_module.held_out()
    tokenizer = AutoTokenizer.from_pretrained(REPO / "linear_decay" / "data" / "tokenizer")
    tokens = load_bundled_tokens(tokenizer)
    tail = tokenizer.decode([t for t in tokens[int(len(tokens) * 0.98):] if t != tokenizer.eos_token_id])
    assert corpus.endswith(tail)
    assert start >= len(corpus) - len(tail)
    assert corpus[start:].rstrip("\n") == text

    for item in built["next_line"]:
        assert item["offset"] >= start
        assert item["label"] in range(4) and len(set(item["choices"])) == 4
        true_line = item["choices"][item["label"]]
        assert corpus[item["offset"]:].startswith(true_line + "\n")
        assert corpus[:item["offset"]].endswith(item["context"] + "\n")
    for item in built["cloze"]:
        assert item["offset"] >= start and item["target"].startswith(" ")
        assert corpus[:item["offset"]].endswith(item["context"] + " ")
        assert corpus[item["offset"]:].startswith(item["target"][1:])
    for item in built["continuation"]:
        assert item["offset"] >= start and item["target"]
        line = corpus[item["offset"]:].split("\n", 1)[0]
        assert line == item["context"].split("\n")[-1] + " " + item["target"]
    for item in built["perplexity"]:
        assert item["offset"] >= start and corpus[item["offset"]:].startswith(item["text"])
    assert sum(len(item["text"]) for item in built["perplexity"]) >= 0.95 * len(text)
