"""What a run shows and leaves behind: a tqdm bar, a jsonl loss log, a loss-curve PNG and sample grids."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm.auto import tqdm


class ProgressBar:
    """A tqdm bar over optimizer steps showing loss and samples/s (tqdm itself gives the ETA)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)

    def update(self, loss: float, samples_per_s: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{samples_per_s:.1f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class LossLog:
    """One JSON object per logged step, appended and flushed as training goes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a crash: everything after it is untrustworthy too
        return records

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps after `step` (a resumed run recomputes them)."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def plot_loss_curve(records: Sequence[dict], path: str | Path, key: str = "loss",
                    size: tuple[int, int] = (640, 360)) -> Path | None:
    """A PNG of `key` against step (log scale when positive), raw in grey and smoothed in blue."""
    points = [(r["step"], float(r[key])) for r in records if key in r and math.isfinite(float(r[key]))]
    if len(points) < 2:
        return None
    use_log = all(v > 0 for _, v in points)
    ys = [math.log10(v) if use_log else v for _, v in points]
    xs = [s for s, _ in points]
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    box = (60, 20, size[0] - 20, size[1] - 40)  # left, top, right, bottom of the plot area
    to_px = _scaler(xs, ys, box)
    draw.rectangle(box, outline="black")
    draw.line([to_px(x, y) for x, y in zip(xs, ys)], fill=(170, 170, 170), width=1)
    draw.line([to_px(x, y) for x, y in zip(xs, _smooth(ys))], fill=(30, 90, 230), width=2)
    low, high = min(ys), max(ys)
    label = (lambda v: f"{10 ** v:.3g}") if use_log else (lambda v: f"{v:.3g}")
    draw.text((4, box[1]), label(high), fill="black")
    draw.text((4, box[3] - 10), label(low), fill="black")
    draw.text((box[0], box[3] + 8), f"step {xs[0]}", fill="black")
    draw.text((box[2] - 80, box[3] + 8), f"step {xs[-1]}", fill="black")
    draw.text((box[0] + 8, box[1] + 4), key + (" (log scale)" if use_log else ""), fill="black")
    path = Path(path)
    image.save(path)
    return path


def _scaler(xs, ys, box):
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    dx, dy = (x1 - x0) or 1, (y1 - y0) or 1
    left, top, right, bottom = box
    return lambda x, y: (left + (x - x0) / dx * (right - left), bottom - (y - y0) / dy * (bottom - top))


def _smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (as Adam's), so the start is not pulled to zero."""
    out, average = [], 0.0
    for i, v in enumerate(values):
        average = weight * average + (1 - weight) * v
        out.append(average / (1 - weight ** (i + 1)))
    return out


def image_grid(images: Sequence[Image.Image], columns: int) -> Image.Image:
    """Tile equally sized images row by row."""
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid
