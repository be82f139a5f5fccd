"""`sdlab train`: command-line flags derived from `TrainConfig`, one per field.

    sdlab train --model tiny --steps 200 --output-dir runs/tiny
    sdlab train --config run.json --steps 5000        # a TrainConfig JSON file; flags override it
    torchrun --nproc-per-node 2 -m sdlab.train --model tiny --batch-size 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import typing

from ..errors import SdlabError
from .config import TrainConfig, field_types, is_optional

_HELP = {
    "model": "preset name (tiny, sd15, ...) or a ModelConfig JSON file",
    "data": "'shapes' or an image folder (captions in metadata.jsonl or .txt files)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a TrainConfig JSON file; other flags override its values")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    types = field_types()
    for f in dataclasses.fields(TrainConfig):
        _add_field(parser, f, types[f.name])


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, tp) -> None:
    flag = "--" + f.name.replace("_", "-")
    help_text = _HELP.get(f.name, "") + f" (default: {f.default!r})"
    base = _base_type(tp)
    if base is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    elif typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0]
        parser.add_argument(flag, nargs="+", type=item, default=None, help=help_text)
    elif typing.get_origin(base) is typing.Literal:
        parser.add_argument(flag, choices=typing.get_args(base), default=None, help=help_text)
    else:
        parser.add_argument(flag, type=_optional(base) if is_optional(tp) else base, default=None, help=help_text)


def _base_type(tp):
    if is_optional(tp):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _optional(base):
    """A parser that reads 'none' as None (e.g. --lora-alpha none)."""
    return lambda text: None if text.lower() in ("none", "null") else base(text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = TrainConfig.from_json(args.config).to_dict() if args.config else {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    return TrainConfig.from_dict(values)


def main(args: argparse.Namespace) -> int:
    """Run `sdlab train`; returns the exit status."""
    from .loop import Trainer

    try:
        config = config_from_args(args)
        if args.print_config:
            print(json.dumps(config.to_dict(), indent=2))
            return 0
        trainer = Trainer(config)
        try:
            result = trainer.run()
        finally:
            trainer.close()
    except SdlabError as e:
        logging.getLogger("sdlab").error("%s", e)
        return 2
    if trainer.dist.is_main:
        print(f"trained to step {result.step}; outputs in {result.output_dir}")
        for path in result.exported:
            print(f"  {path}")
    return 0
