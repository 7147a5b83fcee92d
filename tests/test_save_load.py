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
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import linear_decay
from linear_decay import LinearDecayConfig, LinearDecayForCausalLM, LinearDecayModel
from linear_decay.configuration_linear_decay import DESIGN_FIELDS

from conftest import WITHOUT_PACKAGE, perturbed_model, relative_error, tiny_config

REPO_ROOT = Path(linear_decay.__file__).resolve().parent.parent
CODE_FILES = ("configuration_linear_decay.py", "modeling_linear_decay.py", "decay.py", "recurrence.py",
              "generation.py", "checkpoint.py", "loss.py")

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
# The design in the safetensors metadata: a config.json edited after saving is an error
# ---------------------------------------------------------------------------------------------------------------

# What a weight shape never shows: the four design choices, and the fields of the forward pass that own no parameter.
DESIGN = ("decay_type", "decay_granularity", "share_decay", "position_encoding", "hgrn2_lower_bound",
          "gla_denominator", "num_heads", "rope_theta", "rope_fraction", "use_output_gate", "attention_scale",
          "rms_norm_eps", "tie_word_embeddings")


def header_metadata(path):
    """A safetensors file's metadata, read with the safetensors library itself."""
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def recorded_design(path):
    return json.loads(header_metadata(path)["linear_decay_design"])


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_design_fields_are_the_documented_ones():
    assert DESIGN_FIELDS == DESIGN


@pytest.mark.parametrize("name", list(COMBOS))
def test_save_pretrained_records_the_design_in_the_safetensors_metadata(name, tmp_path):
    model = make_model(name)
    model.save_pretrained(tmp_path)
    metadata = header_metadata(tmp_path / "model.safetensors")
    assert metadata["format"] == "pt"  # transformers' own entry is kept
    expected = {field: getattr(model.config, field) for field in DESIGN}
    assert recorded_design(tmp_path / "model.safetensors") == expected
    assert expected["decay_type"] == COMBOS[name]["decay_type"]


def test_every_shard_of_a_sharded_checkpoint_records_the_design(tmp_path):
    model = make_model("hgrn2-vector-lower_bound")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    for shard in shards:
        assert recorded_design(shard)["decay_type"] == "hgrn2", shard.name
    edit_config(tmp_path, gla_denominator=8.0)
    with pytest.raises(ValueError, match=r"gla_denominator=16\.0.*gla_denominator=8\.0"):
        LinearDecayForCausalLM.from_pretrained(tmp_path)


# Edits that change every logit but no parameter name or shape: what loading would silently accept.
SILENT_EDITS = [
    (dict(decay_type="gla"), "position_encoding", "rope"),
    (dict(decay_type="gla"), "position_encoding", "lrpe"),
    (dict(decay_type="gla"), "decay_type", "lightnet"),
    (dict(decay_type="gla"), "gla_denominator", 4.0),
    (dict(decay_type="mamba2", position_encoding="rope"), "rope_theta", 500.0),
    (dict(decay_type="simple"), "attention_scale", 0.5),
    (dict(decay_type="tnl", decay_granularity="scalar", use_output_gate=False), "num_heads", 4),
]


@pytest.mark.parametrize("design, field, edited", SILENT_EDITS,
                         ids=[f"{field}={edited}" for _, field, edited in SILENT_EDITS])
