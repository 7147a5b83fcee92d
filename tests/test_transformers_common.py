"""transformers' own common tests as the contract of this model family: `ModelTesterMixin`
(tests/test_modeling_common.py), `GenerationTesterMixin` (tests/generation/test_utils.py) and `ConfigTester`
(tests/test_configuration_common.py) of the INSTALLED transformers version, run the way transformers runs them for
Mamba2 (tests/models/mamba2/test_modeling_mamba2.py: a recurrent model without attention weights).

The mixins are not in the transformers wheel. They are read from transformers' source distribution on the package
index (`pip download --no-deps --no-binary :all: transformers==<installed>`, once, cached under
$LINEAR_DECAY_CACHE or ~/.cache/linear_decay/) and imported as the package `_transformers_common_tests`. That sdist
ships only the top-level tests/test_*.py files: tests/generation/test_utils.py (GenerationTesterMixin),
tests/exporters/test_export.py (ExportTesterMixin, a base of ModelTesterMixin) and tests/utils/test_configuration_utils.py
(`config_common_kwargs`) are not in it. Point $TRANSFORMERS_TESTS_DIR at the tests/ folder of a transformers source
checkout of the installed version to run those as well; without it each of them is one skipped test that says so.
Without a package index the whole module is skipped.

Configurations (together: every decay type, both granularities, sharing, every position encoding): the default
(mamba2), gla scalar + rope, tnl + lrpe, hgrn2 + tpe, lightnet shared, and the remaining decay types (the three mamba2
ablations, tnl_l, simple, none). Every configuration runs ConfigTester's checks and the whole of ModelTesterMixin (a few
seconds each on the tiny sizes below); GenerationTesterMixin, the slowest, runs on the default configuration only.
"""

import importlib
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
import types
import unittest
import unittest.mock
from pathlib import Path

import pytest
import torch
import transformers

from linear_decay import DECAY_TYPES, LinearDecayConfig, LinearDecayForCausalLM, LinearDecayModel
from linear_decay.configuration_linear_decay import DECAY_GRANULARITIES, POSITION_ENCODINGS

PACKAGE = "_transformers_common_tests"
VERSION = transformers.__version__
# What test_modeling_common.py / test_configuration_common.py import from their folder but the sdist leaves out.
NOT_IN_SDIST = {
    "generation.test_utils": "GenerationTesterMixin",
    "exporters.test_export": "ExportTesterMixin",
    "utils.test_configuration_utils": "config_common_kwargs",
}


def _cache_dir():
    return Path(os.environ.get("LINEAR_DECAY_CACHE", Path.home() / ".cache" / "linear_decay"))


def _sdist_tests_dir():
    """tests/ of transformers' sdist of the installed version, extracted into the cache (downloaded if needed);
    None and the reason when the package index cannot be reached."""
    root = _cache_dir() / f"transformers-{VERSION}"
    tests = root / "tests"
    if (tests / "test_modeling_common.py").is_file():
        return tests, None
    root.parent.mkdir(parents=True, exist_ok=True)
    archive = root.parent / f"transformers-{VERSION}.tar.gz"
    if not archive.is_file():
        with tempfile.TemporaryDirectory(dir=root.parent) as download:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                       "--disable-pip-version-check", "--retries", "1", "--timeout", "60", "-d", download,
                       f"transformers=={VERSION}"]
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
            fetched = list(Path(download).glob("transformers-*.tar.gz"))
            if result.returncode != 0 or not fetched:
                tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
                return None, f"cannot download transformers=={VERSION}'s sdist from the package index: {tail[0]}"
            os.replace(fetched[0], archive)
    with tempfile.TemporaryDirectory(dir=root.parent) as staging, tarfile.open(archive) as tar:
        prefix = f"transformers-{VERSION}/tests/"
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # no links or absolute paths out
        tar.extractall(staging, members=members, **safe)
        extracted = Path(staging) / f"transformers-{VERSION}"
        (extracted / "tests" / "__init__.py").touch()  # a package: the mixins import their siblings relatively
        try:
            os.replace(extracted, root)
        except OSError:  # extracted meanwhile by a concurrent run
            if not (tests / "test_modeling_common.py").is_file():
                raise
    return tests, None


