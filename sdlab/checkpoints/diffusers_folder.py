"""The diffusers folder layout: `model_index.json` plus one sub-folder per component.

    model_index.json
    unet/          config.json + diffusion_pytorch_model[.fp16].safetensors  (or sharded, or .bin)
    vae/           config.json + diffusion_pytorch_model[.fp16].safetensors
    text_encoder/  config.json + model[.fp16].safetensors
    tokenizer/     vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json
    scheduler/     scheduler_config.json

Weights are looked for in this order: `NAME[.VARIANT].safetensors`, a sharded
`NAME.safetensors.index[.VARIANT].json`, then the same two with `.bin` (read with the safe reader).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .. import families
from ..config import ModelConfig
from ..errors import CheckpointError
from ..families import Family
from ..families.base import names_component
from . import configs
from .atomic import atomic_folder
from .convert import normalize_component_keys
from .io import check_path, check_regular_file, read_checkpoint, read_small_file, write_safetensors

log = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
GUIDANCE_KEY = "_sdlab_default_guidance"  # in model_index.json, written only when it is not the family's
TOKENIZER_DATA = ("vocab.json", "merges.txt")
MAX_JSON_BYTES = 16 * 2**20  # config.json files are ~1 KB, a shard index ~100 KB, CLIP's vocab.json ~1 MB
MAX_TOKENIZER_FILE = 16 * 2**20  # CLIP's vocab.json and merges.txt are 1.0 and 0.5 MB
CLIP_DATA = Path(__file__).resolve().parents[1] / "data" / "clip"  # sdlab's package data
SPECIAL_TOKENS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}


def is_diffusers_folder(path: Path) -> bool:
    """A folder with a `model_index.json` entry (which `read_folder` then checks to be a readable JSON file)."""
    return path.is_dir() and os.path.lexists(path / MODEL_INDEX)


# --- reading --------------------------------------------------------------------------------------------


def read_folder(
    folder: Path, *, variant: str | None = None
) -> tuple[ModelConfig, dict[str, dict[str, torch.Tensor]], dict[str, Path]]:
    """(config, a state dict per network of its family, the tokenizer folders it has by name) of a diffusers
    folder."""
    config = read_folder_config(folder)
    family = families.family_of(config)
    weights = {}
    for name, component in family.components.items():
        tensors = read_component_weights(folder / name, component.weights_name, variant)
        weights[name] = normalize_component_keys(component, tensors)
    return config, weights, tokenizer_dirs(folder, family)


def read_folder_config(folder: Path) -> ModelConfig:
    """The ModelConfig of a diffusers folder, from its model index and component configs (no weights read)."""
    index = read_json(folder / MODEL_INDEX)
    # Detection looks at the config.json of the networks the index names (SD 2.x: its text encoder's).
    known = {name for family in families.FAMILIES.values() for name in family.components}
    named = {name: read_json(folder / name / "config.json") for name in index
             if name in known and names_component(index, name)}
    family = families.detect_folder(index, named, str(folder / MODEL_INDEX))
    _check_model_index(index, family, folder / MODEL_INDEX)
    tokenizers = tokenizer_dirs(folder, family)
    networks = {}
    for name, component in family.components.items():
        where = str(folder / name / "config.json")
        tokenizer = tokenizers.get(component.tokenizer)
        pad = tokenizer_pad_token_id(tokenizer) if tokenizer else None
        default_pad = component.default_pad_token_id
        pad = (family.default_pad_token_id if default_pad is None else default_pad) if pad is None else pad
        networks[name] = component.read_config(named[name], where, pad)
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = read_json(scheduler_file) if os.path.lexists(scheduler_file) else {}
    schedule, prediction = configs.schedule_from_diffusers(scheduler, str(scheduler_file))
    unet_file = folder / "unet" / "config.json"
    config = configs.model_config(
        str(folder),
        name=folder.name, family=family.name, schedule=schedule, prediction=prediction,
        default_size=configs.unet_sample_size(named["unet"], str(unet_file)) * networks["vae"].downscale,
        default_guidance=_default_guidance(index, family, folder / MODEL_INDEX),
        **ModelConfig.network_fields(networks),
    )
    return configs.named_like_preset(config, folder.name)


def tokenizer_dirs(folder: Path, family: Family) -> dict[str, Path]:
    """The tokenizer folders of the family's text encoders that the folder has (checked), by name."""
    found = {}
    for component in family.components.values():
        tokenizer = component.tokenizer
        if tokenizer and os.path.lexists(folder / tokenizer / "vocab.json"):
            _check_tokenizer_files(folder / tokenizer)
            found[tokenizer] = folder / tokenizer
    return found


