"""The design a checkpoint was saved with, recorded in its safetensors metadata (`configuration_linear_decay.
DESIGN_FIELDS`), and the checks `from_pretrained` makes with it: a config.json that contradicts its weights is an
error naming the field, while a partial checkpoint of the same design loads as transformers loads it.
"""

import contextlib
import contextvars
import functools
import json
import os
import re
import shutil

from .configuration_linear_decay import DESIGN_FIELDS, DESIGN_METADATA_KEY
from .decay import DECAY_REGISTRY

# The metadata that weights files written in this context get besides transformers' own (None: none).
SAVE_METADATA = contextvars.ContextVar("linear_decay_save_metadata", default=None)


def install_save_metadata_hook():
    """transformers' save_pretrained writes every safetensors file through `modeling_utils.safe_save_file`, with a
    metadata dict of its own that it offers no way to extend. Wrap that function once: while `SAVE_METADATA` is set
    (by `_save_with_design`, for this thread or task only) the files get its entries too; every other call passes
    through unchanged."""
    from transformers import modeling_utils

    current = layer = getattr(modeling_utils, "safe_save_file", None)
    while layer is not None:
        if getattr(layer, "linear_decay_metadata", None) is SAVE_METADATA:
            return
        layer = getattr(layer, "__wrapped__", None)
    if current is None:
        return

    @functools.wraps(current)
    def safe_save_file(tensors, filename, metadata=None, *args, **kwargs):
        extra = SAVE_METADATA.get()
        if extra:
            metadata = {**(metadata or {}), **extra}
        return current(tensors, filename, metadata, *args, **kwargs)

    safe_save_file.linear_decay_metadata = SAVE_METADATA
    modeling_utils.safe_save_file = safe_save_file


def _with_variant(name, variant):
    """transformers' weights file names: model.safetensors -> model.VARIANT.safetensors (likewise the index)."""
    if not variant:
        return name
    parts = name.split(".")
    return ".".join([*parts[:-1], variant, parts[-1]])


def weight_files(directory, variant=None):
    """The safetensors files of the checkpoint saved in a local `directory` (all shards), [] if there are none."""
    index = os.path.join(directory, _with_variant("model.safetensors.index.json", variant))
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        return [os.path.join(directory, shard) for shard in shards if os.path.isfile(os.path.join(directory, shard))]
    single = os.path.join(directory, _with_variant("model.safetensors", variant))
    return [single] if os.path.isfile(single) else []


def _read_safetensors_header(path):
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(length)), 8 + length


def safetensors_metadata(path):
    """The `__metadata__` of a safetensors file (a {str: str} dict; {} if it has none), read from its header only."""
    header, _ = _read_safetensors_header(path)
    return header.get("__metadata__") or {}


def add_safetensors_metadata(path, entries):
    """Rewrite a safetensors file with `entries` added to its header's metadata (the tensor bytes are copied as they
    are). Only needed where a transformers version writes weights without going through `safe_save_file`."""
    header, data_start = _read_safetensors_header(path)
    header["__metadata__"] = {**(header.get("__metadata__") or {}), **entries}
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the tensor data stays 8-byte aligned
    partial = f"{path}.partial"
    with open(path, "rb") as source, open(partial, "wb") as target:
        target.write(len(encoded).to_bytes(8, "little"))
        target.write(encoded)
        source.seek(data_start)
        shutil.copyfileobj(source, target, 16 << 20)
    os.replace(partial, path)


def design_metadata(config):
    """The safetensors metadata entry that records a config's design: {DESIGN_METADATA_KEY: JSON of its fields}."""
    return {DESIGN_METADATA_KEY: json.dumps(config.design(), sort_keys=True)}


def saved_design(files):
    """The design recorded in the metadata of a checkpoint's weights files, or None (saved without it)."""
    for path in files:
        entry = safetensors_metadata(path).get(DESIGN_METADATA_KEY)
        if entry is not None:
            return json.loads(entry)
    return None


def design_mismatches(saved, config):
    """[(field, saved value, config value)] for every design field on which `config` contradicts the saved design;
    fields the checkpoint did not record are not compared."""
    return [(field, saved[field], getattr(config, field)) for field in DESIGN_FIELDS
            if field in saved and saved[field] != getattr(config, field)]


# The backbone's modules in every design: a checkpoint key under one of them is a parameter of this model family.
_BACKBONE_MODULES = ("embed_tokens", "tpe", "layers", "norm")


def _backbone_modules():
    """The backbone's own modules and every registered decay type's model-level parameters (`decay`)."""
    return (*_BACKBONE_MODULES,
            *(name for spec in DECAY_REGISTRY.values() for name in spec.module.model_parameter_names))