def _placeholder(module_name, missing):
    """Stand-in for a module the sdist leaves out: the mixin it would define contributes one test that skips with the
    reason, and `config_common_kwargs` skips the one ConfigTester check that reads it."""
    module = types.ModuleType(module_name)
    reason = (f"tests/{module_name.split('.', 1)[1].replace('.', '/')}.py ({missing}) is not in transformers "
              f"{VERSION}'s sdist; set TRANSFORMERS_TESTS_DIR to a transformers checkout's tests/ to run it")

    if missing == "config_common_kwargs":
        class Unavailable(dict):
            def __deepcopy__(self, memo):
                raise unittest.SkipTest(reason)

        module.config_common_kwargs = Unavailable()
        return module

    def test_mixin_available(self):
        self.skipTest(reason)

    setattr(module, missing, type(missing, (), {f"test_{missing}_available": test_mixin_available}))
    return module


def _import_common_tests():
    """((test_modeling_common, test_configuration_common, generation.test_utils), None), the modules the sdist lacks
    replaced by placeholders (`_placeholder`); or (None, the reason to skip this module)."""
    override = os.environ.get("TRANSFORMERS_TESTS_DIR")
    if override:
        tests = Path(override)
        if not all((tests / name).is_file() for name in ("__init__.py", "test_modeling_common.py")):
            return None, f"TRANSFORMERS_TESTS_DIR={override} is not the tests/ package of a transformers checkout"
    else:
        tests, reason = _sdist_tests_dir()
        if tests is None:
            return None, reason
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, tests / "__init__.py",
                                                      submodule_search_locations=[str(tests)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
        for name, missing in NOT_IN_SDIST.items():
            if not (tests / f"{name.replace('.', '/')}.py").is_file():
                parent = f"{PACKAGE}.{name.split('.')[0]}"
                if parent not in sys.modules and not (tests / name.split(".")[0]).is_dir():
                    sys.modules[parent] = types.ModuleType(parent)
                    sys.modules[parent].__path__ = []
                sys.modules[f"{PACKAGE}.{name}"] = _placeholder(f"{PACKAGE}.{name}", missing)
    modeling = importlib.import_module(f"{PACKAGE}.test_modeling_common")
    configuration = importlib.import_module(f"{PACKAGE}.test_configuration_common")
    generation = importlib.import_module(f"{PACKAGE}.generation.test_utils")
    return (modeling, configuration, generation), None


_modules, _reason = _import_common_tests()
if _modules is None:
    pytest.skip(_reason, allow_module_level=True)
common, configuration_common, generation_utils = _modules
ModelTesterMixin, ids_tensor = common.ModelTesterMixin, common.ids_tensor
GenerationTesterMixin = generation_utils.GenerationTesterMixin
ConfigTester = configuration_common.ConfigTester


# ---------------------------------------------------------------------------------------------------------------
# The model tester (the counterpart of Mamba2ModelTester)
# ---------------------------------------------------------------------------------------------------------------

SIZES = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_heads=2, intermediate_size=64, decay_rank=8)


class LinearDecayModelTester:
    def __init__(self, parent, overrides, batch_size=4, seq_length=7, is_training=True, use_labels=True):
        self.parent, self.overrides = parent, dict(overrides)
        self.batch_size, self.seq_length = batch_size, seq_length
        self.is_training, self.use_labels = is_training, use_labels
        self.vocab_size, self.hidden_size = SIZES["vocab_size"], SIZES["hidden_size"]
        self.num_hidden_layers, self.num_heads = SIZES["num_hidden_layers"], SIZES["num_heads"]
        self.num_attention_heads = self.num_heads
        self.pad_token_id = self.bos_token_id = self.eos_token_id = self.vocab_size - 1

    def config_kwargs(self):
        return dict(SIZES, pad_token_id=self.pad_token_id, bos_token_id=self.bos_token_id,
                    eos_token_id=self.eos_token_id, use_cache=True, tie_word_embeddings=False, **self.overrides)

    def get_config(self):
        return LinearDecayConfig(**self.config_kwargs())

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 1)  # no pad token inside
        attention_mask = torch.ones(self.batch_size, self.seq_length, dtype=torch.long, device=input_ids.device)
        attention_mask[0, :1] = 0  # left padding, the only padding a recurrent model supports
        token_labels = ids_tensor([self.batch_size, self.seq_length], self.vocab_size) if self.use_labels else None
        return self.get_config(), input_ids, attention_mask, token_labels

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, attention_mask, _ = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": attention_mask}


# ---------------------------------------------------------------------------------------------------------------
# The test classes
# ---------------------------------------------------------------------------------------------------------------