def test_config_edited_after_saving_is_an_error_naming_field_and_both_values(design, field, edited, tmp_path):
    model = perturbed_model(tiny_config(**design), seed=3).eval()
    model.save_pretrained(tmp_path)
    saved = getattr(model.config, field)
    changes = {field: edited, **({"head_dim": 32 // edited} if field == "num_heads" else {})}
    edit_config(tmp_path, **changes)

    with pytest.raises(ValueError) as error:
        LinearDecayForCausalLM.from_pretrained(tmp_path)
    message = str(error.value)
    assert f"saved with {field}={saved!r}" in message and f"config has {field}={edited!r}" in message, message
    assert "config.json edited" in message
    with pytest.raises(ValueError, match=f"{field}="):
        AutoModelForCausalLM.from_pretrained(tmp_path)

    # the edit is one no parameter betrays: forced through, the model loads and computes something else
    forced = LinearDecayForCausalLM.from_pretrained(tmp_path, ignore_mismatched_sizes=True).eval()
    assert getattr(forced.config, field) == edited
    for key, value in model.state_dict().items():
        assert torch.equal(forced.state_dict()[key], value), key
    ids = sample_ids()
    assert relative_error(logits_of(forced, ids), logits_of(model, ids)) > 1e-5  # the same design reloads exactly


def test_an_edit_that_also_changes_parameters_names_both(tmp_path):
    """decay_type mamba2 -> gla: the metadata names the field, the parameter check the orphaned A_log / dt_bias."""
    make_model("mamba2-lrpe-tied").save_pretrained(tmp_path)
    edit_config(tmp_path, decay_type="gla")
    with pytest.raises(ValueError) as error:
        LinearDecayForCausalLM.from_pretrained(tmp_path)
    message = str(error.value)
    assert "do not match its config" in message and "decay_type='gla'" in message
    assert "saved with decay_type='mamba2'" in message and "A_log" in message


def test_an_edit_that_changes_a_parameter_size_names_the_field(tmp_path):
    """num_heads 2 -> 4 also resizes the output gate (d -> head_dim): transformers stops on the size mismatch, and the
    error says which recorded field the config contradicts."""
    perturbed_model(tiny_config(decay_type="gla"), seed=3).save_pretrained(tmp_path)
    edit_config(tmp_path, num_heads=4, head_dim=8)
    with pytest.raises(ValueError, match=r"saved with num_heads=2, the config has num_heads=4"):
        LinearDecayForCausalLM.from_pretrained(tmp_path)


def test_checkpoint_without_design_metadata_still_loads(tmp_path):
    """Checkpoints written before the design was recorded: the weights file has transformers' metadata only."""
    model = make_model("lightnet-shared-rope")
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})
    assert "linear_decay_design" not in header_metadata(weights)
    reloaded = LinearDecayForCausalLM.from_pretrained(tmp_path).eval()
    ids = sample_ids()
    assert torch.equal(logits_of(reloaded, ids), logits_of(model, ids))


def test_design_is_added_when_transformers_writes_around_the_hook(tmp_path, monkeypatch):
    """Should a transformers version not save through `safe_save_file`, the metadata is added to the written files."""
    from safetensors.torch import save_file as plain_save_file
    from transformers import modeling_utils

    import linear_decay.checkpoint as checkpoint

    monkeypatch.setattr(modeling_utils, "safe_save_file", plain_save_file)
    monkeypatch.setattr(checkpoint, "install_save_metadata_hook", lambda: None)
    model = make_model("tnl_l-scalar-tpe")
    model.save_pretrained(tmp_path)
    assert recorded_design(tmp_path / "model.safetensors")["position_encoding"] == "tpe"
    reloaded = LinearDecayForCausalLM.from_pretrained(tmp_path).eval()
    ids = sample_ids()
    assert torch.equal(logits_of(reloaded, ids), logits_of(model, ids))


def test_trainer_checkpoints_record_the_design(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = perturbed_model(tiny_config(decay_type="gla"), seed=4)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    train = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, save_steps=2,
                             logging_steps=100, report_to=[], use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=train).train()
    checkpoint = tmp_path / "checkpoint-2"
    assert recorded_design(checkpoint / "model.safetensors")["decay_type"] == "gla"
    edit_config(checkpoint, position_encoding="rope")
    with pytest.raises(ValueError, match="saved with position_encoding='none'"):
        LinearDecayForCausalLM.from_pretrained(checkpoint)


def test_push_to_hub_uploads_weights_that_record_the_design(tmp_path, monkeypatch):
    import shutil
    from types import SimpleNamespace

    from huggingface_hub import HfApi

    uploaded = tmp_path / "uploaded"
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, folder_path, **kwargs: shutil.copytree(folder_path,
                                                                                                      uploaded))
    make_model("lightnet-shared-rope").push_to_hub("someone/tiny-lightnet")
    design = recorded_design(uploaded / "model.safetensors")
    assert (design["decay_type"], design["share_decay"], design["position_encoding"]) == ("lightnet", True, "rope")


def test_a_hub_checkpoint_is_checked_from_the_local_hub_cache(tmp_path, monkeypatch):
    """`owner/name` loaded offline from the Hub cache: its weights' design is read from the cached files."""
    model = make_model("lightnet-shared-rope")
    snapshot = tmp_path / "cache" / "models--someone--tiny-lightnet" / "snapshots" / ("0" * 40)
    model.save_pretrained(snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = str(tmp_path / "cache")
    reloaded = LinearDecayForCausalLM.from_pretrained("someone/tiny-lightnet", cache_dir=cache).eval()
    ids = sample_ids()
    assert torch.equal(logits_of(reloaded, ids), logits_of(model, ids))
    edit_config(snapshot, position_encoding="none")
    with pytest.raises(ValueError, match="saved with position_encoding='rope'.*config has position_encoding='none'"):
        LinearDecayForCausalLM.from_pretrained("someone/tiny-lightnet", cache_dir=cache)


# ---------------------------------------------------------------------------------------------------------------
# Remote code: a fresh interpreter that cannot import the package
# ---------------------------------------------------------------------------------------------------------------

REMOTE_SCRIPT = WITHOUT_PACKAGE + textwrap.dedent(
    """
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
