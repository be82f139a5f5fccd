"""sdlab against the CPU engines users pick instead, on the same weights, in one run: diffusers, OpenVINO
(optimum-intel) and stable-diffusion.cpp, each at its precisions, at 1 and 2 threads.

    python benchmarks/peers.py                          # 256x256, 20 Euler steps, CFG 7.5, 3 repeats, threads 1,2
    python benchmarks/peers.py --quick --repeats 1 --threads 2      # sanity run: 128x128, 2 steps
    python benchmarks/peers.py --engines sdlab-bf16,sdlab-bf16-int8,openvino-int8,sdcpp-q8_0

Every engine loads one random-weight SD 1.5-config model: the diffusers folder that benchmarks/inference.py
builds once with seed 0 and caches (`--model` takes any other SD 1.x folder). The peers get it in their
own formats, exported once and cached next to the folder: OpenVINO IR through optimum-intel
(`<folder>-openvino-fp32`, and `<folder>-openvino-int8` with 8-bit weight compression,
OVWeightQuantizationConfig(bits=8)); stable-diffusion.cpp one safetensors file in the original SD
checkpoint key layout, written by sdlab (`Model.save(..., layout="single-file")`, `<folder>.safetensors`),
which it converts to its `wtype` (f32, f16, q8_0) as it loads.

All sample the same prompt with Euler (diffusers' EulerDiscreteScheduler with timestep_spacing="leading",
sdlab's "Euler", sd.cpp's "euler" with its "discrete" schedule), the same steps, CFG scale and seed. Each run
is its own subprocess, so peak RSS (`ru_maxrss`, which counts the C++ engines' allocations too) is that
engine's alone, and runs are interleaved (every engine and thread count once, then again) so that load from
other processes hits all alike; the table shows medians over the repeats. Threads: torch.set_num_threads
(diffusers, sdlab), ov_config INFERENCE_NUM_THREADS (OpenVINO), n_threads (sd.cpp).

Engines:
  diffusers-fp32, diffusers-bf16      StableDiffusionPipeline(torch_dtype=...), the reference (fp32)
  sdlab-fp32, sdlab-bf16              sdlab.load(folder, dtype=...): the fast path
  sdlab-bf16-int8                     sdlab.load(folder, dtype=torch.bfloat16, quantize="int8")
  openvino-fp32, openvino-bf16        OVStableDiffusionPipeline on the fp32 IR, INFERENCE_PRECISION_HINT f32 /
                                      bf16 (bf16 only where OpenVINO lists BF16 among the CPU's capabilities)
  openvino-int8                       the IR with 8-bit weights (compute in f32)
  sdcpp-f32, sdcpp-f16, sdcpp-q8_0    stable_diffusion_cpp.StableDiffusion(wtype=...)
The OpenVINO pipelines are reshaped to static shapes (batch 1, --size) before compiling, as OpenVINO
recommends for speed.

Columns: "s/image" is a warm call (prompt encoding, sampling, VAE decode, to an image) after a first,
untimed-for-the-column call ("first call"); "s/step" is (s/image - the warm time of a 1-step call of the same
engine) / (steps - 1): one sampler step (batch 2, conditional and unconditional) told the same way for every
engine, without hooks inside the C++ ones. "max px diff" is the largest difference of a pixel (0-255) to
diffusers fp32's image: sdlab draws its noise from torch's CPU generator as diffusers does, OpenVINO's
pipeline is handed the same torch-drawn latents (`latents=`); stable-diffusion.cpp draws its own noise
("n/a (own RNG)").

Peers are optional (`pip install -e .[peers]` names them); the script checks which are usable, prints how to
install the missing ones and runs the others. optimum-intel 2.2 needs transformers<5.6 and diffusers of that
time, older than the test extra's: its child process can get its own copies in a folder put first on its
PYTHONPATH (`--openvino-site`, default /tmp/sdlab_bench/openvino-site; the install line is printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import inference  # benchmarks/ is the script's folder: sys.path[0]
from inference import DTYPES, NEGATIVE, PROMPT

OPENVINO_SITE = Path(tempfile.gettempdir()) / "sdlab_bench" / "openvino-site"


@dataclasses.dataclass(frozen=True)
class Engine:
    name: str
    kind: str  # diffusers, sdlab, openvino, sdcpp: which loader of the child side
    precision: str  # fp32 / bf16 (torch and OpenVINO), or sd.cpp's wtype


ENGINES = {e.name: e for e in [
    Engine("diffusers-fp32", "diffusers", "fp32"), Engine("diffusers-bf16", "diffusers", "bf16"),
    Engine("sdlab-fp32", "sdlab", "fp32"), Engine("sdlab-bf16", "sdlab", "bf16"),
    Engine("sdlab-bf16-int8", "sdlab", "bf16-int8"),
    Engine("openvino-fp32", "openvino", "fp32"), Engine("openvino-bf16", "openvino", "bf16"),
    Engine("openvino-int8", "openvino", "int8"),
    Engine("sdcpp-f32", "sdcpp", "f32"), Engine("sdcpp-f16", "sdcpp", "f16"), Engine("sdcpp-q8_0", "sdcpp", "q8_0"),
]}
REFERENCE = "diffusers-fp32"
OWN_RNG = {"sdcpp"}  # engines whose noise cannot be made torch's: no pixel difference

INSTALL = {
    "openvino": (
        'pip install "openvino>=2026.0" "nncf>=3.3" && pip install --no-deps "optimum-intel>=2.2" "optimum>=2.3"\n'
        "  # optimum-intel 2.2 needs transformers<5.6 and a diffusers of its time: its child gets its own copies\n"
        "  pip install --no-deps --target {site} transformers==5.5.4 tokenizers==0.22.2 huggingface-hub==1.21.0 "
        "diffusers==0.39.0"),
    "sdcpp": 'CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=ON" pip install stable-diffusion-cpp-python>=0.4.7  '
             "# builds from source: about half an hour on 2 cores",
}


class Skip(Exception):
    """The engine cannot run here; the message says why."""


# ---------------------------------------------------------------------------------------------- child side


def _torch_latents(spec: dict):
    """(1, 4, size/8, size/8) fp32 noise drawn from torch's CPU generator as diffusers draws it."""
    import torch

    generator = torch.Generator().manual_seed(spec["seed"])
    return torch.randn((1, 4, spec["size"] // 8, spec["size"] // 8), generator=generator, dtype=torch.float32)


def _to_uint8(images):
    """The first of a pipeline's output_type="np" images as (H, W, 3) uint8."""
    import numpy as np

    return (images[0] * 255).round().clip(0, 255).astype(np.uint8)


def _euler(pipe) -> None:
    import diffusers

    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")
    pipe.set_progress_bar_config(disable=True)


def _load_diffusers(spec: dict):
    import diffusers
    import torch

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        spec["model"], torch_dtype=getattr(torch, DTYPES[spec["precision"]]), safety_checker=None,
        requires_safety_checker=False)
    _euler(pipe)

    def run(steps):
        generator = torch.Generator().manual_seed(spec["seed"])
        return _to_uint8(pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps,
                              guidance_scale=spec["cfg"], height=spec["size"], width=spec["size"],
                              generator=generator, output_type="np").images)

    return run


