"""`libra import-mmdet`: translate an mmdet 3 config into one of ours (configs/*.yaml).

NAME is a config of the installed mmdet wheel (e.g. libra-faster-rcnn_r50_fpn_1x_coco, searched
under its configs/), PATH a .py config of your own. The file is read as data, never run: only
assignments of literals, dict(...), names assigned earlier and arithmetic are accepted, anything else
(an import, a call) is refused naming its line; its _base_ files are merged as mmengine does. Every setting of the resolved config is accounted for: mapped to
a field of ours, fixed in ours (checked), a known difference (docs/recipe.md), or not mapped.
Not-mapped settings that may change training are errors (non-zero exit, nothing written) unless
--allow-unmapped; the others (hooks, logging, visualizer) are warnings. Both are listed here and
in a comment block at the top of the output YAML.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="NAME|PATH",
                        help="an mmdet config name from the installed wheel (e.g. libra-retinanet_r50_fpn_1x_coco) "
                             "or the path of your own mmdet .py config")
    parser.add_argument("--out", type=Path, required=True,
                        help="our config to write (YAML, atomically), e.g. configs/my_faster_rcnn.yaml")
    parser.add_argument("--allow-unmapped", action="store_true",
                        help="write the config although settings that may change training could not be mapped "
                             "(they are listed at the top of the file)")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def run(args: argparse.Namespace) -> None:
    import yaml

    from pipeline.mmdet_import import import_mmdet, nested, render_yaml_header
    from detection.io import write_text_atomic

    if args.out.exists() and not args.force:
        raise FileExistsError(f"{args.out} exists; pass --force to overwrite it")
    imported = import_mmdet(args.config)
    for leaf in imported.of_kind("difference"):
        print(f"import-mmdet: known difference: {leaf.path} = {leaf.value!r}: {leaf.note}")
    warned: dict[str, list[str]] = {}
    for leaf in imported.of_kind("warning"):
        warned.setdefault(leaf.note, []).append(leaf.path)
    for note, paths in warned.items():
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        print(f"import-mmdet: warning: {note}: {shown} (not used; listed in full at the top of {args.out})")
    for leaf in imported.of_kind("error"):
        print(f"import-mmdet: ERROR: {leaf.path} = {leaf.value!r}: {leaf.note}")
    errors = imported.of_kind("error")
    counts = {kind: len(imported.of_kind(kind)) for kind in ("mapped", "fixed", "difference", "ignored", "warning")}
    print(f"import-mmdet: {imported.source}: {len(imported.leaves)} settings: "
          + ", ".join(f"{n} {kind}" for kind, n in counts.items()) + f", {len(errors)} not mapped (errors)")
    if errors and not args.allow_unmapped:
        raise ValueError(f"{len(errors)} setting(s) of {imported.source} that may change training have no "
                         f"mapping (listed above, first: {errors[0].path}); nothing written. Change them, or pass "
                         "--allow-unmapped to write the config with them listed at its top")
    body = yaml.safe_dump(nested(imported.config_fields()), sort_keys=False)
    write_text_atomic(args.out, render_yaml_header(imported) + body)
    print(f"import-mmdet: wrote {args.out}")
