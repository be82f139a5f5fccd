"""ControlNet's cost beside the UNet's: SD 1.5 sizes, random weights, fp32, fast path (prepacked), 256x256
(32x32 latents), CFG batch 2; median of 5 calls each, interleaved."""
import statistics, time, torch
from sdlab.config import SD15
from sdlab.nn.unet import UNet
from sdlab.nn.controlnet import ControlNet, ControlNetConfig
from sdlab.perf import prepack
torch.manual_seed(0)
unet = prepack(UNet(SD15.unet).eval().requires_grad_(False))
cn = prepack(ControlNet(ControlNetConfig.for_unet(SD15.unet)).eval().requires_grad_(False))
x, ctx, hint, t = torch.randn(2, 4, 32, 32), torch.randn(2, 77, 768), torch.rand(2, 3, 256, 256), torch.tensor([500, 500])
times = {"unet": [], "controlnet": [], "unet+control": []}
with torch.no_grad():
    for _ in range(6):
        t0 = time.perf_counter(); unet(x, t, ctx); t1 = time.perf_counter()
        r = cn(x, t, ctx, hint); t2 = time.perf_counter()
        unet(x, t, ctx, control=r); t3 = time.perf_counter()
        for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2)): times[k].append(v)
for k, v in times.items():
    print(f"{k}: {statistics.median(v[1:]):.3f} s")
print("controlnet / unet:", round(statistics.median(times["controlnet"][1:]) / statistics.median(times["unet"][1:]), 2))
