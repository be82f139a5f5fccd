"""The `sdlab` command line: a thin layer over the Python API.

    sdlab generate "a red circle above a blue square" --seed 7 --steps 20 --size 64x64
    sdlab generate --from-png outputs/00001-7.png            # re-create an image from its metadata
    sdlab generate "a lighthouse" --model sdxl.safetensors --original-size 2048x2048 --crop-top-left 0,0
    torchrun --nproc-per-node 4 -m sdlab.cli generate --prompts prompts.txt --seed 100
    sdlab img2img "a blue star" --init in.png --strength 0.6
    sdlab inpaint "a green square" --init in.png --mask mask.png
    sdlab serve --model random:tiny                           # A1111 + OpenAI APIs and a web UI
    sdlab convert model.safetensors out_folder --dtype fp16
    sdlab info model.safetensors
    sdlab samplers

The generation flags are made from `GenerationParams`' fields (see `PARAM_FLAGS`); images are written as
numbered `NNNNN-<seed>.png` files that never replace an existing file, each carrying its parameters in
A1111's `parameters` text chunk.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import typing
from pathlib import Path

import torch

from .diffusion.registry import get_sampler, sampler_names
from .diffusion.schedules import SCHEDULES
from .errors import ParameterError, SdlabError
from .params import GenerationParams
from .perf import QUANTIZATIONS

log = logging.getLogger("sdlab.cli")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULTS = GenerationParams()

# How GenerationParams' fields appear as flags. Fields not listed (prompt, width/height, init_image, mask)
# have their own arguments: a positional prompt, --size WxH, --init and --mask.
PARAM_FLAGS = {
    "negative_prompt": ("--negative", "what the image should not show"),
    "prompt_2": ("--prompt-2", "SDXL: the second text encoder's (OpenCLIP bigG's) prompt (default: the prompt)"),
    "negative_prompt_2": ("--negative-prompt-2", "SDXL: the second text encoder's negative prompt (default: "
                                                 "--negative)"),
    "steps": ("--steps", "sampler steps"),
    "sampler": ("--sampler", "sampler name or key (list: `sdlab samplers`)"),
    "schedule": ("--schedule", f"sigma schedule: {', '.join(SCHEDULES)} (default: karras; automatic for "
                               "zero-terminal-SNR models)"),
    "cfg_scale": ("--cfg", "classifier-free guidance scale, 1 = no guidance (default: the model's; 7 for SD, "
                           "2 for the built-in model)"),
    "guidance_rescale": ("--guidance-rescale", "CFG rescale phi (Lin et al. 2023), 0 = off"),
    "seed": ("--seed", "random seed; image i of a batch uses seed + i (default: random)"),
    "batch_size": ("--batch", "images per prompt"),
    "clip_skip": ("--clip-skip", "text encoder layer to condition on, counted from the end (A1111's)"),
    "eta": ("--eta", "noise amount for DDIM / ancestral samplers, TCD's gamma (default: the sampler's)"),
    "token_merging": ("--token-merging", "fraction of tokens merged before the top level's self-attention, "
                                         "0-0.75 (faster, slightly different images)"),
    "deepcache": ("--deepcache", "N > 1: the whole UNet only every N-th step, cached deep features between "
                                 "(faster, slightly different images)"),
    "aesthetic_score": ("--aesthetic-score", "SDXL refiner: the aesthetic score it is conditioned on"),
    "negative_aesthetic_score": ("--negative-aesthetic-score", "SDXL refiner: the negative prompt's aesthetic score"),
}
# SDXL's size and crop conditions (GenerationParams keeps (height, width) and (top, left) as diffusers does):
# sizes are given as WxH like --size, a crop's corner as TOP,LEFT. Other families ignore them.
CONDITION_FLAGS = {
    "original_size": ("--original-size", "size", "WxH", "SDXL: the original image size to condition on "
                      "(default: the image's size)"),
    "target_size": ("--target-size", "size", "WxH", "SDXL base: the target size to condition on "
                    "(default: the image's size)"),
    "crops_coords_top_left": ("--crop-top-left", "crop", "TOP,LEFT", "SDXL: the crop corner to condition on "
                              "(default: 0,0)"),
    "negative_original_size": ("--negative-original-size", "size", "WxH", "SDXL: the negative prompt's "
                               "original size (default: --original-size)"),
    "negative_target_size": ("--negative-target-size", "size", "WxH", "SDXL base: the negative prompt's target "
                             "size (default: --target-size)"),
    "negative_crops_coords_top_left": ("--negative-crop-top-left", "crop", "TOP,LEFT", "SDXL: the negative "
                                       "prompt's crop corner (default: --crop-top-left)"),
}
FLAG_ALIASES = {"negative_prompt": ("--negative-prompt",)}  # the name diffusers and the A1111 API use
IMAGE_FLAGS = {"strength": ("--strength", "img2img: fraction of the schedule to run (1 = ignore the image)")}


# ---- parser ----


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser = argparse.ArgumentParser(prog="sdlab", description="Stable Diffusion from scratch: generate, "
                                     "train, evaluate, serve.", parents=[common])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mode in ("generate", "img2img", "inpaint"):
        _add_generate(sub, mode, common)
    _add_train(sub, common)
    _add_eval(sub, common)
    _add_serve(sub, common)
    _add_convert(sub, common)
    _add_info(sub, common)
    _add_samplers(sub, common)
    return parser


def _add_generate(sub, mode: str, common) -> None:
    helps = {"generate": "text to image", "img2img": "image to image", "inpaint": "repaint the masked region"}
    # No abbreviated flags: "--negative-prompt" must not silently mean "--negative-prompt-2".
    p = sub.add_parser(mode, help=helps[mode], parents=[common], allow_abbrev=False)
    p.add_argument("prompt", nargs="?", default=argparse.SUPPRESS, help="the prompt")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--from-png", type=Path, help="re-create the image whose metadata this PNG holds "
                        "(flags given as well override its values)")
    if mode == "generate":
        source.add_argument("--prompts", type=Path, help="a file of prompts, one per line (splits over torchrun)")
    else:
        p.add_argument("--init", type=Path, required=True, help="the starting image")
        p.add_argument("--mask", type=Path, required=mode == "inpaint", help="white = repaint")
    _add_param_flags(p, with_image=mode != "generate")
    _add_model_flags(p)
    p.add_argument("--refiner", metavar="MODEL", help="a second model that finishes each image (the SDXL "
                   "refiner): a checkpoint file or diffusers folder, as --model")
    p.add_argument("--refiner-switch-at", dest="refiner_switch_at", type=float, default=argparse.SUPPRESS,
                   metavar="F", help="the fraction of the steps after which the refiner takes over (default: 0.8)")
    p.add_argument("--lora-dir", type=Path, action="append", dest="lora_dirs", metavar="DIR",
                   help="where <lora:name:w> prompt tags find name.safetensors (repeatable; default: loras)")
    _add_control_flags(p)
    p.add_argument("--out", type=Path, default=Path("outputs"), help="output folder (default: outputs)")
    p.add_argument("--save-steps", choices=("gif", "grid"), help="also save the x0 preview of each step")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_generate, mode=mode)


# Per-unit control flags (dest, metavar, flag, type, default, help): each is given once for all units or once per
# --controlnet, in the same order.
CONTROL_FLAGS = (
    ("control_images", "IMAGE", "--control-image", Path, None, "the control image (edges, depth, pose...) or, with "
     "--control-preprocessor, the picture to make it from"),
    ("control_scales", "S", "--control-scale", float, 1.0, "the unit's weight"),
    ("control_starts", "A", "--control-start", float, 0.0, "fraction of the steps after which it acts"),
    ("control_ends", "B", "--control-end", float, 1.0, "fraction of the steps after which it stops"),
    ("control_preprocessors", "NAME", "--control-preprocessor", str, "none", "make the control image from the picture: "
     "canny, scribble_xdog, lineart_standard, tile_resample, blur_gaussian, shuffle, invert"),
    ("control_modes", "MODE", "--control-mode", str, "balanced", "balanced, prompt (my prompt is more important), "
     "control (ControlNet is more important)"),
    ("control_resize", "MODE", "--control-resize", str, "Crop and Resize", "how a control image of another size is "
     "fitted: 'Just Resize', 'Crop and Resize', 'Resize and Fill'"),
)


def _add_control_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("control", "ControlNet / T2I-Adapter units: each --controlnet starts one; the "
                                 "flags below are given once (for every unit) or once per --controlnet")
    group.add_argument("--controlnet", action="append", dest="controlnets", default=[], metavar="PATH_OR_NAME",
                       help="a ControlNet or T2I-Adapter (folder or file), or its name in --controlnet-dir")
    for dest, metavar, flag, kind, default, help_text in CONTROL_FLAGS:
        group.add_argument(flag, action="append", dest=dest, type=kind, default=[], metavar=metavar,
                           help=f"{help_text} (default: {default})" if default is not None else help_text)
    group.add_argument("--controlnet-dir", type=Path, action="append", dest="controlnet_dirs", default=[],
                       metavar="DIR", help="where --controlnet names are looked up (repeatable; default: controlnet)")


def _add_param_flags(p: argparse.ArgumentParser, *, with_image: bool) -> None:
    """One flag per GenerationParams field, typed from its annotation; absent flags stay absent, so that
    they do not override values read from a PNG."""
    hints = typing.get_type_hints(GenerationParams)
    flags = {**PARAM_FLAGS, **(IMAGE_FLAGS if with_image else {})}
    for name, (flag, help_text) in flags.items():
        default = getattr(DEFAULTS, name)
        p.add_argument(flag, *FLAG_ALIASES.get(name, ()), dest=name, type=_scalar(hints[name]),
                       default=argparse.SUPPRESS,
                       help=help_text if "(default:" in help_text else f"{help_text} (default: {default})")
    p.add_argument("--size", type=_size, default=argparse.SUPPRESS, metavar="WxH",
                   help="image size, e.g. 512x512 (default: the model's native size)")
    for name, (flag, kind, metavar, help_text) in CONDITION_FLAGS.items():
        p.add_argument(flag, dest=name, type=_hw if kind == "size" else _crop, default=argparse.SUPPRESS,
                       metavar=metavar, help=help_text)


def _scalar(hint) -> type:
    """int | None -> int."""
    return next(t for t in (typing.get_args(hint) or (hint,)) if t is not type(None))


def _size(text: str) -> tuple[int, int]:
    from .pngmeta import parse_size

    try:
        return parse_size(text)
    except ParameterError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _hw(text: str) -> tuple[int, int]:
    """'1024x768' (WxH, as --size) -> (768, 1024): GenerationParams' (height, width)."""
    width, height = _size(text)
    return height, width


