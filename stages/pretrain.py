"""`libra pretrain`: pre-train the tiny backbone as a shape classifier (the tiny profile's ImageNet).

The tiny configs load the result through ``model.backbone.weights``, as the coco_1x configs load
ImageNet weights. The classification set is generated from ``pretrain.seed`` in random streams of
its own: it shares no image with the detection set. With --params (the DVC pretrain stage) the
settings come from the ``pretrain`` section of params.yaml.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True,
                        help="backbone state_dict to write, e.g. data/pretrained/tiny_backbone.pt; replaces only a "
                             "file libra pretrain wrote (its marker .<name>.libra beside it)")
    parser.add_argument("--force", action="store_true", help="replace --out even if libra pretrain did not write it")
    parser.add_argument("--params", type=Path, default=None,
                        help="read the settings from the `pretrain` section of this params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a pre-training setting, e.g. epochs=2 or num_train=2000 (repeatable); "
                             "fields: seed, channels, num_train, num_val, image_size, epochs, batch_size, lr, "
                             "weight_decay, num_threads")
    parser.add_argument("--summary", type=Path, default=None,
                        help="also write a JSON summary here (accuracies, sizes, seconds)")


def run(args: argparse.Namespace) -> None:
    from detection.config import load_pretrain_config
    from detection.engine.pretrain import pretrain
    from detection.io import write_json_atomic
    from detection.ownership import PRETRAIN, NotOwnedError, check_replaceable, mark

    cfg = load_pretrain_config(args.params, args.overrides)
    if args.out.is_dir():
        raise NotOwnedError(f"{args.out}: is a directory; --out names the weights file to write, "
                            "e.g. data/pretrained/tiny_backbone.pt")
    check_replaceable(args.out, (PRETRAIN,), args.force)
    summary = pretrain(cfg, args.out)
    mark(args.out, PRETRAIN)
    print(f"pretrain: val accuracy {summary['val_accuracy']:.3f} (chance {summary['chance_accuracy']:.3f}), "
          f"{summary['seconds_generate'] + summary['seconds_train']:.0f} s; backbone weights in {args.out}")
    if args.summary is not None:
        write_json_atomic(args.summary, summary)
