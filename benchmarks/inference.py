"""sdlab against diffusers, side by side on the same weights: time per UNet step, end-to-end time, peak memory,
achieved TFLOP/s and the largest pixel difference between the two images.

    python benchmarks/inference.py                    # CPU: fp32 and bf16, 256x256, 20 steps, 3 repeats
    python benchmarks/inference.py --quick            # sanity run: 128x128, 4 steps, 1 repeat
    python benchmarks/inference.py --device cuda      # GPU: fp16, 512x512, 50 steps (skips without CUDA)
    python benchmarks/inference.py --variants sdlab,sdlab-plain,diffusers --precisions bf16
    python benchmarks/inference.py --family sdxl      # SDXL base: bf16, 512x512, 10 steps, 1 repeat
    python benchmarks/inference.py --dropin --precisions fp32 --variants sdlab,sdlab-plain,diffusers
                                                      # diffusers' example, import changed (folder's scheduler)

Both pipelines load one random-weight SD 1.5-config (or, with `--family sdxl`, SDXL-base-config) model (a
diffusers folder, built once with seed 0 and cached, SDXL's in fp16; `--model` takes any other folder) and sample the same prompt with DPM++ 2M (diffusers'
DPMSolverMultistepScheduler with timestep_spacing="leading", as sdlab's registry pairs them), the same CFG
scale and seed. Every run is its own subprocess, so peak RSS (`ru_maxrss`) is measured per pipeline, and
runs are interleaved (sdlab, diffusers, sdlab, ...) so that load from other processes on a shared machine
hits both alike; the table shows medians over the repeats.

Variants:
  diffusers     StableDiffusion(XL)Pipeline.from_pretrained(torch_dtype=...), the reference
  sdlab         sdlab.load(..., dtype=...): the default, fast path (weights packed for oneDNN)
  sdlab-plain   sdlab.load(..., dtype=..., plain=True): the plain path (weights as the checkpoint has them)
  sdlab-compile the fast path plus torch.compile of the UNet (compile time shows in "first call")
  sdlab-int8    the fast path with the UNet's convolutions and linear layers in int8 (quantize="int8"; the
                rest in the precision given: bf16 is the fastest mode)
  sdlab-lowmem  the fast path in low-memory mode (sdlab.load(..., low_memory=True)): one stage's networks in
                memory at a time; each generation converts and packs the UNet again (in "end to end")
  sdlab-lowmem-int8  both: low-memory mode with the UNet in int8
  sdlab-deepcache3, sdlab-tome50   the fast path plus an opt-in speedup that changes the image (DeepCache with
                the whole UNet every 3rd step; token merging of half the top level's tokens)

Columns: "UNet step" is the median wall time of one UNet call (batch 2: conditional and unconditional);
"end to end" the warm call (prompt encoding, sampling, VAE decode, to PIL), "first call" the first call
after loading; "TFLOP/s" = FLOP of one UNet call (counted once with torch.utils.flop_counter on the meta
device) / UNet step; "% of peak" divides by this machine's measured peak for the precision (--peak-*,
for 2 cores; scaled down for --threads 1),
"% of ceiling now" by the 3x3-conv throughput measured in the same process right after the run (on a shared
machine that is what was actually available).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a watercolor painting of a lighthouse on a cliff at dusk"
NEGATIVE = "blurry, low quality"
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
FAMILY_PRESETS = {"sd15": "sd15", "sdxl": "sdxl-base"}  # --family -> the preset of the random-weight model
_SD_ONLY = {"sd15": {"safety_checker": None, "requires_safety_checker": False}}  # diffusers options per family
# Opt-in speedups that change the image (the fast path plus these GenerationParams); their cost in prompt
# adherence is measured on the built-in model by benchmarks/quality_speedups.py.
QUALITY_TRADES = {"sdlab-deepcache3": {"deepcache": 3}, "sdlab-tome50": {"token_merging": 0.5}}
# Measured on the 2-core CPU machines (see docs/performance.md): fp32 3x3-conv ceiling, bf16 GEMM/conv ceiling.
DEFAULT_PEAKS = {"fp32": 0.42, "bf16": 0.9}
MACHINE_CORES = 2  # what DEFAULT_PEAKS were measured with; fewer threads get a proportional share


# ---------------------------------------------------------------------------------------------- child side


def _set_threads(threads: int) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


class StepTimer:
    """Times every call of a network (forward pre/post hooks), synchronising the GPU when there is one.
    `last` (default: `module`) is the submodule whose end ends a call."""

    def __init__(self, module, device: str, last=None):
        import torch

        self.times: list[float] = []
        self._sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        module.register_forward_pre_hook(self._start)
        (last or module).register_forward_hook(self._stop)

    def _start(self, *_):
        self._sync()
        self._t0 = time.perf_counter()

    def _stop(self, *_):
        self._sync()
        self.times.append(time.perf_counter() - self._t0)


def _load_diffusers(spec: dict):
    import diffusers
    import torch

    dtype = getattr(torch, DTYPES[spec["precision"]])
    cls = diffusers.DiffusionPipeline  # the folder's own pipeline class: StableDiffusion(XL)Pipeline
    pipe = cls.from_pretrained(spec["model"], torch_dtype=dtype, **_SD_ONLY.get(spec["family"], {}))
    if not spec["dropin"]:
        pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config,
                                                                           timestep_spacing="leading")
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(spec["device"])
    return _pipeline_call(pipe, spec), StepTimer(pipe.unet, spec["device"])


def _load_sdlab_dropin(spec: dict):
    """diffusers' own call with the import changed: sdlab.DiffusionPipeline, the folder's scheduler."""
    import torch

    import sdlab

    dtype = getattr(torch, DTYPES[spec["precision"]])
    pipe = sdlab.DiffusionPipeline.from_pretrained(spec["model"], torch_dtype=dtype,
                                                   plain=spec["variant"] == "sdlab-plain")
    return _pipeline_call(pipe, spec), StepTimer(pipe.unet, spec["device"])


def _pipeline_call(pipe, spec: dict):
    """run(seed) -> the (H, W, 3) uint8 image of a diffusers-style pipeline call (diffusers' or sdlab's)."""
    import numpy as np
    import torch

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=spec["steps"], guidance_scale=spec["cfg"],
                   height=spec["size"], width=spec["size"], generator=generator, output_type="np").images
        return (out[0] * 255).round().clip(0, 255).astype(np.uint8)

    return run


def _load_sdlab(spec: dict):
    import numpy as np
    import torch

    import sdlab
    from sdlab import perf

    if spec["dropin"]:
        return _load_sdlab_dropin(spec)
    dtype = getattr(torch, DTYPES[spec["precision"]])
    variant = spec["variant"]
    model = sdlab.load(spec["model"], dtype=dtype, device=spec["device"],  # converted as it is read; packed
                       low_memory=variant.startswith("sdlab-lowmem"), plain=variant == "sdlab-plain",
                       quantize="int8" if variant.endswith("int8") else None)
    if variant == "sdlab-compile":
        model = perf.optimize(model, compile=True)
    speedup = QUALITY_TRADES.get(variant, {})
    if "deepcache" in speedup:  # its shallow calls skip UNet.forward: time from conv_in to conv_out instead
        timer = StepTimer(model.unet.conv_in, spec["device"], last=model.unet.conv_out)
    else:
        timer = StepTimer(model.unet, spec["device"])
    params = sdlab.GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, width=spec["size"], height=spec["size"],
                                    steps=spec["steps"], sampler="DPM++ 2M", schedule="automatic",
                                    cfg_scale=spec["cfg"], **speedup)

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        image = sdlab.generate(model, params.replace(seed=seed), generator=generator).images[0]
        return np.asarray(image, dtype=np.uint8)

    return run, timer


def conv_ceiling(precision: str, device: str, repeats: int = 5) -> float:
    """TFLOP/s of a 3x3 conv, 320 -> 320 channels on 2x64x64 channels_last (MEASUREMENTS.md's ceiling),
    measured now, in this process: on a shared machine the nominal peak is not what is available."""
    import torch
    import torch.nn.functional as F

    dtype = getattr(torch, DTYPES[precision])
    x = torch.randn(2, 320, 64, 64, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(320, 320, 3, 3, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats + 1):
        sync()
        start = time.perf_counter()
        F.conv2d(x, w, padding=1)
        sync()
        times.append(time.perf_counter() - start)
    return 2 * 2 * 64 * 64 * 320 * 320 * 9 / statistics.median(times[1:]) / 1e12


def child(spec: dict) -> dict:
    """Load one pipeline, generate `gens` times, and report timings and peak memory (one JSON line)."""
    import numpy as np
    import torch

    _set_threads(spec["threads"])
    torch.manual_seed(0)
    start = time.perf_counter()
    run, timer = (_load_diffusers if spec["variant"] == "diffusers" else _load_sdlab)(spec)
    load_s = time.perf_counter() - start
    calls, image = [], None
    for _ in range(spec["gens"]):
        start = time.perf_counter()
        image = run(spec["seed"])
        calls.append(time.perf_counter() - start)
    np.save(spec["image"], image)
    steps = timer.times[1:] if len(timer.times) > 1 else timer.times  # the first call builds kernels
    result = {"load_s": load_s, "first_s": calls[0], "e2e_s": calls[-1], "step_s": statistics.median(steps),
              "unet_calls": len(timer.times), "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    result["ceiling_tflops"] = conv_ceiling(spec["precision"], spec["device"])
    if spec["device"] == "cuda":
        result["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


# --------------------------------------------------------------------------------------------- parent side


def unet_flop(folder: str, size: int, batch: int = 2) -> float:
    """FLOP of one UNet call of the model in `folder` on `size`x`size` images, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sdlab.checkpoints.diffusers_folder import read_folder_config
    from sdlab.nn.unet import UNet

    config = read_folder_config(Path(folder))
    f = config.vae.downscale
    with torch.device("meta"):
        unet = UNet(config.unet)
        x = torch.empty(batch, config.unet.in_channels, size // f, size // f)
        context = torch.empty(batch, 77, config.unet.context_dim)
        added = {"added": torch.empty(batch, config.unet.added_dim)} if config.unet.added_dim else {}
        with FlopCounterMode(display=False) as counter:
            unet(x, torch.full((batch,), 500.0), context, **added)
    return counter.get_total_flops()


def ensure_model(path: str | None, family: str = "sd15") -> str:
    """The model folder to benchmark: `path`, or a random model of the family's preset built once (seed 0)
    and cached (SDXL's in fp16: 7 GB instead of 14)."""
    if path:
        return path
    folder = Path(tempfile.gettempdir()) / "sdlab_bench" / family
    if not (folder / "model_index.json").is_file():
        import torch

        import sdlab

        preset = FAMILY_PRESETS[family]
        print(f"building a random {preset}-config model in {folder} (once) ...", flush=True)
        torch.manual_seed(0)
        dtype = torch.float16 if family == "sdxl" else None
        model = sdlab.Model.build(sdlab.PRESETS[preset], dtype=torch.bfloat16 if dtype else torch.float32)
        model.save(folder, dtype=dtype)
    return str(folder)


def run_child(spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{spec['variant']} {spec['precision']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def pixel_diff(a_path: str, b_path: str) -> int:
    import numpy as np

    a, b = np.load(a_path).astype(np.int16), np.load(b_path).astype(np.int16)
    return int(np.abs(a - b).max())


def measure(args, model: str, workdir: str) -> dict:
    """{(variant, precision): [result per repeat]}, runs interleaved across variants and precisions."""
    runs: dict[tuple[str, str], list[dict]] = {}
    for repeat in range(args.repeats):
        for precision in args.precisions:
            for variant in args.variants:
                spec = {"variant": variant, "precision": precision, "model": model, "device": args.device,
                        "family": args.family,
                        "size": args.size, "steps": args.steps, "cfg": args.cfg, "seed": args.seed,
                        "gens": args.gens, "threads": args.threads, "dropin": args.dropin,
                        "image": os.path.join(workdir, f"{variant}_{precision}.npy")}
                result = run_child(spec)
                result["image"] = spec["image"]
                runs.setdefault((variant, precision), []).append(result)
                print(f"  repeat {repeat + 1}/{args.repeats} {variant:13s} {precision}: "
                      f"step {result['step_s']:.3f}s, end to end {result['e2e_s']:.2f}s, "
                      f"first call {result['first_s']:.2f}s, RSS {result['rss_gb']:.2f} GB", flush=True)
    return runs


def median_of(results: list[dict], key: str) -> float | None:
    """The median of `key` over the repeats' results, leaving out those without it (None: none has it)."""
    values = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(values) if values else None


def report(script: str, argv: list[str] | None, text: str, markdown: str | None) -> None:
    """Print the command line that made `text` (a table) and the table; also write both to `markdown`."""
    command = f"python benchmarks/{Path(script).name} " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"\n{command}\n\n{text}")
    if markdown:
        Path(markdown).write_text(f"`{command}`\n\n{text}\n")


def table(args, runs: dict, flop: float) -> str:
    header = ("| pipeline | precision | UNet step (s) | end to end (s) | first call (s) | load (s) | peak RSS (GB) "
              "| UNet TFLOP/s | % of peak | % of ceiling now | time vs diffusers (step / e2e) | RSS vs diffusers "
              "| max px diff vs diffusers |")
    rows = [header, "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (variant, precision), results in runs.items():
        keys = ("step_s", "e2e_s", "first_s", "load_s", "rss_gb", "ceiling_tflops")
        m = {key: median_of(results, key) for key in keys}
        tflops = flop / m["step_s"] / 1e12
        peak = args.peaks.get(precision)
        if peak and args.device == "cpu" and args.threads:  # the peaks are for both cores
            peak *= min(args.threads, MACHINE_CORES) / MACHINE_CORES
        ref = runs.get(("diffusers", precision))
        ratio = rss = diff = "-"
        if ref and variant != "diffusers":
            ratio = f"{m['step_s'] / median_of(ref, 'step_s'):.2f} / {m['e2e_s'] / median_of(ref, 'e2e_s'):.2f}"
            rss = f"{m['rss_gb'] / median_of(ref, 'rss_gb'):.2f}"
            diff = str(pixel_diff(results[0]["image"], ref[0]["image"]))
        if precision != "fp32" and (variant, "fp32") in runs:
            diff += f" (vs its fp32: {pixel_diff(results[0]['image'], runs[(variant, 'fp32')][0]['image'])})"
        memory = f"{m['rss_gb']:.2f}"
        if "gpu_peak_gb" in results[0]:
            memory += f" (GPU {median_of(results, 'gpu_peak_gb'):.2f})"
        rows.append(f"| {variant} | {precision} | {m['step_s']:.3f} | {m['e2e_s']:.2f} | {m['first_s']:.2f} "
                    f"| {m['load_s']:.1f} | {memory} | {tflops:.3f} "
                    f"| {f'{100 * tflops / peak:.0f}%' if peak else '-'} "
                    f"| {100 * tflops / m['ceiling_tflops']:.0f}% | {ratio} | {rss} | {diff} |")
    return "\n".join(rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--family", default="sd15", choices=sorted(FAMILY_PRESETS),
                   help="the random-weight model's family (sdxl: the SDXL base config)")
    p.add_argument("--model", help="a diffusers folder of --family (default: a cached random-weight one)")
    p.add_argument("--precisions", help="comma list of fp32, bf16, fp16 (default: fp32,bf16 on CPU, fp16 on GPU)")
    p.add_argument("--variants", default="sdlab,diffusers",
                   help="comma list of sdlab, sdlab-plain, sdlab-compile, sdlab-int8, sdlab-lowmem, "
                   f"sdlab-lowmem-int8, {', '.join(QUALITY_TRADES)}, diffusers")
    p.add_argument("--size", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--repeats", type=int)
    p.add_argument("--gens", type=int, default=2, help="generations per process; the last one is 'end to end'")
    p.add_argument("--threads", type=int, default=2, help="torch threads (0 = torch's default)")
    p.add_argument("--quick", action="store_true", help="128x128, 4 steps, 1 repeat")
    p.add_argument("--dropin", action="store_true",
                   help="diffusers' example as a user writes it: DiffusionPipeline.from_pretrained and pipe(...) with "
                   "the folder's own scheduler (PNDM for SD 1.5), sdlab's with only the import changed (variants "
                   "sdlab and sdlab-plain)")
    p.add_argument("--peak-fp32", type=float, default=DEFAULT_PEAKS["fp32"], help="machine peak, TFLOP/s")
    p.add_argument("--peak-bf16", type=float, default=DEFAULT_PEAKS["bf16"])
    p.add_argument("--peak-fp16", type=float, help="(GPU) peak fp16 TFLOP/s, for the %% column")
    p.add_argument("--markdown", help="also write the table to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    defaults = {"size": 512 if gpu else 256, "steps": 50 if gpu else 20, "repeats": 3}
    if args.family == "sdxl" and not gpu:  # what fits in 24 GB and a few minutes per run on 2 cores
        defaults = {"size": 512, "steps": 10, "repeats": 1}
        args.precisions = args.precisions or "bf16"
    if args.quick:
        defaults = {"size": 128, "steps": 4, "repeats": 1}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.precisions = (args.precisions or ("fp16" if gpu else "fp32,bf16")).split(",")
    args.variants = args.variants.split(",")
    args.peaks = {"fp32": args.peak_fp32, "bf16": args.peak_bf16, "fp16": args.peak_fp16}
    if gpu:  # the CPU peaks say nothing about a GPU
        args.peaks = {"fp16": args.peak_fp16}
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("CUDA is not available on this machine: skipping the GPU benchmark.")
            return 0
    model = ensure_model(args.model, args.family)
    flop = unet_flop(model, args.size)
    sampler = "the folder's scheduler (drop-in pipelines)" if args.dropin else "DPM++ 2M"
    print(f"{args.device}, {args.size}x{args.size}, {args.steps} steps of {sampler}, CFG {args.cfg}, seed {args.seed}, "
          f"{args.threads or 'default'} threads; one UNet call (batch 2) = {flop / 1e12:.3f} TFLOP", flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        runs = measure(args, model, workdir)
        text = table(args, runs, flop)
    report(__file__, argv, text, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