def _default_guidance(index: Mapping[str, Any], family: Family, where: Path) -> float:
    """The model's own default CFG scale: sdlab's key in model_index.json (diffusers ignores keys that start
    with "_"), else the family's (SD 7, SDXL 5)."""
    value = index.get(GUIDANCE_KEY, family.default_guidance)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise CheckpointError(f"{where}: {GUIDANCE_KEY} is not a number from 0 to 100")
    return float(value)


def read_component_weights(component_dir: Path, name: str, variant: str | None) -> dict[str, torch.Tensor]:
    files = find_weight_files(component_dir, name, variant)
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(read_checkpoint(file).tensors)
    return tensors


def find_weight_files(component_dir: Path, name: str, variant: str | None) -> list[Path]:
    """The weight file(s) of one component, by the search order in the module docstring."""
    _check_component_folder(component_dir)
    suffix = f".{variant}" if variant else ""
    for ext in ("safetensors", "bin"):
        # Any entry by these names counts (a FIFO, a broken link...): reading it then says what is wrong.
        single = component_dir / f"{name}{suffix}.{ext}"
        if os.path.lexists(single):
            return [single]
        index = component_dir / f"{name}.{ext}.index{suffix}.json"
        if os.path.lexists(index):
            return _shards(index)
    try:
        present = sorted(p.name for p in component_dir.iterdir())
    except OSError as e:
        raise CheckpointError(f"{component_dir}: cannot be listed ({e.strerror or type(e).__name__})") from None
    present = present if len(present) <= 12 else [*present[:12], f"... ({len(present) - 12} more)"]
    hint = " (pass variant=... to pick one of the variant files)" if not variant and any(
        p.count(".") >= 2 for p in present) else ""
    raise CheckpointError(
        f"{component_dir}: no weights named {name}{suffix}.safetensors, {name}.safetensors.index{suffix}.json or "
        f"{name}{suffix}.bin; the folder holds {present}{hint}"
    )


def _check_component_folder(component_dir: Path) -> None:
    if not os.path.lexists(component_dir):
        raise CheckpointError(f"{component_dir}: missing component folder")
    if not stat.S_ISDIR(check_path(component_dir).st_mode):
        raise CheckpointError(f"{component_dir}: not a folder (a component of a diffusers folder is a folder)")


def _shards(index_file: Path) -> list[Path]:
    """The shard files an `*.index.json` names, all checked to be plain files inside its folder."""
    weight_map = read_json(index_file).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_file}: no 'weight_map' in the shard index")
    names = set(weight_map.values())
    if not all(isinstance(shard, str) and shard and Path(shard).name == shard for shard in names):
        raise CheckpointError(
            f"{index_file}: its weight_map names a shard that is not a plain file name in this folder"
        )
    shards = []
    for shard in sorted(names):
        path = index_file.parent / shard
        if not os.path.lexists(path):
            raise CheckpointError(f"{index_file}: the shard {shard} it lists is missing")
        shards.append(path)
    return shards


def tokenizer_pad_token_id(tokenizer_dir: Path) -> int | None:
    """The id of the padding token named by special_tokens_map.json (or tokenizer_config.json)."""
    vocab = read_json(tokenizer_dir / "vocab.json")
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        if os.path.lexists(tokenizer_dir / file):
            pad = read_json(tokenizer_dir / file).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if pad is None:
                continue
            if not isinstance(pad, str) or pad not in vocab:
                raise CheckpointError(f"{tokenizer_dir / file}: its pad_token is not a token of vocab.json")
            token_id = vocab[pad]
            if isinstance(token_id, bool) or not isinstance(token_id, int):
                raise CheckpointError(f"{tokenizer_dir / 'vocab.json'}: the pad token's id is not an integer")
            return token_id
    return None


