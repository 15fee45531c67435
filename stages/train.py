"""`libra train`: fit one detector from a YAML config into a run directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import load_config
from pipeline.engine.train import train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="experiment YAML, e.g. configs/faster_rcnn_tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. components.bfp.enabled=true or trainer.devices=2 (repeatable)")
    parser.add_argument("--out", type=Path, required=True,
                        help="run directory: config.yaml, checkpoints/{last,best}.ckpt, metrics.csv")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from checkpoints/last.ckpt (same config required)")


def run(args: argparse.Namespace) -> None:
    train(load_config(args.config, args.overrides), args.out, resume=args.resume)
