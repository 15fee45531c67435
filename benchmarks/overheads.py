"""The overheads around the tiny detectors' forward/backward, each measured as a ratio side by side.

Every comparison runs its two variants in this one process, alternating (A B A B ...), so both see
the same machine load; the median of each side gives the ratio before / after (> 1: the change is
faster). On a machine shared with other work the ratios are the figures to read, not the seconds.

- ``data``: one epoch of the tiny training loader (960 images of 128 px by default), decoding every
  PNG each time (``data.cache_mb: 0``) vs from the in-memory cache (``data.cache_mb`` default,
  filled by a first, untimed epoch); checks that both give identical tensors.
- ``eval_batch``: predicting N validation images at ``eval.batch_size`` 8 (the default) vs
  ``--eval-batch``; checks that the detections agree (same boxes up to float noise) and the AP.
- ``threads``: one tiny training step at 1 vs 2 torch threads (the tiny configs' setting).
- ``step``: where a tiny training step's time goes (the share of convolutions, forward and backward,
  from torch's profiler), and two ways to make them cheaper, each side by side with the default
  step: channels-last memory layout, and bf16 autocast (fast only where the CPU has bf16 units).
- ``omp_wait``: predicting N validation images at 2 threads in a child process with libgomp's
  default (spinning) wait policy vs ``OMP_WAIT_POLICY=PASSIVE`` (the variable is read when torch
  loads, so each side is its own process, alternating; only the in-process predict time counts).
- ``eval_per_100``: seconds to evaluate 100 validation images (predict + COCO evaluation) at the
  default ``eval.batch_size``, with the machine's load average, for sizing larger validation sets.

The model is the tiny config's detector from a seeded random init (pre-trained backbone weights
only if --backbone is given), or a trained run's last checkpoint with --run. The synthetic set is
written to a temporary folder unless --data names one written by ``libra prepare``.

The last line printed is a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from detection.config import EvalConfig, load_config
from detection.data import CocoDetectionDataset, collate_detection, write_synthetic_coco
from detection.engine.checkpoint import read_checkpoint
from detection.engine.coco_eval import evaluate_coco
from detection.engine.detections import predict
from detection.engine.splits import coco_subset, load_splits
from detection.models.detectors import build_detector
from detection.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"faster_rcnn": "configs/faster_rcnn_tiny.yaml", "retinanet": "configs/retinanet_tiny.yaml"}
DEFAULT_EVAL_BATCH = EvalConfig().batch_size
MEASUREMENTS = ("data", "eval_batch", "threads", "step", "omp_wait", "eval_per_100")


def _alternate(a, b, reps: int) -> tuple[list[float], list[float]]:
    """Seconds of ``a()`` and ``b()``, called in turn ``reps`` times each (A B A B ...)."""
    ta, tb = [], []
    for _ in range(reps):
        for fn, out in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return ta, tb


def _ratio(name: str, before: list[float], after: list[float], unit: str, **extra) -> dict:
    b, a = statistics.median(before), statistics.median(after)
    return {"name": name, "before_s": round(b, 4), "after_s": round(a, 4), "ratio": round(b / a, 3),
            "reps": len(before), "unit": unit, **extra}


def _cfg(detector: str, data: Path, backbone: Path | None):
    overrides = [f"data.root={data}"]
    overrides += [f"model.backbone.weights={backbone}"] if backbone else ["model.backbone.from_scratch=true"]
    return load_config(ROOT / CONFIGS[detector], overrides)


def _model(cfg, num_classes: int, run: Path | None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_detector(cfg, num_classes)
    if run is not None:
        state = read_checkpoint(RunDir(run).checkpoint("last"))["state_dict"]
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    return model


def bench_data(cfg, reps: int) -> dict:
    train_split, _ = load_splits(cfg.data)
    plain = CocoDetectionDataset(train_split, train=True, seed=0, cache_mb=0)
    cached = CocoDetectionDataset(train_split, train=True, seed=0, cache_mb=cfg.data.cache_mb)
    assert cached.cached, f"the training split ({cached.cache_bytes / 2**20:.0f} MiB) is over data.cache_mb"

    def epoch(dataset):
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=False,
                                             collate_fn=collate_detection)
        return [images for images, _ in loader]

    for a, b in zip(epoch(plain), epoch(cached)):  # fills the cache; both paths must agree bit for bit
        assert all(torch.equal(x, y) for x, y in zip(a, b)), "cached images differ from decoded ones"
    before, after = _alternate(lambda: epoch(plain), lambda: epoch(cached), reps)
    return _ratio("data loading per epoch: decode each time / cached", before, after, "s/epoch",
                  images=len(plain), cache_mib=round(cached.cache_bytes / 2**20, 1))


def _val(cfg, num_val: int):
    _, val_split = load_splits(cfg.data)
    dataset = CocoDetectionDataset(val_split, cache_mb=cfg.data.cache_mb)
    dataset.preload()  # decode cost is the same for both batch sizes; time the model
    subset = torch.utils.data.Subset(dataset, range(min(num_val, len(dataset))))
    return dataset, subset, coco_subset(val_split)


def _loader(subset, batch_size: int):
    return torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate_detection)


def _same_detections(a: list[dict], b: list[dict], tol: float = 0.02) -> bool:
    if len(a) != len(b):
        return False
    key = lambda d: (d["image_id"], -d["score"], d["category_id"])  # noqa: E731
    return all(x["image_id"] == y["image_id"] and x["category_id"] == y["category_id"]
               and abs(x["score"] - y["score"]) < 1e-3 and max(abs(p - q) for p, q in zip(x["bbox"], y["bbox"])) < tol
               for x, y in zip(sorted(a, key=key), sorted(b, key=key)))


def bench_eval_batch(cfg, model, num_val: int, reps: int, new_batch: int) -> dict:
    dataset, subset, gt = _val(cfg, num_val)
    ids = dataset.label_to_category_id
    old = predict(model, _loader(subset, DEFAULT_EVAL_BATCH), torch.device("cpu"), ids)
    new = predict(model, _loader(subset, new_batch), torch.device("cpu"), ids)
    ap_old, ap_new = (evaluate_coco(gt, r, image_ids=dataset.image_ids[: len(subset)])["bbox"]["AP"] for r in (old, new))
    before, after = _alternate(lambda: predict(model, _loader(subset, DEFAULT_EVAL_BATCH), torch.device("cpu"), ids),
                               lambda: predict(model, _loader(subset, new_batch), torch.device("cpu"), ids), reps)
    return _ratio(f"predict {len(subset)} val images: batch {DEFAULT_EVAL_BATCH} / batch {new_batch}", before, after,
                  "s", detections=len(new), same_detections=_same_detections(old, new),
                  ap_before=round(ap_old, 5), ap_after=round(ap_new, 5))


def bench_threads(cfg, model, steps: int) -> dict:
    batch = _train_batch(cfg)
    train_step = _step_fn(model, batch)

    def step(threads: int):
        def run():
            torch.set_num_threads(threads)
            train_step()
        return run

    step(2)()  # warm-up
    one, two = _alternate(step(1), step(2), steps)
    torch.set_num_threads(2)
    return _ratio("training step: 1 thread / 2 threads", one, two, "s/step", batch=len(batch[0]))


def _train_batch(cfg):
    train_split, _ = load_splits(cfg.data)
    dataset = CocoDetectionDataset(train_split, train=True, seed=0, cache_mb=cfg.data.cache_mb)
    return collate_detection([dataset[i] for i in range(cfg.train.batch_size)])


def _step_fn(model: torch.nn.Module, batch, bf16: bool = False):
    images, targets = batch
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            losses = model(images, targets)
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return run


def bench_step(cfg, num_classes: int, run: Path | None, steps: int) -> tuple[list[dict], dict]:
    """Ratios default / channels-last and default / bf16 of a training step, and the convolutions' share."""
    from torch.profiler import ProfilerActivity, profile

    batch = _train_batch(cfg)
    default = _step_fn(_model(cfg, num_classes, run), batch)
    channels_last = _step_fn(_model(cfg, num_classes, run).to(memory_format=torch.channels_last), batch)
    bf16 = _step_fn(_model(cfg, num_classes, run), batch, bf16=True)
    for fn in (default, channels_last, bf16):
        fn()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            default()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if "convolution" in e.key)
    share = {"name": "training step: share of convolutions (forward + backward)", "share": round(conv / total, 3),
             "steps": steps}
    rows = [_ratio("training step: default / channels-last", *_alternate(default, channels_last, steps), "s/step"),
            _ratio("training step: fp32 / bf16 autocast", *_alternate(default, bf16, max(2, steps // 3)), "s/step")]
    return rows, share


def bench_eval_per_100(cfg, model, num_val: int, batch: int) -> dict:
    dataset, subset, gt = _val(cfg, num_val)
    start = time.perf_counter()
    results = predict(model, _loader(subset, batch), torch.device("cpu"), dataset.label_to_category_id)
    predicted = time.perf_counter() - start
    evaluate_coco(gt, results, image_ids=dataset.image_ids[: len(subset)])
    total = time.perf_counter() - start
    n = len(subset)
    return {"name": f"evaluate {n} val images at batch {batch}", "images": n, "detections": len(results),
            "predict_s_per_100": round(100 * predicted / n, 3), "coco_s_per_100": round(100 * (total - predicted) / n, 3),
            "total_s_per_100": round(100 * total / n, 3), "load_average": [round(x, 2) for x in os.getloadavg()]}


def _child_predict(args) -> None:
    """The ``omp_wait`` child: seconds of predicting --num-val images, as one JSON line."""
    cfg = _cfg(args.detector, args.data, args.backbone)
    model = _model(cfg, len(load_splits(cfg.data)[0].categories), args.run)
    dataset, subset, _ = _val(cfg, args.num_val)
    loader = _loader(subset, DEFAULT_EVAL_BATCH)
    predict(model, _loader(torch.utils.data.Subset(subset, range(2)), 2), torch.device("cpu"),
            dataset.label_to_category_id)  # warm-up
    start = time.perf_counter()
    predict(model, loader, torch.device("cpu"), dataset.label_to_category_id)
    print(json.dumps({"seconds": time.perf_counter() - start}))


def bench_omp_wait(args, data: Path, reps: int) -> dict:
    import subprocess
    import sys

    command = [sys.executable, __file__, "--child-predict", "--detector", args.detector, "--data", str(data),
               "--num-val", str(args.num_val)]
    command += ["--backbone", str(args.backbone)] if args.backbone else []
    command += ["--run", str(args.run)] if args.run else []

    def child(policy: str | None) -> float:
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        env.update({"OMP_NUM_THREADS": "2", **({"OMP_WAIT_POLICY": policy} if policy else {})})
        out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])["seconds"]

    spin, passive = [], []
    for _ in range(reps):
        spin.append(child(None))
        passive.append(child("PASSIVE"))
    return _ratio(f"predict {args.num_val} val images, 2 threads: OMP wait default / PASSIVE", spin, passive, "s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", choices=sorted(CONFIGS), default="faster_rcnn")
    parser.add_argument("--data", type=Path, default=None,
                        help="a synthetic set written by `libra prepare` (default: write one to a temporary folder)")
    parser.add_argument("--num-train", type=int, default=960, help="training images of the temporary set")
    parser.add_argument("--num-val", type=int, default=200, help="validation images evaluated")
    parser.add_argument("--backbone", type=Path, default=None, help="tiny backbone weights (default: random init)")
    parser.add_argument("--run", type=Path, default=None, help="a trained run directory: evaluate its last.ckpt")
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions per comparison")
    parser.add_argument("--eval-batch", type=int, default=32, help="eval batch size compared with the default")
    parser.add_argument("--steps", type=int, default=6,
                        help="alternating training steps per side of the threads and step comparisons (bf16: a third)")
    parser.add_argument("--only", action="append", choices=list(MEASUREMENTS),
                        help="run only these measurements (repeatable)")
    parser.add_argument("--child-predict", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_predict:
        return _child_predict(args)
    only = set(args.only or MEASUREMENTS)
    torch.set_num_threads(2)
    load_before = [round(x, 2) for x in os.getloadavg()]
    new_batch = args.eval_batch
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "synthetic"
            write_synthetic_coco(data, seed=0, num_train=args.num_train, num_val=args.num_val, image_size=128)
        cfg = _cfg(args.detector, data, args.backbone)
        train_split, _ = load_splits(cfg.data)
        num_classes = len(train_split.categories)
        model = _model(cfg, num_classes, args.run)
        rows = []

        def add(row: dict) -> None:
            rows.append(row)
            print(f"{row['name']}: {row['before_s']:.3f} -> {row['after_s']:.3f} s, ratio {row['ratio']:.3f}", flush=True)
        if "data" in only:
            add(bench_data(cfg, args.reps))
        if "eval_batch" in only and new_batch != DEFAULT_EVAL_BATCH:
            add(bench_eval_batch(cfg, model, args.num_val, args.reps, new_batch))
        if "threads" in only:
            add(bench_threads(cfg, _model(cfg, num_classes, args.run), args.steps))
        step_share = None
        if "step" in only:
            step_rows, step_share = bench_step(cfg, num_classes, args.run, args.steps)
            for row in step_rows:
                add(row)
        if "omp_wait" in only:
            add(bench_omp_wait(args, data, args.reps))
        per_100 = bench_eval_per_100(cfg, model, args.num_val, DEFAULT_EVAL_BATCH) if "eval_per_100" in only else None
    print(f"machine: {os.cpu_count()} cores, load average before {load_before}, after "
          f"{[round(x, 2) for x in os.getloadavg()]} (ratios are side by side; seconds depend on the load)")
    print(f"{'measurement':<70} {'before':>9} {'after':>9} {'ratio':>7}")
    for r in rows:
        print(f"{r['name']:<70} {r['before_s']:>9.3f} {r['after_s']:>9.3f} {r['ratio']:>7.3f}")
    if step_share:
        print(f"{step_share['name']}: {100 * step_share['share']:.1f} %")
    if per_100:
        print(f"{per_100['name']}: {per_100['total_s_per_100']:.2f} s per 100 images "
              f"(predict {per_100['predict_s_per_100']:.2f}, COCO {per_100['coco_s_per_100']:.2f}; "
              f"load average {per_100['load_average']})")
    print(json.dumps({"detector": args.detector, "torch_threads": torch.get_num_threads(),
                      "load_average_before": load_before,
                      "load_average_after": [round(x, 2) for x in os.getloadavg()], "ratios": rows,
                      "step": step_share, "eval_per_100": per_100}))


if __name__ == "__main__":
    main()