def _crop(text: str) -> tuple[int, int]:
    from .pngmeta import parse_crop

    try:
        return parse_crop(text)
    except ParameterError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="a checkpoint file or diffusers folder, 'builtin' (default), "
                   "or 'random:<preset>' (random weights, e.g. random:tiny)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="compute dtype (default: fp32)")
    p.add_argument("--low-memory", action="store_true",
                   help="hold only the running stage's networks in memory (text encoders, then the UNet, then the "
                   "VAE), the others in the memory-mapped file: SDXL's peak drops by its text encoders; LoRAs "
                   "cannot be used")
    p.add_argument("--plain", action="store_true", help="the plain inference path: weights as the checkpoint "
                   "has them, not packed for oneDNN (bit-compatible with diffusers' kernels; slower on a CPU)")
    p.add_argument("--quantize", choices=QUANTIZATIONS, help="compute the UNet's convolutions and linear layers in "
                   "int8 (with --dtype bf16: the fastest and smallest mode on a CPU; images differ a little more "
                   "from fp32's than bf16's do)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--tiny-vae", type=Path, help="decode with this tiny VAE decoder (TAESD: a diffusers "
                   "AutoencoderTiny folder or taesd_decoder.safetensors): faster, slightly softer images")


def _add_train(sub, common) -> None:
    # The trainer's own parser reads the rest of the command line (see `main`), so that importing the training
    # stack is only paid for by `sdlab train`.
    p = sub.add_parser("train", help="train a model (see `sdlab train --help`)", add_help=False)
    p.set_defaults(run=cmd_train)