CONFIGURATIONS = {
    "Mamba2Default": dict(),
    "GlaScalarRope": dict(decay_type="gla", decay_granularity="scalar", position_encoding="rope"),
    "TnlLrpe": dict(decay_type="tnl", position_encoding="lrpe"),
    "Hgrn2Tpe": dict(decay_type="hgrn2", position_encoding="tpe"),
    "LightnetShared": dict(decay_type="lightnet", share_decay=True),
    "Mamba2NoAScalarTpe": dict(decay_type="mamba2_no_a", decay_granularity="scalar", position_encoding="tpe"),
    "Mamba2NoDtRope": dict(decay_type="mamba2_no_dt", position_encoding="rope"),
    "Mamba2NoANoDtLrpe": dict(decay_type="mamba2_no_a_no_dt", position_encoding="lrpe"),
    "TnlLearnableRope": dict(decay_type="tnl_l", position_encoding="rope"),
    "SimpleSharedTpe": dict(decay_type="simple", share_decay=True, position_encoding="tpe"),
    "NoDecay": dict(decay_type="none"),
}
GENERATION_TESTS = {"Mamba2Default"}  # the configurations that run GenerationTesterMixin
CONFIG_CHECKS = (
    "create_and_test_config_common_properties", "create_and_test_config_to_json_string",
    "create_and_test_config_to_json_file", "create_and_test_config_from_and_save_pretrained",
    "create_and_test_config_from_and_save_pretrained_subfolder",
    "create_and_test_config_from_and_save_pretrained_composite", "create_and_test_config_with_num_labels",
    "check_config_arguments_init", "create_and_test_config_from_pretrained_custom_kwargs",
    "check_config_can_be_init_without_params",
)


class LinearDecayCommonTests:
    """What every configuration's test class shares: the tester, the config tests, and the skips (each with its
    reason) of what a recurrent model without attention weights cannot do, as transformers does for Mamba2."""

    all_model_classes = (LinearDecayModel, LinearDecayForCausalLM)
    has_attentions = False  # no attention weights (Mamba2: "Mamba does not support attentions")
    # `test_can_init_all_missing_weights` runs only for models added since 2023, told by a "# Copyright <year>" line
    # that the modeling file does not carry: run it
    test_can_init_all_missing_weights_before_2023 = True
    overrides = {}

    def setUp(self):
        # The mixins tell a task by the class name in transformers' own name mappings (a base model gets no training
        # test, a causal LM gets labels); `AutoModel.register` keeps an out-of-library model elsewhere, so list ours
        # there for the duration of each test, as an in-library model would be listed.
        for mapping, model_class in ((common.MODEL_MAPPING_NAMES, LinearDecayModel),
                                     (common.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, LinearDecayForCausalLM)):
            patcher = unittest.mock.patch.dict(mapping, {LinearDecayConfig.model_type: model_class.__name__})
            patcher.start()
            self.addCleanup(patcher.stop)
        self.model_tester = LinearDecayModelTester(self, self.overrides)
        self.config_tester = ConfigTester(
            self, config_class=LinearDecayConfig, common_properties=["hidden_size", "num_hidden_layers", "num_heads"],
            **self.model_tester.config_kwargs(),
        )

    @unittest.skip(reason="a large model would be necessary (and costly) for that (as Mamba2)")
    def test_multi_gpu_data_parallel_forward(self):
        pass


def _config_test(check):
    def test(self):
        getattr(self.config_tester, check)()

    test.__name__ = f"test_{check}"
    return test


def _test_class(name, overrides):
    bases = [LinearDecayCommonTests, ModelTesterMixin]
    if name in GENERATION_TESTS:
        bases.append(GenerationTesterMixin)
    namespace = {"overrides": overrides, "__module__": __name__, "__qualname__": f"{name}Test"}
    for check in CONFIG_CHECKS:
        test = _config_test(check)
        namespace[test.__name__] = test
    if name not in GENERATION_TESTS:
        namespace["test_generation_tester_mixin_inheritance"] = unittest.skip(
            reason="GenerationTesterMixin runs on the default configuration only (runtime)")(lambda self: None)
    return type(f"{name}Test", (*bases, unittest.TestCase), namespace)


for _name, _overrides in CONFIGURATIONS.items():
    globals()[f"{_name}Test"] = _test_class(_name, _overrides)
del _name, _overrides


def test_configurations_cover_the_design_space():
    configs = [LinearDecayConfig(**SIZES, **overrides) for overrides in CONFIGURATIONS.values()]
    assert {config.decay_type for config in configs} == set(DECAY_TYPES)
    assert {config.decay_granularity for config in configs} == set(DECAY_GRANULARITIES)
    assert {config.share_decay for config in configs} == {False, True}
    assert {config.position_encoding for config in configs} == set(POSITION_ENCODINGS)
