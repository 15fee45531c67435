"""One source for every setting: the ablation, a tuning study and a config file resolve a component alike."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from detection.config import read_yaml
from pipeline.plan.params import parse_params
from pipeline.plan.ablation import plan_ablation
from detection.config import DETECTOR_COMPONENT_DEFAULTS, BalancedL1Config, ExperimentConfig, load_config, validate_config
from pipeline.plan.params import COMPONENTS, DETECTOR_COMPONENTS
from pipeline.plan.runplan import RunPlan
from pipeline.tuning import load_study_spec
from pipeline.tuning.plan import TuningPlan
from pipeline.tuning.profiles import get_profile

CONFIGS = ROOT / "configs"
STUDIES = CONFIGS / "studies"
STUDY_COMPONENTS = {"balanced_l1": ("faster_rcnn", ("BL",)), "sampler": ("faster_rcnn", ("IS",)),
                    "iou_balanced": ("retinanet", ("IoU-cls", "IoU-loc"))}
"""Each shipped study: its detector and the components it switches on."""


def _factorial_runs(params: dict) -> dict[str, RunPlan]:
    params = copy.deepcopy(params)
    params["ablation"]["design"] = "factorial"
    return {run.name: run for run in plan_ablation(parse_params(params), CONFIGS).runs}


def _trial(study: str, params_file: Path) -> ExperimentConfig:
    """The ``tiny`` trial of ``study`` whose searched values are the study's baseline (the defaults)."""
    spec = load_study_spec(study, STUDIES)
    plan = TuningPlan.create(study, spec, "tiny", get_profile("tiny", params_file))
    return plan.config({spec.params[name].key: value for name, value in (plan.spec.baseline or {}).items()})


def _section(cfg: ExperimentConfig, short: str) -> dict:
    return cfg.components.model_dump()[COMPONENTS[short]]


@pytest.fixture(scope="module")
def runs() -> dict[str, RunPlan]:
    return _factorial_runs(read_yaml(ROOT / "params.yaml"))


@pytest.mark.parametrize("detector, short", [(d, c) for d, shorts in DETECTOR_COMPONENTS.items() for c in shorts])
def test_ablation_run_and_config_file_resolve_a_component_alike(runs, detector, short):
    from_file = load_config(CONFIGS / f"{detector}_tiny.yaml", [f"components.{COMPONENTS[short]}.enabled=true"])
    ablation = runs[f"{detector}/{short}/seed0"].experiment_config()
    assert _section(ablation, short) == _section(from_file, short)
    assert _section(ablation, short)["enabled"] is True


@pytest.mark.parametrize("study", sorted(STUDY_COMPONENTS))
def test_study_trial_at_the_defaults_resolves_like_the_ablation(runs, study):
    detector, shorts = STUDY_COMPONENTS[study]
    trial = _trial(study, ROOT / "params.yaml")
    ablation = runs[f"{detector}/{'+'.join(shorts)}/seed0"].experiment_config()
    for short in shorts:
        assert _section(trial, short) == _section(ablation, short)
    assert trial.components == ablation.components


def test_libra_sampler_is_instance_balanced_wherever_it_is_enabled(runs):
    trial = _trial("sampler", ROOT / "params.yaml")
    from_file = load_config(CONFIGS / "faster_rcnn_tiny.yaml", ["components.iou_balanced_sampling.enabled=true"])
    ablation = runs["faster_rcnn/IS/seed0"].experiment_config()
    assert all(c.components.iou_balanced_sampling.instance_balanced_pos for c in (trial, from_file, ablation))


def test_detector_defaults_fill_only_what_a_config_leaves_unset():
    retina = load_config(CONFIGS / "retinanet_tiny.yaml")
    frcnn = load_config(CONFIGS / "faster_rcnn_tiny.yaml")
    for cfg in (retina, frcnn):
        for section, fields in DETECTOR_COMPONENT_DEFAULTS[cfg.model.detector].items():
            assert {k: getattr(getattr(cfg.components, section), k) for k in fields} == fields
    assert retina.components.balanced_l1.beta == 0.11 and frcnn.components.balanced_l1.beta == 1.0
    assert retina.components.bfp.refine_level == frcnn.components.bfp.refine_level == 4  # P4: no detector default
    explicit = load_config(CONFIGS / "retinanet_tiny.yaml", ["components.bfp.refine_level=3",
                                                               "components.balanced_l1.beta=0.5"])
    assert (explicit.components.bfp.refine_level, explicit.components.balanced_l1.beta) == (3, 0.5)
    assert validate_config(explicit.to_dict()) == explicit, "a resolved config reads back as itself"


def test_a_params_knob_reaches_the_ablation_and_the_study_alike(tmp_path):
    params = read_yaml(ROOT / "params.yaml")
    params["faster_rcnn"] = {"balanced_l1": {"beta": 0.5, "formula": "mmdet"}}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    trial = _trial("balanced_l1", params_file)
    ablation = _factorial_runs(params)["faster_rcnn/BL/seed0"].experiment_config()
    assert (trial.components.balanced_l1.beta, trial.components.balanced_l1.formula) == (0.5, "mmdet")
    assert trial.components == ablation.components


def test_a_default_baseline_is_the_trial_configs_values_knobs_included(tmp_path):
    """``baseline: defaults`` in a study file: the searched keys' values of the trial config without sampling."""
    spec = load_study_spec("balanced_l1", STUDIES)
    assert spec.baseline == "defaults"
    defaults = BalancedL1Config()
    plan = TuningPlan.create("balanced_l1", spec, "tiny", get_profile("tiny", ROOT / "params.yaml"))
    assert plan.spec.baseline == {"alpha": defaults.alpha, "gamma": defaults.gamma}
    params = read_yaml(ROOT / "params.yaml")
    params["faster_rcnn"] = {"balanced_l1": {"alpha": 0.3}}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    plan = TuningPlan.create("balanced_l1", spec, "tiny", get_profile("tiny", params_file))
    assert plan.spec.baseline == {"alpha": 0.3, "gamma": defaults.gamma}
