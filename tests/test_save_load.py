"""save_pretrained / from_pretrained, the Auto classes, and loading as remote code where the package is not importable.

The reference for every reload is the in-memory model that was saved: same logits on the same inputs.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import linear_decay
from linear_decay import LinearDecayConfig, LinearDecayForCausalLM, LinearDecayModel

from conftest import perturbed_model, relative_error, tiny_config

REPO_ROOT = Path(linear_decay.__file__).resolve().parent.parent
CODE_FILES = ("configuration_linear_decay.py", "modeling_linear_decay.py", "decay_linear_decay.py",
              "recurrence_linear_decay.py")

# Diverse points: data-dependent vector decay with HGRN2's learned lower bound, shared keys with LightNet's running
# normaliser and rope, a learned static decay with TPE, lrpe (doubled key dim) with tied embeddings.
COMBOS = {
    "hgrn2-vector-lower_bound": dict(decay_type="hgrn2", decay_granularity="vector", hgrn2_lower_bound=True),
    "lightnet-shared-rope": dict(decay_type="lightnet", decay_granularity="vector", share_decay=True,
                                 position_encoding="rope"),
    "tnl_l-scalar-tpe": dict(decay_type="tnl_l", decay_granularity="scalar", position_encoding="tpe"),
    "mamba2-lrpe-tied": dict(decay_type="mamba2", position_encoding="lrpe", tie_word_embeddings=True),
}
REMOTE_COMBOS = ["hgrn2-vector-lower_bound", "lightnet-shared-rope", "tnl_l-scalar-tpe"]


def make_model(name):
    return perturbed_model(tiny_config(**COMBOS[name]), seed=1).eval()


def sample_ids():
    return torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(0))


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("name", list(COMBOS))
def test_save_pretrained_roundtrip_is_exact(name, tmp_path):
    model = make_model(name)
    model.save_pretrained(tmp_path)

    assert (tmp_path / "model.safetensors").is_file()
    assert not (tmp_path / "pytorch_model.bin").exists()
    assert not list(tmp_path.glob("*.bin"))

    reloaded = LinearDecayForCausalLM.from_pretrained(tmp_path).eval()
    ids = sample_ids()
    assert torch.equal(logits_of(reloaded, ids), logits_of(model, ids))
    original_state = model.state_dict()
    reloaded_state = reloaded.state_dict()
    assert original_state.keys() == reloaded_state.keys()
    for key, value in original_state.items():
        assert torch.equal(reloaded_state[key], value), key
    for field in ("decay_type", "decay_granularity", "share_decay", "position_encoding", "hgrn2_lower_bound",
                  "tie_word_embeddings", "head_dim", "intermediate_size", "decay_rank", "key_dim"):
        assert getattr(reloaded.config, field) == getattr(model.config, field), field


def test_tied_embeddings_stay_tied_after_reload(tmp_path):
    model = make_model("mamba2-lrpe-tied")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    reloaded = LinearDecayForCausalLM.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


def test_untied_embeddings_stay_untied_after_reload(tmp_path):
    model = make_model("hgrn2-vector-lower_bound")
    assert not model.config.tie_word_embeddings
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    model.save_pretrained(tmp_path)
    reloaded = LinearDecayForCausalLM.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight.data_ptr() != reloaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_config_json_has_auto_map_for_all_auto_classes(tmp_path):
    make_model("lightnet-shared-rope").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "linear_decay"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_linear_decay.LinearDecayConfig",
        "AutoModel": "modeling_linear_decay.LinearDecayModel",
        "AutoModelForCausalLM": "modeling_linear_decay.LinearDecayForCausalLM",
    }


def test_code_files_are_copied_next_to_the_weights(tmp_path):
    make_model("lightnet-shared-rope").save_pretrained(tmp_path)
    package_dir = REPO_ROOT / "linear_decay"
    for name in CODE_FILES:
        copied = tmp_path / name
        assert copied.is_file(), f"{name} was not copied next to the weights"
        assert copied.read_text() == (package_dir / name).read_text()
    # every relative import of the copied code resolves to a copied file
    for source in CODE_FILES:
        for line in (tmp_path / source).read_text().splitlines():
            if line.lstrip().startswith("from ."):
                module = line.split()[1].lstrip(".")
                assert (tmp_path / f"{module}.py").is_file(), f"{source} imports .{module}, which was not copied"


def test_auto_classes_load_the_package_classes(tmp_path):
    model = make_model("tnl_l-scalar-tpe")
    model.save_pretrained(tmp_path)

    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is LinearDecayConfig
    assert config.to_dict()["decay_type"] == "tnl_l"

    causal = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(causal) is LinearDecayForCausalLM
    ids = sample_ids()
    assert torch.equal(logits_of(causal, ids), logits_of(model, ids))

    base = AutoModel.from_pretrained(tmp_path).eval()
    assert type(base) is LinearDecayModel
    with torch.no_grad():
        hidden = base(ids, use_cache=False).last_hidden_state
        expected = model.model(ids, use_cache=False).last_hidden_state
    assert torch.equal(hidden, expected)

    prompt = ids[:, :5]
    assert torch.equal(causal.generate(prompt, max_new_tokens=6, do_sample=False),
                       model.generate(prompt, max_new_tokens=6, do_sample=False))


# ---------------------------------------------------------------------------------------------------------------
# Remote code: a fresh interpreter that cannot import the package
# ---------------------------------------------------------------------------------------------------------------

REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.util, os, sys

    repo_root = os.path.realpath(sys.argv[1])
    # Nothing may reach the package: drop the repository from sys.path and any editable-install finder.
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != repo_root]
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in repr(f) and "editable" not in
                        type(f).__module__]
    if importlib.util.find_spec("linear_decay") is not None:
        print("LINEAR_DECAY_IMPORTABLE", importlib.util.find_spec("linear_decay").origin)
        sys.exit(3)
    print("LINEAR_DECAY_NOT_IMPORTABLE")

    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    torch.set_num_threads(1)
    for path in sys.argv[2:]:
        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        inputs = torch.load(os.path.join(path, "inputs.pt"))
        with torch.no_grad():
            logits = model(inputs, use_cache=False).logits
        generated = model.generate(inputs[:, :5], max_new_tokens=8, do_sample=False)
        try:  # the base model too; recorded rather than raised so the causal LM results still come back
            base = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
            with torch.no_grad():
                base_result = base(inputs, use_cache=False).last_hidden_state
        except Exception as error:
            base_result = f"{type(error).__name__}: {error}"
        torch.save({"logits": logits, "generated": generated, "model_module": type(model).__module__,
                    "config_module": type(config).__module__, "base_result": base_result,
                    "linear_decay_loaded": "linear_decay" in sys.modules},
                   os.path.join(path, "remote_outputs.pt"))
    """
)