def _load_sdlab(spec: dict):
    import numpy as np
    import torch

    import sdlab

    dtype_name, _, quantize = spec["precision"].partition("-")
    options = {}
    if quantize:
        options["quantize"] = quantize
    model = sdlab.load(spec["model"], dtype=getattr(torch, DTYPES[dtype_name]), **options)
    params = sdlab.GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, width=spec["size"], height=spec["size"],
                                    sampler="Euler", schedule="automatic", cfg_scale=spec["cfg"], seed=spec["seed"])

    def run(steps):
        generator = torch.Generator().manual_seed(spec["seed"])
        image = sdlab.generate(model, params.replace(steps=steps), generator=generator).images[0]
        return np.asarray(image, dtype=np.uint8)

    return run


def _load_openvino(spec: dict):
    import openvino
    from optimum.intel.openvino import OVStableDiffusionPipeline

    hint = {"fp32": "f32", "int8": "f32", "bf16": "bf16"}[spec["precision"]]
    if hint == "bf16" and "BF16" not in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        raise Skip("OpenVINO lists no BF16 among this CPU's optimization capabilities")
    ov_config = {"INFERENCE_NUM_THREADS": spec["threads"], "INFERENCE_PRECISION_HINT": hint, "CACHE_DIR": ""}
    pipe = OVStableDiffusionPipeline.from_pretrained(spec["export"], ov_config=ov_config, compile=False)
    pipe.reshape(batch_size=1, height=spec["size"], width=spec["size"], num_images_per_prompt=1)
    pipe.compile()
    _euler(pipe)
    latents = _torch_latents(spec)

    def run(steps):
        return _to_uint8(pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps,
                              guidance_scale=spec["cfg"], height=spec["size"], width=spec["size"],
                              latents=latents.clone(), output_type="np").images)

    return run


def _load_sdcpp(spec: dict):
    import numpy as np
    from stable_diffusion_cpp import StableDiffusion

    engine = StableDiffusion(model_path=spec["export"], wtype=spec["precision"], n_threads=spec["threads"],
                             verbose=False)

    def run(steps):
        image = engine.generate_image(PROMPT, negative_prompt=NEGATIVE, width=spec["size"], height=spec["size"],
                                      cfg_scale=spec["cfg"], sample_method="euler", scheduler="discrete",
                                      sample_steps=steps, seed=spec["seed"])[0]
        return np.asarray(image.convert("RGB"), dtype=np.uint8)

    return run