def _add_eval(sub, common) -> None:
    p = sub.add_parser("eval", help="score a model on shapes-world prompts", parents=[common])
    p.add_argument("--kind", choices=("single", "relation", "heldout"), default="single")
    p.add_argument("--n", type=int, default=50, help="number of prompts (default: 50)")
    p.add_argument("--prompt-seed", type=int, default=0, help="which set of evaluation prompts (default: 0)")
    p.add_argument("--eval-batch", type=int, default=16, help="prompts per forward pass (default: 16)")
    _add_param_flags(p, with_image=False)
    _add_model_flags(p)
    p.add_argument("--out", type=Path, default=Path("eval"), help="report folder (default: eval)")
    p.set_defaults(run=cmd_eval)


def _add_serve(sub, common) -> None:
    p = sub.add_parser("serve", help="HTTP server: A1111 and OpenAI APIs and a web UI", parents=[common])
    p.add_argument("--model", default="builtin", help="model loaded at startup (default: builtin)")
    p.add_argument("--models-dir", type=Path, help="folder of checkpoints clients may pick by name")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--api-key", default=os.environ.get("SDLAB_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $SDLAB_API_KEY)")
    p.add_argument("--basic-auth", default=os.environ.get("SDLAB_BASIC_AUTH"), metavar="USER:PASSWORD",
                   help="require HTTP basic auth (default: $SDLAB_BASIC_AUTH)")
    p.add_argument("--cors-origin", action="append", default=[], help="allow this origin (repeatable)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="answer requests for this Host name too (repeatable; '*' = any). Default: on loopback "
                        "only localhost, 127.0.0.1 and [::1]; elsewhere any")
    p.add_argument("--queue-size", type=int, default=8, help="jobs that may wait; more get 429 (default: 8)")
    p.add_argument("--max-images", type=int, default=16, help="images per request (default: 16)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds the running job gets on SIGTERM")
    p.add_argument("--lora-dir", type=Path, action="append", dest="lora_dirs", default=[], metavar="DIR",
                   help="folder whose LoRAs <lora:name:w> tags may name (repeatable; default: none)")
    p.add_argument("--max-job-seconds", type=float, default=300.0, help="refuse (422) a request whose "
                   "estimated work takes longer on this machine (default: 300)")
    p.add_argument("--job-timeout", type=float, default=None, help="stop a job still running after this "
                   "many seconds (default: 2 x --max-job-seconds; 0 = never)")
    p.add_argument("--max-image-pixels", type=int, default=2048 * 2048,
                   help="width x height of one image at most (default: 2048x2048)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--low-memory", action="store_true", help="models hold only the running stage's networks in "
                   "memory (see sdlab generate --help); requests with LoRAs are refused")
    p.add_argument("--plain", action="store_true", help="the plain inference path (see sdlab generate --help)")
    p.add_argument("--quantize", choices=QUANTIZATIONS, help="models compute the UNet in int8 (see sdlab generate "
                   "--help)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.set_defaults(run=cmd_serve)


def _add_convert(sub, common) -> None:
    p = sub.add_parser("convert", help="convert between checkpoint layouts and dtypes", parents=[common])
    p.add_argument("source", type=Path, help="a checkpoint file or diffusers folder")
    p.add_argument("dest", type=Path, help="where to write (must not exist unless --overwrite)")
    p.add_argument("--layout", choices=("diffusers", "single-file"),
                   help="default: single-file if dest ends in .safetensors, else diffusers")
    p.add_argument("--dtype", choices=DTYPES, help="convert floating-point weights (e.g. fp16)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=cmd_convert)


def _add_info(sub, common) -> None:
    p = sub.add_parser("info", help="what a checkpoint is: family, sizes, dtypes, parameters, hash",
                       parents=[common])
    p.add_argument("path", type=Path)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--no-hash", action="store_true", help="skip the SHA-256 (slow on large files)")
    p.set_defaults(run=cmd_info)


def _add_samplers(sub, common) -> None:
    p = sub.add_parser("samplers", help="list samplers and schedules", parents=[common])
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_samplers)


# ---- generate / img2img / inpaint ----


def cmd_generate(args) -> int:
    from .outputs import check_output_folder
    from .prompt_jobs import process_rank, read_prompts, shard

    base, png_model = _base_params(args)
    check_output_folder(args.out, name=f"--out {args.out}")  # before minutes of work are spent on images
    model, info = _load_model(args, png_model)
    refiner = _load_refiner(args, png_model)
    base = base.replace(control=_control_units(args, model, base))
    if getattr(args, "prompts", None):
        rank, world = process_rank()
        if base.seed is None:
            base = base.replace(seed=0)
            log.warning("--prompts without --seed: using base seed 0 (prompt k gets seed k x batch)")
        jobs = shard(read_prompts(args.prompts), base.seed, base.batch_size, rank, world)
        log.info("process %d of %d: %d prompts", rank, world, len(jobs))
        for job in jobs:
            _generate_and_save(model, info, base.replace(prompt=job.prompt, seed=job.seed), args, refiner)
    else:
        _generate_and_save(model, info, base, args, refiner)
    return 0


def _base_params(args) -> tuple[GenerationParams, dict]:
    """GenerationParams from (the PNG given by --from-png, then) the flags given; plus the PNG's fields."""
    params, fields = DEFAULTS, {}
    if getattr(args, "from_png", None):
        params, fields = _read_png_params(args.from_png)
        if args.mode == "generate" and "Denoising strength" in fields:
            log.warning("%s was made from an init image: re-create it with `sdlab img2img --from-png ... "
                        "--init IMAGE` (or inpaint)", args.from_png)
    flags = {**PARAM_FLAGS, **IMAGE_FLAGS, **CONDITION_FLAGS}
    changes = {name: getattr(args, name) for name in flags if hasattr(args, name)}
    if hasattr(args, "refiner_switch_at"):
        changes["refiner_switch_at"] = args.refiner_switch_at
    if hasattr(args, "prompt"):
        changes["prompt"] = args.prompt
    if hasattr(args, "size"):
        changes["width"], changes["height"] = args.size
    if args.mode != "generate":
        changes["init_image"] = _open_image(args.init, "--init")
        changes["mask"] = _open_image(args.mask, "--mask") if args.mask else None
    return params.replace(**changes), fields


def _read_png_params(path: Path) -> tuple[GenerationParams, dict[str, str]]:
    """The parameters (and the raw fields) in the PNG of --from-png; any problem is one ParameterError
    naming the file."""
    from .pngmeta import parse_infotext, read_infotext

    text = read_infotext(path, name=f"--from-png {path}")
    if not text:
        raise ParameterError(f"--from-png {path}: the PNG has no 'parameters' text chunk to re-create it from")
    try:
        parsed = parse_infotext(text)
        return parsed.to_params(), parsed.fields
    except ParameterError as e:
        raise ParameterError(f"--from-png {path}: {e}") from None


def _open_image(path: Path, flag: str):
    from .images import open_image

    return open_image(path, name=f"{flag} {path}")


def _load_model(args, png_fields: dict):
    """The model named by --model (or by the PNG's "Model" field when it is reproducible by name) and its
    ModelInfo for the metadata."""
    name = args.model
    png_name = png_fields.get("Model")
    if name is None and png_name is not None:
        if png_name != "builtin" and not png_name.startswith("random:"):
            raise ParameterError("the PNG was made with a model that is not built in: pass its file with --model")
        name = png_name
    model, info = _named_model(name, args)
    if getattr(args, "tiny_vae", None) is not None:
        from .nn.tiny_vae import load_tiny_decoder

        model.tiny_decoder = load_tiny_decoder(args.tiny_vae, dtype=DTYPES[args.dtype]).to(args.device)
    wanted = png_fields.get("Model hash")
    if wanted and wanted != info.hash:
        log.warning("the PNG was made with a model of hash %s; %s has hash %s: the image will differ",
                    wanted, info.name, info.hash)
    return model, info


def _load_refiner(args, png_fields: dict):
    """(the --refiner model, its ModelInfo), or None."""
    if getattr(args, "refiner", None) is None:
        if "Refiner" in png_fields:
            log.warning("the PNG was finished by the refiner %s: pass it with --refiner to re-create the image",
                        png_fields["Refiner"])
        return None
    return _named_model(args.refiner, args)


def _named_model(name, args):
    """(the model `name` means for --model / --refiner on --device in --dtype, its ModelInfo)."""
    from .fingerprint import model_display_name, model_sha256, short_hash
    from .model import Model
    from .pngmeta import ModelInfo

    model = Model.from_name(name, device=args.device, dtype=DTYPES[args.dtype],
                            low_memory=getattr(args, "low_memory", False), plain=getattr(args, "plain", False),
                            quantize=getattr(args, "quantize", None))
    return model, ModelInfo(model_display_name(name), short_hash(model_sha256(model)))


def _generate_and_save(model, info, params: GenerationParams, args, refiner=None) -> list[Path]:
    from .generation import generate
    from .outputs import save_png, sibling_names, write_new_file
    from .pngmeta import infotext
    from .trajectory import TrajectoryRecorder, chain, trajectory_bytes

    recorder = TrajectoryRecorder(model) if args.save_steps else None
    bar = _ProgressBar(disable=args.quiet)
    try:
        result = generate(model, params, callback=chain(bar, recorder), named_loras=_lora_folder(args),
                          refiner=None if refiner is None else refiner[0])
    finally:
        bar.close()
    resolved, paths = result.params, []
    refiner_info = None if refiner is None else refiner[1]
    for i, image in enumerate(result.images):  # each path is printed once written: a full disk loses no report
        text = infotext(resolved, info, index=i, refiner=refiner_info)
        paths.append(save_png(image, args.out, seed=resolved.seed + i, text=text))
        print(paths[-1], flush=True)
    if recorder is not None:
        suffix = "-steps.gif" if args.save_steps == "gif" else "-steps.png"
        paths.append(write_new_file(trajectory_bytes(recorder.frames, args.save_steps),
                                    sibling_names(paths[0], suffix)))
        print(paths[-1], flush=True)
    return paths


def _control_units(args, model, params: GenerationParams) -> tuple:
    """The --controlnet units: networks loaded in the model's dtype, control images made by the preprocessor
    at the output's resolution (pixel perfect, as A1111's option)."""
    from .control import ControlUnit, load_control_network
    from .control.preprocess import RESOLUTION_RANGE, pixel_perfect_resolution, preprocess, resize_mode_name

    n = len(args.controlnets)
    values = {dest: _per_unit(getattr(args, dest), n, flag, default)
              for dest, _, flag, _, default, _ in CONTROL_FLAGS}
    if n == 0:
        return ()
    if any(image is None for image in values["control_images"]):
        raise ParameterError("each --controlnet needs a --control-image")
    resolved = params.resolved(model.config)  # the output size
    units = []
    for i, source in enumerate(args.controlnets):
        net = load_control_network(_control_path(source, args), dtype=model.dtype, device=model.device,
                                   plain=getattr(args, "plain", False))
        image = _open_image(values["control_images"][i], "--control-image")
        resize = resize_mode_name(values["control_resize"][i])
        module = values["control_preprocessors"][i]
        if module != "none":
            low, high = RESOLUTION_RANGE
            side = pixel_perfect_resolution(image, resolved.width, resolved.height, resize)
            image = preprocess(module, image, resolution=min(max(side, low), high), seed=resolved.seed)
        units.append(ControlUnit(net, image, scale=values["control_scales"][i], start=values["control_starts"][i],
                                 end=values["control_ends"][i], mode=values["control_modes"][i], resize_mode=resize,
                                 name=Path(source).stem, module=module))
    return tuple(units)


def _per_unit(given: list, n: int, flag: str, default) -> list:
    if not given:
        return [default] * n
    if len(given) in (1, n):
        return list(given) * (n // len(given)) if n else []
    raise ParameterError(f"{flag} was given {len(given)} times for {n} --controlnet units: give it once (for "
                         "every unit) or once per --controlnet")


def _control_path(source: str, args) -> Path:
    """--controlnet as a path the user gave, else a name in --controlnet-dir (a file or a diffusers folder)."""
    from .resources import ResourceFolder, check_name

    path = Path(source)
    if path.exists():
        return path
    check_name("ControlNet", source)
    folders = args.controlnet_dirs or [Path("controlnet")]
    for folder in folders:
        if (folder / source / "config.json").is_file():
            return folder / source
    return ResourceFolder("ControlNet", folders, (".safetensors", ".pth", ".ckpt", ".pt")).path(source)


def _lora_folder(args):
    from .resources import LORA_SUFFIXES, ResourceFolder

    return ResourceFolder("LoRA", args.lora_dirs or [Path("loras")], LORA_SUFFIXES)


class _ProgressBar:
    """A tqdm bar fed by the sampler's step callback (created at the first step, when the total is known)."""

    def __init__(self, disable: bool = False):
        self.disable, self.bar = disable, None

    def __call__(self, info) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=info.total, unit="step", disable=self.disable, leave=False)
        self.bar.update(info.step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- the other commands ----


def cmd_train(args) -> int:
    if importlib.util.find_spec("sdlab.train.cli") is None:
        raise SdlabError("`sdlab train` is not available in this installation: sdlab.train.cli is missing")
    from .train import cli as train_cli

    parser = argparse.ArgumentParser(prog="sdlab train")
    train_cli.add_arguments(parser)
    if not args.train_args:  # a training run takes a while: say what can be set rather than start one
        parser.print_help()
        return 0
    return train_cli.main(parser.parse_args(args.train_args)) or 0


def cmd_eval(args) -> int:
    from . import rng
    from .generation import sample_batch
    from .outputs import check_output_folder
    from .shapes.evaluate import eval_prompts, run_eval

    args.mode = "generate"
    base, _ = _base_params(args)
    check_output_folder(args.out, name=f"--out {args.out}")
    base = base.replace(seed=0 if base.seed is None else base.seed, batch_size=1)
    model, _ = _load_model(args, {})
    prompts = eval_prompts(seed=args.prompt_seed, n=args.n, kind=args.kind)
    done = [0]

    def generate_fn(batch: list[str]) -> list:
        # prompt k of the evaluation gets seed base + k, whatever the batching
        seeds = [base.seed + done[0] + i for i in range(len(batch))]
        params = base.replace(batch_size=len(batch)).resolved(model.config)
        result = sample_batch(model, batch, [params.negative_prompt] * len(batch), params, rng.generators(seeds))
        done[0] += len(batch)
        return result.images

    report = run_eval(generate_fn, prompts, args.out, batch_size=args.eval_batch)
    print(report.text)
    print(f"report: {args.out / 'report.txt'}; contact sheet: {report.contact_sheet}")
    return 0


def cmd_serve(args) -> int:
    try:
        from .server import ServerSettings, serve
    except ImportError as e:
        raise SdlabError(f"the server needs the 'server' extra: pip install 'sdlab[server]' ({e})") from None
    settings = ServerSettings(
        model=args.model, models_dir=args.models_dir, host=args.host, port=args.port, api_key=args.api_key,
        basic_auth=args.basic_auth, cors_origins=tuple(args.cors_origin),
        allowed_hosts=tuple(args.allowed_host), queue_size=args.queue_size,
        max_images=args.max_images, shutdown_grace_s=args.grace, device=args.device, dtype=args.dtype,
        low_memory=args.low_memory, plain=args.plain, quantize=args.quantize,
        lora_dirs=tuple(args.lora_dirs), max_job_seconds=args.max_job_seconds, job_timeout_s=args.job_timeout,
        max_image_pixels=args.max_image_pixels,
        log_level="info" if args.verbose else "warning",
    )
    print(f"sdlab: serving {args.model} on http://{args.host}:{args.port}/", file=sys.stderr)
    serve(settings)
    return 0


def cmd_convert(args) -> int:
    from .checkpoints import load_checkpoint, save_diffusers, save_single_file
    from .model import check_checkpoint

    layout = args.layout or ("single-file" if args.dest.suffix == ".safetensors" else "diffusers")
    ckpt = load_checkpoint(args.source)
    check_checkpoint(ckpt)  # weights that `load` would refuse are refused before anything is written
    save = save_single_file if layout == "single-file" else save_diffusers
    dtype = DTYPES[args.dtype] if args.dtype else None
    path = save(args.dest, ckpt.config, ckpt.weights, dtype=dtype, overwrite=args.overwrite)
    print(f"{path} ({layout}, {ckpt.config.name}{', ' + args.dtype if args.dtype else ''})")
    return 0


def cmd_info(args) -> int:
    from .checkpoint_info import describe_checkpoint, format_info

    info = describe_checkpoint(args.path, hash_files=not args.no_hash)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def cmd_samplers(args) -> int:
    specs = [get_sampler(name) for name in sampler_names()]
    if args.json:
        rows = [{"name": s.label, "key": s.key, "aliases": list(s.aliases), "reference": s.reference,
                 "stochastic": s.stochastic} for s in specs]
        print(json.dumps({"samplers": rows, "schedules": list(SCHEDULES)}, indent=2))
        return 0
    print("samplers (name, key, diffusers equivalent):")
    for s in specs:
        keys = ", ".join((s.key, *s.aliases))
        print(f"  {s.label:<14} {keys:<28} {s.reference or '-'}{'  [stochastic]' if s.stochastic else ''}")
    print("schedules: " + ", ".join(SCHEDULES))
    return 0


# ---- entry point ----


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        args.train_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return args.run(args)
    except SdlabError as e:
        print(f"sdlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
