"""params.yaml -> one resolved config per ablation run (pipeline/plan/ablation.py); no training."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from conftest import ROOT
from detection.config import read_yaml
from pipeline.plan.params import parse_params
from pipeline.plan.ablation import (factorial, parse_combination, plan_ablation, resolve_config,
                               write_plan)
from detection.config import ConfigError, load_config
from pipeline.plan.runplan import compute_run_key, read_plan_summary

CONFIGS = ROOT / "configs"


@pytest.fixture
def params() -> dict:
    return read_yaml(ROOT / "params.yaml")


def _configs(ablation) -> dict[str, dict]:
    return {run.name: run.config for run in ablation.runs}


def test_default_ablation_is_the_papers_rows_times_three_seeds(params):
    ablation = plan_ablation(parse_params(params), CONFIGS)
    assert (ablation.profile, ablation.design, ablation.seeds) == ("tiny", "table", (0, 1, 2))
    assert ablation.detectors["faster_rcnn"].combinations == ("baseline", "IS", "IS+BFP", "IS+BFP+BL")
    assert ablation.detectors["retinanet"].combinations == ("baseline", "BFP+BL", "IoU-cls", "IoU-loc",
                                                            "IoU-cls+IoU-loc")
    assert len(ablation.runs) == 9 * 3, "only the runs the design selects are planned"
    by_name = {r.name: r for r in ablation.runs}
    full = by_name["faster_rcnn/IS+BFP+BL/seed1"].experiment_config()
    c = full.components
    assert c.iou_balanced_sampling.enabled and c.bfp.enabled and c.balanced_l1.enabled
    assert c.iou_balanced_sampling.instance_balanced_pos and not c.iou_balanced_cls.enabled
    assert full.train.seed == 1 and full.data.num_train == 960 and full.data.num_val == 1000
    assert full.train.val_max_images == 96
    assert full.train.epochs == load_config(Path("configs/faster_rcnn_tiny.yaml")).train.epochs
    retina = by_name["retinanet/IoU-cls+IoU-loc/seed0"].experiment_config()
    assert retina.model.detector == "retinanet" and retina.components.iou_balanced_loc.lam == 1.5
    assert "faster_rcnn/BFP/seed0" not in by_name


def test_knobs_reach_only_the_runs_that_enable_their_component(params):
    params["ablation"]["design"] = "factorial"
    before = _configs(plan_ablation(parse_params(params), CONFIGS))
    changed = copy.deepcopy(params)
    changed["faster_rcnn"] = {"balanced_l1": {"alpha": 0.3}}
    after = _configs(plan_ablation(parse_params(changed), CONFIGS))
    differ = {name for name in before if before[name] != after[name]}
    assert differ == {f"faster_rcnn/{c}/seed{s}" for c in ("BL", "IS+BL", "BFP+BL", "IS+BFP+BL") for s in (0, 1, 2)}
    assert after["faster_rcnn/IS+BFP+BL/seed0"]["components"]["balanced_l1"]["alpha"] == 0.3

    retina = copy.deepcopy(params)
    retina["retinanet"] = {"iou_balanced_cls": {"eta": 1.0}}
    after = _configs(plan_ablation(parse_params(retina), CONFIGS))
    differ = {name for name in before if before[name] != after[name]}
    assert differ and all(n.startswith("retinanet/") and "IoU-cls" in n for n in differ)


def test_factorial_design_trains_every_combination(params):
    params["ablation"]["design"] = "factorial"
    ablation = plan_ablation(parse_params(params), CONFIGS)
    assert len(ablation.runs) == (8 + 16) * 3
    assert factorial(("IS", "BFP", "BL")) == ["baseline", "IS", "BFP", "BL", "IS+BFP", "IS+BL", "BFP+BL", "IS+BFP+BL"]
    assert ablation.detectors["faster_rcnn"].combinations == tuple(factorial(("IS", "BFP", "BL")))


@pytest.mark.parametrize("name, message", [
    ("BFP+IS", "in the order IS\\+BFP\\+BL"),
    ("IS+IoU-cls", "unknown component"),
    ("IS+IS", "write each component once"),
])
def test_bad_combination_names_are_refused(name, message):
    with pytest.raises(ConfigError, match=message):
        parse_combination(name, ("IS", "BFP", "BL"))


def test_params_errors_name_the_key(params):
    bad = copy.deepcopy(params)
    bad["profile"] = "huge"
    with pytest.raises(ConfigError, match="profile 'huge' is not one of"):
        plan_ablation(parse_params(bad), CONFIGS)
    bad = copy.deepcopy(params)
    bad["ablation"]["retinanet"]["components"] = ["IS", "BFP"]
    with pytest.raises(ConfigError, match="not wired into retinanet"):
        plan_ablation(parse_params(bad), CONFIGS)
    bad = copy.deepcopy(params)
    bad["data"]["root"] = "elsewhere"
    with pytest.raises(ConfigError, match="data.root='elsewhere' with data.source=synthetic"):
        plan_ablation(parse_params(bad), CONFIGS)
    bad = copy.deepcopy(params)
    bad["ablation"]["faster_rcnn"]["combinations"] = ["baseline", "IS"]
    with pytest.raises(ConfigError, match=r"ablation.faster_rcnn has unknown keys \['combinations'\]"):
        plan_ablation(parse_params(bad), CONFIGS)
    bad = copy.deepcopy(params)
    bad["profiles"]["tiny"]["set"] = {"train": {"epochz": 3}}
    with pytest.raises(ConfigError, match="epochz"):
        plan_ablation(parse_params(bad), CONFIGS)


def test_paper_scale_path_resolves_the_coco_recipe(params):
    params.update(profile="coco_1x")
    params["data"].update(source="coco", root="/data/coco")
    params["trainer"].update(devices=8, num_nodes=2)
    cfg = resolve_config(parse_params(params), "faster_rcnn", ("IS", "BFP", "BL"), 0, CONFIGS)
    assert cfg.model.backbone.name == "resnet50" and cfg.train.epochs == 12
    assert cfg.data.root == Path("/data/coco") and cfg.data.val_annotations.name == "instances_val2017.json"
    assert (cfg.trainer.devices, cfg.trainer.num_nodes, cfg.trainer.strategy) == (8, 2, "ddp")
    assert cfg.components.bfp.refine_level == 4


def test_run_key_changes_with_config_data_and_weights(params):
    run = plan_ablation(parse_params(params), CONFIGS).runs[0]
    key = compute_run_key(run.config, "digest-a", "weights-a")
    assert key == compute_run_key(copy.deepcopy(run.config), "digest-a", "weights-a")
    assert key != compute_run_key(run.config, "digest-b", "weights-a")
    assert key != compute_run_key(run.config, "digest-a", "weights-b")
    assert key != compute_run_key({**run.config, "train": {**run.config["train"], "seed": 7}}, "digest-a", "weights-a")


@pytest.mark.parametrize("section, key, value, named", [
    ("ablation", "seeds", [0, 0], "params.yaml: ablation.seeds: must be distinct"),
    ("ablation", "seeds", [], "params.yaml: ablation.seeds"),
    ("ablation", "design", "grid", "params.yaml: ablation.design"),
    ("trainer", "devices", True, "params.yaml: trainer.devices"),
    ("faster_rcnn", "balanced_l2", {"alpha": 0.3}, r"params.yaml: faster_rcnn.balanced_l2: .*unknown keys"),
])
def test_params_are_validated_into_typed_models_naming_the_field(params, section, key, value, named):
    params[section][key] = value
    with pytest.raises(ConfigError, match=named):
        plan_ablation(parse_params(params), CONFIGS)


def test_the_plan_summary_reads_back_typed_as_written(params, tmp_path):
    ablation = plan_ablation(parse_params(params), CONFIGS)
    write_plan(ablation, tmp_path / "plan")
    summary = read_plan_summary(tmp_path / "plan")
    assert summary == ablation.summary()
    assert summary.runs[0].plan == Path("runs/plan/faster_rcnn/baseline/seed0.yaml") and summary.seeds == (0, 1, 2)
    (tmp_path / "plan" / "ablation.yaml").write_text("profile: tiny\nseeds: [0]\n")
    with pytest.raises(ConfigError, match=r"ablation.yaml .*design"):
        read_plan_summary(tmp_path / "plan")
