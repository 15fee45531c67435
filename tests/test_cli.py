"""The `libra` command as a user meets it: help for every option, clear errors that destroy nothing."""

from __future__ import annotations

import pytest

from conftest import libra
from stages.cli import STAGES


def test_help_lists_every_stage_and_explains_every_option():
    top = libra("--help")
    for stage in STAGES:
        assert stage in top.stdout
    for stage in STAGES:
        text = libra(stage, "--help").stdout
        options = [line.split()[0] for line in text.splitlines() if line.strip().startswith("--")]
        assert options, stage
        for line in text.split("options:")[1].split("\n  -")[1:]:
            assert len(line.split()) > 2, f"libra {stage}: option without help: {line!r}"


@pytest.mark.parametrize("args, named", [
    (("train", "--config", "configs/nope.yaml", "--out", "{tmp}/run"), "configs/nope.yaml"),
    (("train", "--config", "configs/faster_rcnn_tiny.yaml", "--set", "train.lr=-1", "--out", "{tmp}/run"), "train.lr"),
    (("train", "--config", "configs/faster_rcnn_tiny.yaml", "--set", "data.root={tmp}/none",
      "--set", "model.backbone.weights=null", "--out", "{tmp}/run"), "libra prepare"),
    (("train", "--config", "configs/faster_rcnn_tiny.yaml", "--set", "model.backbone.weights={tmp}/none.pt",
      "--out", "{tmp}/run"), "libra pretrain"),
    (("evaluate", "--run", "{tmp}"), "config.yaml"),
    (("run", "--plan", "{tmp}/missing.yaml", "--out", "{tmp}/run"), "missing.yaml"),
    (("pretrain", "--out", "{tmp}/run/w.pt", "--set", "epochs=0"), "epochs"),
    (("pretrain", "--out", "{tmp}/run/w.pt", "--set", "colour=red"), "colour"),
    (("pretrain", "--out", "{tmp}/run/w.pt", "--params", "{tmp}/missing.yaml"), "missing.yaml"),
])
def test_bad_input_fails_early_with_the_culprit_named(args, named, tmp_path):
    proc = libra(*(a.format(tmp=tmp_path) for a in args), check=False)
    assert proc.returncode == 2, proc.stderr
    assert named.format(tmp=tmp_path) in proc.stderr
    assert not (tmp_path / "run").exists(), "nothing is written before the input is known to be good"