def _check_tokenizer_files(tokenizer_dir: Path) -> None:
    """The BPE files the tokenizer reads must be regular files of a sane size (a FIFO would hang it)."""
    for name in TOKENIZER_DATA:
        path = tokenizer_dir / name
        if os.path.lexists(path):
            size = check_regular_file(path, "tokenizer file")
            if size > MAX_TOKENIZER_FILE:
                raise CheckpointError(
                    f"{path}: {size} bytes, too large for a tokenizer file (at most {MAX_TOKENIZER_FILE})"
                )


def _check_model_index(index: Mapping[str, Any], family: Family, where: Path) -> None:
    """Each of the family's components must be named as the (library, class) sdlab reads."""
    for name, component in family.components.items():
        entry = index.get(name)
        library, classes = component.library, component.classes
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == library and entry[1] in classes):
            raise CheckpointError(
                f"{where}: component {name!r} is not one sdlab reads; expected [{library!r}, one of {list(classes)}]"
            )


def read_json(path: Path) -> dict:
    """A JSON object from a regular file of at most MAX_JSON_BYTES; errors say what is wrong, never quote it."""
    if not os.path.lexists(path):
        raise CheckpointError(f"{path}: missing")
    raw = read_small_file(path, MAX_JSON_BYTES, "JSON file")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno})") from None
    except (ValueError, RecursionError):  # an integer of thousands of digits, or arrays nested too deep
        raise CheckpointError(f"{path}: not valid JSON") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


# --- writing --------------------------------------------------------------------------------------------


def write_folder(
    folder: Path,
    config: ModelConfig,
    components: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    dtype: torch.dtype | None = None,
    variant: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a diffusers folder that `StableDiffusionPipeline.from_pretrained` loads (atomically)."""
    suffix = f".{variant}" if variant else ""
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        write_json(tmp / MODEL_INDEX, _model_index(config))
        family = families.family_of(config)
        scheduler = configs.schedule_to_diffusers(config.schedule, config.prediction, family.diffusers_scheduler)
        write_json(tmp / "scheduler" / "scheduler_config.json", scheduler)
        for name, component in family.components.items():
            network = config.network(name)
            write_json(tmp / name / "config.json", component.write_config(network, config))
            if component.tokenizer:
                write_tokenizer(tmp / component.tokenizer, network.pad_token_id, network.max_length)
            tensors = cast(components[name], dtype)
            write_safetensors(tmp / name / f"{component.weights_name}{suffix}.safetensors", tensors, {"format": "pt"})
    return folder


def write_tokenizer(folder: Path, pad_token_id: int, max_length: int) -> None:
    """The CLIP BPE files from sdlab's package data, plus the special-token files naming the pad token."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_DATA:
        shutil.copyfile(CLIP_DATA / name, folder / name)
    id_to_token = {i: t for t, i in json.loads((folder / "vocab.json").read_text(encoding="utf-8")).items()}
    if pad_token_id not in id_to_token:
        raise CheckpointError(f"pad_token_id {pad_token_id} is not in the CLIP vocabulary (0..{len(id_to_token) - 1})")
    special = {**SPECIAL_TOKENS, "pad_token": id_to_token[pad_token_id]}
    write_json(folder / "special_tokens_map.json", special)
    write_json(folder / "tokenizer_config.json", {
        **special,
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
    })


def cast(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Floating-point tensors converted to `dtype` (when given); integer buffers kept as they are."""
    if dtype is None:
        return dict(tensors)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def _model_index(config: ModelConfig) -> dict[str, Any]:
    family = families.family_of(config)
    scheduler = configs.schedule_to_diffusers(config.schedule, config.prediction, family.diffusers_scheduler)
    scheduler = scheduler["_class_name"]
    own_guidance = config.default_guidance != family.default_guidance
    guidance = {GUIDANCE_KEY: config.default_guidance} if own_guidance else {}
    return {
        "_class_name": family.pipeline_class(config),
        "_diffusers_version": configs.DIFFUSERS_VERSION,
        "scheduler": ["diffusers", scheduler],
        **{c.tokenizer: ["transformers", "CLIPTokenizer"] for c in family.components.values() if c.tokenizer},
        **{name: [c.library, c.classes[0]] for name, c in family.components.items()},
        **family.model_index_extras(config),
        **guidance,
    }


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
