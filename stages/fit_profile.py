"""`libra fit-profile`: a profile of params.yaml fitted to a data set (input size, anchors, schedule in steps).

Derives from the training set the input size (median image sides), the anchor sizes per pyramid level
(from the objects' sizes after resizing, checked by the anchors' best possible recall) and the epochs
that give each detector at least its base recipe's optimizer steps; every value is printed with its
source, and a value given with --set is taken as given. The profile is printed, or written to --out, as a
`profiles:` section to add to params.yaml (pipeline/own_data/profile.py has the rules).

    libra fit-profile --set data.source=coco --set data.root=/data/mine --out fitted.yaml
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from pipeline.own_data.profile import MIN_BPR

FIT_PROFILE = "libra fit-profile"
"""The writer this command marks its --out file with (detection/ownership.py): it replaces only such a file."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="the params file whose profile is the starting point (default: %(default)s)")
    parser.add_argument("--profile", default=None,
                        help="the profile to start from: its base configs and set (default: the params file's profile)")
    parser.add_argument("--name", default="fitted", help="the fitted profile's name (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="data.* of params.yaml's data section select the data (e.g. data.source=coco, "
                             "data.root=/data/mine); any other config field is put into the profile as given, never "
                             "derived (repeatable)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps every detector trains at least (default: its base config's steps on "
                             "the built-in set it was made for)")
    parser.add_argument("--min-bpr", type=float, default=MIN_BPR,
                        help="refuse anchors whose best possible recall of the training objects is lower "
                             "(default: %(default)s, justified in pipeline/own_data/profile.py)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the profile here as a params.yaml `profiles:` section (default: print it); "
                             "replaces only a file libra fit-profile wrote")
    parser.add_argument("--force", action="store_true", help="replace --out even if libra fit-profile did not write it")


def run(args: argparse.Namespace) -> None:
    from detection.config import ConfigError
    from detection.io import write_text_atomic
    from detection.ownership import check_replaceable, mark
    from pipeline.own_data.profile import dvc_command, fit_profile, profile_yaml, report_lines

    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    if not 0 <= args.min_bpr <= 1:
        raise ConfigError(f"--min-bpr is a fraction of the training objects, in [0, 1]; got {args.min_bpr}")
    if args.out is not None:
        check_replaceable(args.out, (FIT_PROFILE,), args.force)
    fit = fit_profile(args.params, args.name, args.profile, tuple(args.overrides), args.steps, args.min_bpr)
    text = profile_yaml(fit, command(args))
    if args.out is None:
        print(text, end="")
        return
    print("\n".join(report_lines(fit)))
    write_text_atomic(args.out, text)
    mark(args.out, FIT_PROFILE)
    print(f"wrote {args.out}: add its profile under `profiles:` in params.yaml, then\n  {dvc_command(fit)}")


def command(args: argparse.Namespace) -> str:
    """The command line that fits this profile (the options that change it)."""
    words = ["libra", "fit-profile", "--params", str(args.params), "--name", args.name]
    words += ["--profile", args.profile] if args.profile else []
    words += [word for text in args.overrides for word in ("--set", text)]
    words += ["--steps", str(args.steps)] if args.steps is not None else []
    words += ["--min-bpr", f"{args.min_bpr:g}"] if args.min_bpr != MIN_BPR else []
    return shlex.join(words)
