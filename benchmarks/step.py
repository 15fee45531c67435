"""One training step with all balanced-learning components vs the baseline step, side by side.

Faster R-CNN tiny: IS + BFP + BL vs baseline. RetinaNet tiny: BFP + BL + IoU-cls + IoU-loc vs
baseline. Both models of a detector train on the same batches, timed alternately so they see
the same machine load; the median step time of each gives the ratio (with / without). The
paper reports 1.06 for Libra R-CNN. Also reports the IoU-balanced sampler's share of the
Faster R-CNN step (time inside the positive + negative sampler calls / step time).

The last line printed is a JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from detection.config import load_config
from detection.data import write_synthetic_coco
from detection.engine.datamodule import DetectionDataModule
from detection.models.detectors import build_detector

ROOT = Path(__file__).resolve().parents[1]
ALL_COMPONENTS = {
    "faster_rcnn": ("configs/faster_rcnn_tiny.yaml", ["iou_balanced_sampling", "bfp", "balanced_l1"]),
    "retinanet": ("configs/retinanet_tiny.yaml", ["bfp", "balanced_l1", "iou_balanced_cls", "iou_balanced_loc"]),
}


class TimedCall:
    """Wraps a callable and accumulates the wall time spent in it."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        return out


def _model(config: str, components: list[str], data_root: Path, device: torch.device):
    cfg = load_config(ROOT / config, [f"data.root={data_root}"] + [f"components.{c}.enabled=true" for c in components])
    torch.manual_seed(0)
    data = DetectionDataModule(cfg)
    model = build_detector(cfg, data.num_classes).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return model, optimizer, data


def timed_step(model, optimizer, images, targets, device, amp: torch.dtype | None = None) -> float:
    """Seconds of one training step (forward under autocast to ``amp`` when given, backward, SGD step)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        losses = model([im.to(device) for im in images], [{k: v.to(device) if torch.is_tensor(v) else v
                                                             for k, v in t.items()} for t in targets])
    sum(losses.values()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_detector(name: str, data_root: Path, steps: int, warmup: int, device: torch.device) -> dict:
    config, components = ALL_COMPONENTS[name]
    base, base_opt, data = _model(config, [], data_root, device)
    full, full_opt, _ = _model(config, components, data_root, device)
    samplers = []
    if name == "faster_rcnn":
        full.roi_heads.sampler = TimedCall(full.roi_heads.sampler)
        samplers = [full.roi_heads.sampler]
    batches = list(data.train_dataloader())
    times = {"baseline": [], "components": []}
    for i in range(warmup + steps):
        images, targets = batches[i % len(batches)]
        for s in samplers:
            s.seconds = 0.0
        t_base = timed_step(base, base_opt, images, targets, device)
        t_full = timed_step(full, full_opt, images, targets, device)
        if i >= warmup:
            times["baseline"].append(t_base)
            times["components"].append(t_full)
            if samplers:
                times.setdefault("sampler", []).append(sum(s.seconds for s in samplers))
    base_s, full_s = statistics.median(times["baseline"]), statistics.median(times["components"])
    result = {"baseline_s": round(base_s, 4), "components_s": round(full_s, 4), "ratio": round(full_s / base_s, 3),
              "components": components}
    if samplers:
        result["sampler_share_of_step"] = round(statistics.median(
            s / t for s, t in zip(times["sampler"], times["components"])), 4)
    print(f"{name}: baseline {base_s * 1e3:.0f} ms/step, with {'+'.join(components)} {full_s * 1e3:.0f} ms/step, "
          f"ratio {full_s / base_s:.3f}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synthetic"
        write_synthetic_coco(root, seed=0, num_train=64, num_val=8, image_size=128)
        results = {name: bench_detector(name, root, args.steps, args.warmup, device) for name in ALL_COMPONENTS}
    results["device"] = str(device)
    results["ratio"] = max(r["ratio"] for r in results.values() if isinstance(r, dict))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
