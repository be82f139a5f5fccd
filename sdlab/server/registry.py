"""The models a server offers, by name, and the one model it holds in memory.

Names come from the server's settings only: "builtin" (when installed), the startup model, and the
checkpoints directly inside `models_dir` (single files by stem, diffusers folders by folder name). A
client can only choose among these names, never send a path.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoints import load_checkpoint
from ..config import PRESETS, ModelConfig
from ..errors import CheckpointError, ParameterError
from ..fingerprint import model_display_name, model_sha256, short_hash
from ..model import Model, builtin_model_path
from ..pngmeta import ModelInfo
from .settings import ServerSettings

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class ModelEntry:
    name: str  # what clients send
    source: str  # what `Model.from_name` takes (server side only; never sent to clients)
    file_name: str  # the file or folder name, without its folder


class UnknownModelError(ParameterError):
    """A client asked for a model name the server does not offer."""


class ModelRegistry:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self._loaded: tuple[str, Model, ModelInfo] | None = None
        self._refiner: tuple[str, Model, ModelInfo] | None = None  # a second model that finishes runs
        self._configs: dict[str, ModelConfig] = {}
        self._sha256: dict[str, str] = {}
        self._lock = threading.Lock()

    # ---- names ----

    def entries(self) -> list[ModelEntry]:
        entries: dict[str, ModelEntry] = {}
        if _builtin_installed():
            entries["builtin"] = ModelEntry("builtin", "builtin", "builtin")
        if self.settings.model:
            name = model_display_name(self.settings.model)
            entries[name] = ModelEntry(name, str(self.settings.model), Path(str(self.settings.model)).name)
        for entry in _scan(self.settings.models_dir):
            entries.setdefault(entry.name, entry)
        return list(entries.values())

    def resolve(self, name: str) -> ModelEntry:
        """The entry for `name`, an A1111 title "name [hash]" or a file name."""
        wanted = name.split(" [")[0].strip() if isinstance(name, str) else name
        for entry in self.entries():
            if wanted in (entry.name, entry.file_name):
                return entry
        valid = ", ".join(e.name for e in self.entries())
        raise UnknownModelError(f"unknown model {name!r}; this server offers: {valid}")

    @property
    def default_name(self) -> str:
        return model_display_name(self.settings.model)

    def title(self, entry: ModelEntry) -> str:
        sha = self._sha256.get(entry.name)
        return f"{entry.file_name} [{short_hash(sha)}]" if sha else entry.file_name

    def sha256(self, name: str) -> str | None:
        return self._sha256.get(name)

    # ---- loading (the worker thread) ----

    def load(self, name: str) -> tuple[Model, ModelInfo]:
        """The model called `name`, loading it (and dropping the previous one) if it is not in memory."""
        entry = self.resolve(name)
        with self._lock:
            if self._loaded is None or self._loaded[0] != entry.name:
                self._loaded = None  # free the old weights before loading the new ones
                if self._refiner is not None and self._refiner[0] == entry.name:
                    self._loaded, self._refiner = self._refiner, None  # already in memory
                else:
                    log.info("loading model %s", entry.name)
                    self._loaded = (entry.name, *self._build(entry))
            return self._loaded[1], self._loaded[2]

    def _build(self, entry: ModelEntry) -> tuple[Model, ModelInfo]:
        model = Model.from_name(entry.source, dtype=DTYPES[self.settings.dtype], device=self.settings.device,
                                low_memory=self.settings.low_memory, plain=self.settings.plain,
                                quantize=self.settings.quantize)
        sha = self._sha256.setdefault(entry.name, model_sha256(model))
        self._configs[entry.name] = model.config
        return model, ModelInfo(entry.name, short_hash(sha))

    def load_refiner(self, name: str) -> tuple[Model, ModelInfo]:
        """Model `name` as a refiner: held beside the main model (one refiner at a time; the main model
        itself when they are the same)."""
        entry = self.resolve(name)
        if self._loaded is not None and self._loaded[0] == entry.name:
            return self._loaded[1], self._loaded[2]
        with self._lock:
            if self._refiner is None or self._refiner[0] != entry.name:
                self._refiner = None
                log.info("loading refiner %s", entry.name)
                self._refiner = (entry.name, *self._build(entry))
            return self._refiner[1], self._refiner[2]

    def config(self, name: str) -> ModelConfig:
        """The config of model `name` (read from its files, without building networks, if not loaded)."""
        entry = self.resolve(name)
        if entry.name not in self._configs:
            self._configs[entry.name] = _read_config(entry.source)
        return self._configs[entry.name]


def _read_config(source: str) -> ModelConfig:
    if source.startswith("random:"):
        preset = source.removeprefix("random:")
        if preset not in PRESETS:
            raise CheckpointError(f"unknown preset {preset!r} in {source!r}; valid: {', '.join(PRESETS)}")
        return PRESETS[preset]
    return load_checkpoint(builtin_model_path() if source == "builtin" else source).config


def _builtin_installed() -> bool:
    try:
        builtin_model_path()
        return True
    except CheckpointError:
        return False


def _scan(folder: Path | None) -> list[ModelEntry]:
    if folder is None or not Path(folder).is_dir():
        return []
    entries = []
    for path in sorted(Path(folder).iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_file() and path.suffix in CHECKPOINT_SUFFIXES:
            entries.append(ModelEntry(path.stem, str(path), path.name))
        elif path.is_dir() and (path / "model_index.json").is_file():
            entries.append(ModelEntry(path.name, str(path), path.name))
    return entries