LOADERS = {"diffusers": _load_diffusers, "sdlab": _load_sdlab, "openvino": _load_openvino, "sdcpp": _load_sdcpp}


def child(spec: dict) -> dict:
    """Load one engine, time a first call, a warm call and a warm 1-step call; report one JSON line."""
    import numpy as np

    inference._set_threads(spec["threads"])  # torch's threads; the C++ engines take theirs from the spec
    start = time.perf_counter()
    run = LOADERS[spec["kind"]](spec)
    load_s = time.perf_counter() - start
    timings = {}
    for key, steps in (("first_s", spec["steps"]), ("image_s", spec["steps"]), ("one_step_s", 1)):
        start = time.perf_counter()
        image = run(steps)
        timings[key] = time.perf_counter() - start
        if key == "image_s":
            np.save(spec["image"], image)
    step_s = (timings["image_s"] - timings["one_step_s"]) / (spec["steps"] - 1) if spec["steps"] > 1 else None
    return {"load_s": load_s, **timings, "step_s": step_s,
            "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def export_openvino(folder: str, target: str, int8: bool) -> None:
    """Write `folder` as OpenVINO IR (fp32 weights, or 8-bit weight-compressed) through optimum-intel."""
    from optimum.intel.openvino import OVStableDiffusionPipeline, OVWeightQuantizationConfig

    options = {"quantization_config": OVWeightQuantizationConfig(bits=8)} if int8 else {"load_in_8bit": False}
    pipe = OVStableDiffusionPipeline.from_pretrained(folder, export=True, compile=False, **options)
    pipe.save_pretrained(target)


def export_single_file(folder: str, target: str) -> None:
    """Write `folder` as one safetensors file in the original SD checkpoint layout (sd.cpp reads that)."""
    import sdlab

    sdlab.load(folder, plain=True).save(target, layout="single-file")


# --------------------------------------------------------------------------------------------- parent side


def _python(cmd_args: list[str], site: Path | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if site is not None:  # the OpenVINO child's own transformers/diffusers, ahead of the installed ones
        env["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, *cmd_args], capture_output=True, text=True, check=False, env=env)


def site_for(kind: str, args) -> Path | None:
    return args.openvino_site if kind == "openvino" and args.openvino_site.is_dir() else None


def missing_peers(kinds: set[str], args) -> dict[str, str]:
    """{kind: why it cannot run} for the peers among `kinds` that are not usable here."""
    missing = {}
    if "openvino" in kinds:
        probe = _python(["-c", "import openvino, optimum.intel.openvino.modeling_diffusion"],
                        site_for("openvino", args))
        if probe.returncode:
            missing["openvino"] = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else "import failed"
    if "sdcpp" in kinds and importlib.util.find_spec("stable_diffusion_cpp") is None:
        missing["sdcpp"] = "stable_diffusion_cpp is not installed"
    return missing


def ensure_exports(model: str, engines: list[Engine], args) -> dict[str, str]:
    """{engine name: the file or folder it loads}, exporting (once, cached next to `model`) what is missing."""
    exports = {}
    for engine in engines:
        if engine.kind == "openvino":
            exports[engine.name] = f"{model}-openvino-{'int8' if engine.precision == 'int8' else 'fp32'}"
        elif engine.kind == "sdcpp":
            exports[engine.name] = f"{model}.safetensors"
    for target in sorted(set(exports.values())):
        if Path(target).exists():
            continue
        if target.endswith(".safetensors"):
            task, site = ["export-single-file", model, target], None
        else:
            task = ["export-openvino", model, target, "int8" if target.endswith("int8") else "fp32"]
            site = site_for("openvino", args)
        print(f"exporting {model} to {target} (once) ...", flush=True)
        proc = _python([__file__, "--export", json.dumps(task)], site)
        if proc.returncode:
            raise RuntimeError(f"export to {target} failed:\n{proc.stderr[-3000:]}")
    return exports


def run_child(spec: dict, args) -> dict:
    """One engine's result, or {"skip": why}."""
    proc = _python([__file__, "--child", json.dumps(spec)], site_for(spec["kind"], args))
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("SKIP "):
            return {"skip": line.removeprefix("SKIP ")}
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    raise RuntimeError(f"{spec['engine']} at {spec['threads']} threads failed:\n{proc.stderr[-3000:]}")


def measure(args, model: str, engines: list[Engine], exports: dict[str, str], workdir: str) -> dict:
    """{(engine name, threads): [result per repeat]}, interleaved across engines and thread counts."""
    runs: dict[tuple[str, int], list[dict]] = {}
    skipped: set[str] = set()
    for repeat in range(args.repeats):
        for threads in args.threads:
            for engine in engines:
                if engine.name in skipped:
                    continue
                spec = {"engine": engine.name, "kind": engine.kind, "precision": engine.precision, "model": model,
                        "export": exports.get(engine.name), "threads": threads, "size": args.size,
                        "steps": args.steps, "cfg": args.cfg, "seed": args.seed,
                        "image": os.path.join(workdir, f"{engine.name}_{threads}.npy")}
                result = run_child(spec, args)
                if "skip" in result:
                    print(f"  skipping {engine.name}: {result['skip']}", flush=True)
                    skipped.add(engine.name)
                    continue
                result["image"] = spec["image"]
                runs.setdefault((engine.name, threads), []).append(result)
                step = f"{result['step_s']:.3f}s" if result["step_s"] is not None else "-"
                print(f"  repeat {repeat + 1}/{args.repeats} {engine.name:16s} {threads} threads: "
                      f"image {result['image_s']:.2f}s, step {step}, first call {result['first_s']:.2f}s, "
                      f"RSS {result['rss_gb']:.2f} GB", flush=True)
    return runs


def table(runs: dict) -> str:
    rows = ["| engine | precision | threads | s/image (warm) | s/step | first call (s) | load (s) | peak RSS (GB) "
            "| max px diff vs diffusers fp32 |", "|---|---|---|---|---|---|---|---|---|"]
    for (name, threads), results in runs.items():
        engine = ENGINES[name]
        m = {key: inference.median_of(results, key) for key in ("image_s", "step_s", "first_s", "load_s", "rss_gb")}
        reference = runs.get((REFERENCE, threads)) or next(
            (r for (n, _), r in runs.items() if n == REFERENCE), None)
        if engine.kind in OWN_RNG:
            diff = "n/a (own RNG)"
        elif name == REFERENCE:
            diff = "-"
        else:
            diff = str(inference.pixel_diff(results[0]["image"], reference[0]["image"])) if reference else "-"
        step = f"{m['step_s']:.3f}" if m["step_s"] is not None else "-"
        rows.append(f"| {engine.kind} | {engine.precision} | {threads} | {m['image_s']:.2f} | {step} "
                    f"| {m['first_s']:.2f} | {m['load_s']:.1f} | {m['rss_gb']:.2f} | {diff} |")
    return "\n".join(rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="an SD 1.x diffusers folder (default: the cached random-weight SD 1.5 one)")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {', '.join(ENGINES)}")
    p.add_argument("--threads", default="1,2", help="comma list of thread counts")
    p.add_argument("--size", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--repeats", type=int)
    p.add_argument("--quick", action="store_true", help="128x128, 2 steps, 1 repeat")
    p.add_argument("--openvino-site", type=Path, default=OPENVINO_SITE,
                   help="a folder put first on the OpenVINO child's PYTHONPATH, if it exists (its own transformers)")
    p.add_argument("--markdown", help="also write the table to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--export", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = {"size": 128, "steps": 2, "repeats": 1} if args.quick else {"size": 256, "steps": 20, "repeats": 3}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = [name for name in args.engines.split(",") if name not in ENGINES]
    if unknown:
        p.error(f"--engines: unknown {', '.join(unknown)}; valid: {', '.join(ENGINES)}")
    args.engines = [ENGINES[name] for name in args.engines.split(",")]
    args.threads = [int(t) for t in args.threads.split(",")]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        try:
            print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        except Skip as why:
            print(f"SKIP {why}", flush=True)
        return 0
    if args.export:
        task, *task_args = json.loads(args.export)
        if task == "export-openvino":
            export_openvino(task_args[0], task_args[1], int8=task_args[2] == "int8")
        else:
            export_single_file(*task_args)
        return 0
    kinds = {engine.kind for engine in args.engines}
    missing = missing_peers(kinds, args)
    for kind, why in missing.items():
        print(f"{kind} is not usable here ({why}); to install it:\n  "
              f"{INSTALL[kind].format(site=args.openvino_site)}", flush=True)
    engines = [engine for engine in args.engines if engine.kind not in missing]
    model = inference.ensure_model(args.model)
    exports = ensure_exports(model, engines, args)
    print(f"cpu, {args.size}x{args.size}, {args.steps} Euler steps, CFG {args.cfg}, seed {args.seed}, "
          f"threads {','.join(map(str, args.threads))}", flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        runs = measure(args, model, engines, exports, workdir)
        text = table(runs)
    inference.report(__file__, argv, text, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