_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


def another_design(missing, unexpected, model_keys):
    """Whether the keys a checkpoint lacks (`missing`) or holds besides the model's (`unexpected`) show weights of
    another design (decay type, depth, ...) rather than a partial checkpoint of this one: a backbone parameter the
    model does not have, a layer of the model absent while others are present, or a layer parameter absent from every
    present layer (of at least two). The LM head and keys outside the backbone are not evidence."""
    for key in unexpected:
        parts = key.split(".")
        if parts[0] == "model":
            parts = parts[1:]
        if parts and parts[0] in _backbone_modules():
            return True
    missing = set(missing)
    layers = {}  # layer index -> {parameter name inside the layer: present in the checkpoint}
    for key in model_keys:
        match = _LAYER_KEY.search(key)
        if match:
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = key not in missing
    present = [index for index, names in layers.items() if any(names.values())]
    if not present:  # nothing of the layer stack was loaded: an empty or backbone-less checkpoint, no evidence
        return False
    if len(present) < len(layers):
        return True
    names = set().union(*(layers[index] for index in present))
    return len(present) >= 2 and any(not any(layers[index].get(name, False) for index in present) for name in names)


def checkpoint_weight_files(name_or_path, kwargs):
    """The local safetensors files that `from_pretrained(name_or_path, **kwargs)` read: in the folder, or for a Hub
    id in the local Hub cache (just filled by from_pretrained; nothing is downloaded here). [] when unknown."""
    if name_or_path is None or kwargs.get("gguf_file") or kwargs.get("state_dict") is not None:
        return []
    name_or_path, subfolder, variant = os.fspath(name_or_path), kwargs.get("subfolder") or "", kwargs.get("variant")
    if os.path.isdir(name_or_path):
        return weight_files(os.path.join(name_or_path, subfolder), variant)
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return []

    def cached(name):
        path = try_to_load_from_cache(name_or_path, "/".join(filter(None, [subfolder, name])),
                                      cache_dir=kwargs.get("cache_dir"), revision=kwargs.get("revision"))
        return path if isinstance(path, str) else None

    try:
        index = cached(_with_variant("model.safetensors.index.json", variant))
        if index is not None:
            return weight_files(os.path.dirname(index), variant)
        single = cached(_with_variant("model.safetensors", variant))
    except ValueError:  # not a valid Hub id
        return []
    return [single] if single else []


def mismatch_error(name_or_path, config, changed, missing, unexpected):
    """The ValueError of a checkpoint whose config does not describe its weights: each design field whose saved value
    the config contradicts, then the parameters only one of them has."""
    problems = [f"the weights were saved with {field}={saved!r}, the config has {field}={configured!r}"
                for field, saved, configured in changed]
    if missing or unexpected:
        problems.append(f"parameters the config needs but the checkpoint lacks: {missing or 'none'}; parameters the "
                        f"checkpoint has but the config does not use: {unexpected or 'none'}")
    c = config
    return ValueError(
        f"The weights at {os.fspath(name_or_path)!r} do not match its config (decay_type={c.decay_type!r}, "
        f"decay_granularity={c.decay_granularity!r}, share_decay={c.share_decay}, position_encoding="
        f"{c.position_encoding!r}): {'; '.join(problems)}. Was config.json edited after the weights were saved? Pass "
        f"ignore_mismatched_sizes=True to load anyway (missing parameters are then freshly initialised, and the "
        f"config's design is used as it is).")


@contextlib.contextmanager
def recording_design(save_directory, config, variant=None, is_main_process=True):
    """Within this context, `save_pretrained` writes `design_metadata(config)` into every weights file it saves to
    `save_directory`; after it, a file written around the hook (another transformers version) gets it added."""
    install_save_metadata_hook()
    entries = design_metadata(config)
    token = SAVE_METADATA.set(entries)
    try:
        yield
    finally:
        SAVE_METADATA.reset(token)
    if is_main_process:
        for path in weight_files(os.fspath(save_directory), variant):
            if safetensors_metadata(path).get(DESIGN_METADATA_KEY) != entries[DESIGN_METADATA_KEY]:
                add_safetensors_metadata(path, entries)


def checkpoint_design_changes(name_or_path, kwargs, config):
    """[(field, saved, configured)] where `config` contradicts the design recorded in the safetensors metadata of
    the checkpoint `from_pretrained(name_or_path, **kwargs)` reads; [] if it recorded none."""
    saved = saved_design(checkpoint_weight_files(name_or_path, kwargs))
    return design_mismatches(saved, config) if saved is not None else []