@pytest.fixture(scope="module")
def remote_run(tmp_path_factory):
    """Save the REMOTE_COMBOS models, then load all of them in one isolated subprocess."""
    root = tmp_path_factory.mktemp("remote")
    models, paths = {}, []
    for name in REMOTE_COMBOS:
        model = make_model(name)
        path = root / name
        model.save_pretrained(path)
        torch.save(sample_ids(), path / "inputs.pt")
        models[name] = model
        paths.append(str(path))
    script = root / "load_remote.py"
    script.write_text(REMOTE_SCRIPT)
    workdir = root / "cwd"
    workdir.mkdir()

    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(root / "hf_home"),
               HF_MODULES_CACHE=str(root / "hf_modules"), OMP_NUM_THREADS="1")
    # -I: isolated mode, no PYTHONPATH, no user site, no script/cwd directory tricks
    result = subprocess.run([sys.executable, "-I", str(script), str(REPO_ROOT), *paths], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=300)
    return models, root, result


def test_remote_subprocess_cannot_import_the_package(remote_run):
    _, _, result = remote_run
    assert "LINEAR_DECAY_IMPORTABLE" not in result.stdout, (
        "the isolated interpreter can import linear_decay (installed into the venv?): remote-code loading would "
        f"not be tested. stdout: {result.stdout}"
    )
    assert "LINEAR_DECAY_NOT_IMPORTABLE" in result.stdout, result.stdout + result.stderr
    assert result.returncode == 0, result.stderr[-5000:]


@pytest.mark.parametrize("name", REMOTE_COMBOS)
def test_remote_code_load_matches_in_process_model(remote_run, name):
    models, root, result = remote_run
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    outputs = torch.load(root / name / "remote_outputs.pt")
    assert outputs["model_module"].startswith("transformers_modules"), outputs["model_module"]
    assert outputs["config_module"].startswith("transformers_modules"), outputs["config_module"]
    assert not outputs["linear_decay_loaded"]

    model = models[name]
    ids = torch.load(root / name / "inputs.pt")
    assert relative_error(outputs["logits"], logits_of(model, ids)) <= 1e-6
    expected = model.generate(ids[:, :5], max_new_tokens=8, do_sample=False)
    assert outputs["generated"].shape == (2, 13)
    assert torch.equal(outputs["generated"], expected)


@pytest.mark.parametrize("name", REMOTE_COMBOS[:1])
def test_remote_code_auto_model_loads_the_base_model(remote_run, name):
    """config.json's auto_map must name AutoModel too, or the base model cannot be loaded as remote code."""
    models, root, result = remote_run
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    outputs = torch.load(root / name / "remote_outputs.pt")
    base_result = outputs["base_result"]
    assert not isinstance(base_result, str), (
        f"AutoModel.from_pretrained(trust_remote_code=True) failed: {str(base_result)[:300]}"
    )
    with torch.no_grad():
        expected = models[name].model(torch.load(root / name / "inputs.pt"), use_cache=False).last_hidden_state
    assert relative_error(base_result, expected) <= 1e-6
