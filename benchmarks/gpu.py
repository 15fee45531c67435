"""Training throughput of R50-FPN Faster R-CNN and RetinaNet on one GPU: every component vs the baseline.

For each detector (the ``configs/*_r50_coco_1x.yaml`` recipes), each combination (baseline; all of the
detector's components, as ``benchmarks/step.py``; Faster R-CNN with IoU-balanced sampling alone)
and each precision (fp32, bf16 and fp16 autocast), it trains a freshly built model on one fixed
batch of synthetic images (2 per GPU, 1333x800 by default, 8 random boxes each) and reports the
median seconds per iteration over ``--iters`` timed iterations after ``--warmup`` untimed ones,
images/s, and the peak CUDA memory (``torch.cuda.max_memory_allocated``) of the timed
iterations. Weights are random (``model.backbone.from_scratch``): throughput does not depend on
them. fp16 runs without a GradScaler, which changes no timing that matters here.

Ratios: each combination's s/iter over its detector's baseline at the same precision (the paper
reports about 1.06 for Libra R-CNN), and the IoU-balanced sampler's GPU cost against random
sampling: the median time inside the R-CNN sampler call per iteration, IoU-balanced / random.

The last line printed is one JSON object. Without CUDA (and ``--device cuda``) it prints
"skipped: no CUDA device" and exits 0; ``--device cpu --iters 2 --warmup 1 --size 320
--precisions fp32`` is a smoke run of the same code on the CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics

import torch

from detection.config import load_config
from detection.engine.cost import peak_rss_mb
from detection.models.detectors import build_detector
from step import ALL_COMPONENTS, ROOT, TimedCall, timed_step

R50_CONFIGS = {"faster_rcnn": "configs/faster_rcnn_r50_coco_1x.yaml", "retinanet": "configs/retinanet_r50_coco_1x.yaml"}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NUM_CLASSES = 80
BOXES_PER_IMAGE = 8


def combinations(detector: str) -> dict[str, list[str]]:
    """Combination name -> enabled components: baseline, all components, and IS alone for Faster R-CNN."""
    out = {"baseline": [], "all": ALL_COMPONENTS[detector][1]}
    if detector == "faster_rcnn":
        out["IS"] = ["iou_balanced_sampling"]
    return out


def synthetic_batch(images: int, short: int, long: int, device: torch.device, seed: int = 0
                    ) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """``images`` random ``short x long`` images with random boxes (sides 5-50 % of the image) and labels."""
    generator = torch.Generator().manual_seed(seed)
    batch, targets = [], []
    for _ in range(images):
        batch.append(torch.rand(3, short, long, generator=generator).to(device))
        size = torch.rand(BOXES_PER_IMAGE, 2, generator=generator) * 0.45 + 0.05
        corner = torch.rand(BOXES_PER_IMAGE, 2, generator=generator) * (1 - size)
        scale = torch.tensor([long, short], dtype=torch.float32)
        boxes = torch.cat([corner * scale, (corner + size) * scale], dim=1)
        labels = torch.randint(1, NUM_CLASSES + 1, (BOXES_PER_IMAGE,), generator=generator)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return batch, targets


def bench_combination(detector: str, components: list[str], precision: str, batch, short: int, long: int,
                  iters: int, warmup: int, device: torch.device) -> dict:
    """s/iter (median), images/s, peak memory and, for Faster R-CNN, the sampler's ms/iter (median)."""
    overrides = ["model.backbone.weights=null", "model.backbone.from_scratch=true", f"model.min_size={short}",
                 f"model.max_size={long}", *(f"components.{c}.enabled=true" for c in components)]
    cfg = load_config(ROOT / R50_CONFIGS[detector], overrides)
    torch.manual_seed(0)
    model = build_detector(cfg, NUM_CLASSES).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    sampler = None
    if detector == "faster_rcnn":
        sampler = model.roi_heads.sampler = TimedCall(model.roi_heads.sampler)
    images, targets = batch
    seconds, sampler_seconds = [], []
    for i in range(warmup + iters):
        if i == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if sampler is not None:
            sampler.seconds = 0.0
        step = timed_step(model, optimizer, images, targets, device, PRECISIONS[precision])
        if i >= warmup:
            seconds.append(step)
            if sampler is not None:
                sampler_seconds.append(sampler.seconds)
    s_iter = statistics.median(seconds)
    result = {"detector": detector, "combination": "+".join(components) or "baseline", "precision": precision,
              "s_per_iter": round(s_iter, 5), "images_per_s": round(len(images) / s_iter, 3),
              "peak_mem_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda"
              else None}
    if sampler_seconds:
        result["sampler_ms_per_iter"] = round(1000 * statistics.median(sampler_seconds), 4)
    del model, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default; cuda:N for another GPU) or cpu for a smoke run")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per combination and precision (median)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations before them (cuDNN autotuning, "
                        "allocator warm-up)")
    parser.add_argument("--size", type=int, default=800, help="short image side; the long side is size x 1333/800")
    parser.add_argument("--images-per-gpu", type=int, default=2, help="images per iteration")
    parser.add_argument("--precisions", default="fp32,bf16,fp16",
                        help=f"comma-separated, of {', '.join(PRECISIONS)} (bf16/fp16: autocast, as 16-mixed)")
    parser.add_argument("--detectors", default="faster_rcnn,retinanet", help="comma-separated, of "
                        f"{', '.join(R50_CONFIGS)}")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    precisions, detectors = args.precisions.split(","), args.detectors.split(",")
    for name, chosen, known in (("--precisions", precisions, PRECISIONS), ("--detectors", detectors, R50_CONFIGS)):
        if unknown := [c for c in chosen if c not in known]:
            parser.error(f"{name}: unknown {unknown}; choose from {', '.join(known)}")
    if min(args.iters, args.size, args.images_per_gpu) < 1 or args.warmup < 0:
        parser.error("--iters, --size and --images-per-gpu must be >= 1, --warmup >= 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA device (run on a machine with a GPU, or pass --device cpu for a smoke run)")
        print(json.dumps({"skipped": "no CUDA device"}))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    short, long = args.size, round(args.size * 1333 / 800)
    batch = synthetic_batch(args.images_per_gpu, short, long, device)
    runs, failed = [], []
    for detector in detectors:
        for precision in precisions:
            for components in combinations(detector).values():
                try:
                    run = bench_combination(detector, components, precision, batch, short, long, args.iters,
                                        args.warmup, device)
                except (RuntimeError, ValueError) as exc:  # e.g. out of memory: the other combinations still run
                    failed.append({"detector": detector, "combination": "+".join(components) or "baseline",
                                   "precision": precision, "error": f"{type(exc).__name__}: {exc}"[:500]})
                    print(f"{detector} {failed[-1]['combination']} {precision}: FAILED {failed[-1]['error']}",
                          flush=True)
                    continue
                runs.append(run)
                print(f"{detector} {run['combination']} {precision}: {run['s_per_iter']:.4f} s/iter, "
                      f"{run['images_per_s']:.2f} images/s, peak {run['peak_mem_mb']} MB", flush=True)
    ratios, sampler = {}, {}
    for detector in detectors:
        for precision in precisions:
            mine = {r["combination"]: r for r in runs if r["detector"] == detector and r["precision"] == precision}
            base = mine.get("baseline")
            if base is None:
                continue
            for name, r in mine.items():
                if name != "baseline":
                    ratios[f"{detector}/{name}/{precision}"] = round(r["s_per_iter"] / base["s_per_iter"], 3)
            if "iou_balanced_sampling" in mine:
                balanced = mine["iou_balanced_sampling"]
                sampler[precision] = {"random_ms": base["sampler_ms_per_iter"],
                                      "iou_balanced_ms": balanced["sampler_ms_per_iter"],
                                      "ratio": round(balanced["sampler_ms_per_iter"] / base["sampler_ms_per_iter"], 3),
                                      "step_ratio": round(balanced["s_per_iter"] / base["s_per_iter"], 3)}
    print(json.dumps({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "torch": torch.__version__, "threads": torch.get_num_threads(), "weights": "random",
                      "image_size": [short, long], "images_per_gpu": args.images_per_gpu, "iters": args.iters,
                      "warmup": args.warmup, "runs": runs, "failed": failed, "ratio_to_baseline": ratios, "sampler": sampler,
                      "peak_rss_mb": round(peak_rss_mb(), 1)}))


if __name__ == "__main__":
    main()
