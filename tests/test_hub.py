"""A Hub round trip on loopback: `push_to_hub` of a trained tiny model and its tokenizer to a local Hub, then
`from_pretrained(repo_id, trust_remote_code=True)` in a fresh process that cannot import the package.

The local Hub (tests/hub_server): olah, from PyPI, serves the Hub's read API from git repositories, offline; a small
gateway in front of it accepts `create_repo` and commits and writes them into those repositories. Both listen on
127.0.0.1 only; the clients are the real `transformers` / `huggingface_hub` calls with `HF_ENDPOINT` set. Pushes
and pulls run in subprocesses because `huggingface_hub` reads HF_ENDPOINT (and conftest's HF_HUB_OFFLINE) at import.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import linear_decay

from conftest import WITHOUT_PACKAGE, relative_error

pytest.importorskip("olah", reason="the local Hub needs olah (pip install -e '.[test]')")
if shutil.which("git") is None:
    pytest.skip("the local Hub keeps its repositories in git, which is not installed", allow_module_level=True)

from hub_server import local_hub  # noqa: E402

pytestmark = pytest.mark.slow  # a local Hub server and clients in subprocesses

REPO_ROOT = Path(linear_decay.__file__).resolve().parent.parent
REPO_ID = "linear-decay-test/tiny"
TEXT = "HELENA. Our remedies oft in ourselves do lie,\nWhich we ascribe to heaven."
PROMPT_TOKENS, NEW_TOKENS = 8, 8
CODE_FILES = ("configuration_linear_decay.py", "modeling_linear_decay.py", "decay.py", "recurrence.py",
              "generation.py", "checkpoint.py", "loss.py")

PUSH_SCRIPT = textwrap.dedent(
    """
    import json, sys

    import linear_decay  # noqa: F401  (the trainer's side: the package is installed)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint, repo_id, output = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    commits = {"model": model.push_to_hub(repo_id).oid, "tokenizer": tokenizer.push_to_hub(repo_id).oid}
    with open(output, "w") as f:
        json.dump(commits, f)
    """
)

PULL_SCRIPT = WITHOUT_PACKAGE + textwrap.dedent(
    """
    import json

    import torch
    from huggingface_hub import HfApi, hf_hub_download
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    repo_id, text, prompt_tokens, new_tokens, output = sys.argv[2:]
    model = AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(repo_id)
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    prompt = ids[:, :int(prompt_tokens)]
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=int(new_tokens),
                               do_sample=False)
    api = HfApi()
    with open(hf_hub_download(repo_id, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    with open(hf_hub_download(repo_id, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    torch.save({"ids": ids, "logits": logits, "generated": generated, "model_module": type(model).__module__,
                "linear_decay_loaded": "linear_decay" in sys.modules, "files": api.list_repo_files(repo_id),
                "sha": api.model_info(repo_id).sha, "readme": readme, "config": config}, output)
    """
)


def client_env(hub, hf_home):
    """The environment of a Hub client: this session's HF_* / offline switches and Python settings left out."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_", "PYTHON"))}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(hf_home), HF_TOKEN="hf_local_test_token",
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    return env


def run_client(command, work, env, hub):
    # stdin from /dev/null: an interactive prompt (transformers asks about trust_remote_code) fails at once
    result = subprocess.run(command, cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=300)
    report = (f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-6000:]}\n"
              f"--- gateway log\n{hub.gateway_log.read_text()[-3000:]}\n"
              f"--- olah log\n{hub.olah_log.read_text()[-3000:]}")
    return result, report


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with local_hub(tmp_path_factory.mktemp("hub")) as hub:
        yield hub


@pytest.fixture(scope="module")
def pushed(hub, trained_checkpoint, tmp_path_factory):
    """The commit ids of `model.push_to_hub(REPO_ID)` and `tokenizer.push_to_hub(REPO_ID)`."""
    work = tmp_path_factory.mktemp("push")
    (work / "push.py").write_text(PUSH_SCRIPT)
    env = {**client_env(hub, work / "hf_home"), "PYTHONPATH": str(REPO_ROOT)}
    result, report = run_client([sys.executable, str(work / "push.py"), str(trained_checkpoint), REPO_ID,
                                 str(work / "commits.json")], work, env, hub)
    assert result.returncode == 0, report
    return json.loads((work / "commits.json").read_text())


@pytest.fixture(scope="module")
def pulled(hub, pushed, tmp_path_factory):
    """Load REPO_ID from the local Hub in an isolated interpreter with an empty cache; returns (result, report,
    outputs)."""
    work = tmp_path_factory.mktemp("pull")
    (work / "pull.py").write_text(PULL_SCRIPT)
    output = work / "outputs.pt"
    # -I: isolated mode, no PYTHONPATH, no user site, no script/cwd directory tricks
    result, report = run_client([sys.executable, "-I", str(work / "pull.py"), str(REPO_ROOT), REPO_ID, TEXT,
                                 str(PROMPT_TOKENS), str(NEW_TOKENS), str(output)],
                                work, client_env(hub, work / "hf_home"), hub)
    return result, report, torch.load(output) if output.exists() else None


@pytest.fixture(scope="module")
def reference(trained_checkpoint):
    """Token ids, logits and greedy continuation of TEXT from the checkpoint, loaded in this process."""
    model = AutoModelForCausalLM.from_pretrained(trained_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(trained_checkpoint)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    prompt = ids[:, :PROMPT_TOKENS]
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                               do_sample=False)
    return {"ids": ids, "logits": logits, "generated": generated}


def outputs_of(pulled):
    result, report, outputs = pulled
    assert result.returncode == 0 and outputs is not None, report
    return outputs


def test_push_to_hub_commits_into_the_repository_olah_serves(hub, pushed):
    commits = [line.split(" ", 1) for line in hub.git(REPO_ID, "log", "--format=%H %s", "main").splitlines()]
    assert commits[0] == [pushed["tokenizer"], "Upload tokenizer"], commits
    assert [pushed["model"], "Upload model"] in commits, commits
    files = hub.git(REPO_ID, "ls-tree", "-r", "--name-only", "main").split()
    for name in (*CODE_FILES, "config.json", "generation_config.json", "model.safetensors", "README.md",
                 "tokenizer.json", "tokenizer_config.json"):
        assert name in files, f"{name} was not pushed: {files}"
    # the weights are a plain git blob (no LFS pointer): olah serves them from git as they are
    assert int(hub.git(REPO_ID, "cat-file", "-s", "main:model.safetensors")) > 100_000


def test_pull_runs_in_a_process_that_cannot_import_the_package(pulled):
    result, report, _ = pulled
    assert "LINEAR_DECAY_IMPORTABLE" not in result.stdout, (
        "the isolated interpreter can import linear_decay (installed into the venv?): remote-code loading would "
        f"not be tested.\n{report}"
    )
    assert "LINEAR_DECAY_NOT_IMPORTABLE" in result.stdout, report
    outputs = outputs_of(pulled)
    assert outputs["model_module"].startswith("transformers_modules"), outputs["model_module"]
    assert not outputs["linear_decay_loaded"]


def test_pulled_model_and_tokenizer_give_the_same_logits(pulled, reference):
    outputs = outputs_of(pulled)
    assert torch.equal(outputs["ids"], reference["ids"])
    assert outputs["logits"].shape == reference["logits"].shape
    assert (outputs["logits"] - reference["logits"]).abs().max().item() <= 1e-6
    assert relative_error(outputs["logits"], reference["logits"]) <= 1e-6
    assert outputs["generated"].shape == (1, PROMPT_TOKENS + NEW_TOKENS)
    assert torch.equal(outputs["generated"], reference["generated"])


def test_pulled_repository_has_code_config_tokenizer_and_card(pulled, pushed):
    outputs = outputs_of(pulled)
    files = set(outputs["files"])
    expected = {*CODE_FILES, "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "README.md"}
    assert expected <= files, f"missing from the Hub repository: {sorted(expected - files)}"
    assert outputs["sha"] == pushed["tokenizer"]  # the pull saw the last push
    assert outputs["config"]["auto_map"] == {
        "AutoConfig": "configuration_linear_decay.LinearDecayConfig",
        "AutoModel": "modeling_linear_decay.LinearDecayModel",
        "AutoModelForCausalLM": "modeling_linear_decay.LinearDecayForCausalLM",
    }


def test_pulled_model_card_metadata(pulled):
    from huggingface_hub import ModelCard

    card = ModelCard(outputs_of(pulled)["readme"])
    assert card.data.library_name == "transformers", card.data
    assert card.data.pipeline_tag == "text-generation", card.data
    assert "linear-decay" in (card.data.tags or []), card.data


def test_olah_served_the_downloads(hub, pulled):
    outputs_of(pulled)
    served = set(re.findall(rf'"GET /{re.escape(REPO_ID)}/resolve/[^/ ]+/([^ ]+) HTTP', hub.olah_log.read_text()))
    for name in ("model.safetensors", "config.json", "modeling_linear_decay.py", "tokenizer.json"):
        assert name in served, f"olah did not serve {name}: {sorted(served)}"


def test_push_to_hub_example_uploads_the_checkpoint_folder_and_leaves_training_state(hub, trained_checkpoint,
                                                                                    tmp_path):
    """`examples/push_to_hub.py` on a run_clm-style output folder: model, tokenizer, code and a card naming the repo
    go up; intermediate checkpoints, optimizer state and logs stay local."""
    repo_id = "linear-decay-test/tiny-example"
    folder = tmp_path / "run"
    shutil.copytree(trained_checkpoint, folder)
    (folder / "checkpoint-4").mkdir()
    (folder / "checkpoint-4" / "optimizer.pt").write_bytes(b"state")
    (folder / "training_args.bin").write_bytes(b"args")
    (folder / "runs").mkdir()
    (folder / "runs" / "events.out").write_text("log")
    env = {**client_env(hub, tmp_path / "hf_home"), "PYTHONPATH": str(REPO_ROOT)}
    result, report = run_client([sys.executable, str(REPO_ROOT / "examples" / "push_to_hub.py"), str(folder), repo_id],
                                tmp_path, env, hub)
    assert result.returncode == 0, report

    files = set(hub.git(repo_id, "ls-tree", "-r", "--name-only", "main").split())
    expected = {*CODE_FILES, "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "README.md"}
    assert expected <= files, f"missing: {sorted(expected - files)}"
    assert not {name for name in files if name.startswith(("checkpoint-", "runs/", "training_args"))}, files
    card = hub.git(repo_id, "show", "main:README.md")
    assert repo_id in card  # the card was refreshed for the repository it now lives in
    for name in ("model.safetensors", "tokenizer.json"):  # byte for byte
        local = subprocess.run(["git", "hash-object", str(folder / name)], check=True, capture_output=True,
                               text=True).stdout.strip()
        assert hub.git(repo_id, "rev-parse", f"main:{name}").strip() == local, name
