from pathlib import Path

import pytest

from detection.config import ConfigError, RetinaNetConfig, load_config, read_yaml, save_config, validate_model
from detection.io import flatten
from pipeline.plan.params import MlflowConfig, ReportConfig, load_params

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", [p for p in CONFIGS if "study" not in p.name], ids=lambda p: p.name)
def test_shipped_configs_validate(path, tmp_path):
    """Every value a shipped config sets is the validated config's, its file name names its detector, and
    the saved config reads back equal."""
    cfg = load_config(path)
    assert path.name.startswith(f"{cfg.model.detector}_")
    resolved = flatten(cfg.to_dict())
    for key, value in flatten(read_yaml(path)).items():
        assert resolved[key] == value, key
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_paper_recipes():
    frcnn = load_config(Path("configs/faster_rcnn_r50_coco_1x.yaml"))
    retina = load_config(Path("configs/retinanet_r50_coco_1x.yaml"))
    for cfg, lr in ((frcnn, 0.02), (retina, 0.01)):
        assert cfg.train.epochs == 12 and cfg.train.milestones == (8, 11)
        assert cfg.model.retinanet == RetinaNetConfig(extra_from="c5" if cfg is retina else "p5")
        assert cfg.train.grad_clip == 35 and cfg.trainer.precision == "32-true" and cfg.data.filter_empty
        assert cfg.train.lr == lr and cfg.train.lr_scaling_batch == 16
        assert (cfg.model.min_size, cfg.model.max_size) == (800, 1333)
        assert cfg.model.backbone.name == "resnet50"
    assert frcnn.components.bfp.refine_level == retina.components.bfp.refine_level == 4  # P4 on P2-P6 and P3-P7
    assert (frcnn.model.rpn.neg_pos_ub, frcnn.model.roi_heads.neg_pos_ub) == (5, -1)
    assert (frcnn.model.box_loss.type, frcnn.model.box_loss.beta) == ("smooth_l1", 1.0)
    assert (retina.model.box_loss.type, retina.model.box_loss.beta) == ("smooth_l1", 0.11)


def test_overrides_are_typed_and_nested():
    cfg = load_config(Path("configs/faster_rcnn_tiny.yaml"),
                      ["components.bfp.enabled=true", "train.lr=0.5", "train.milestones=[1, 2]"])
    assert cfg.components.bfp.enabled is True
    assert cfg.train.lr == 0.5 and cfg.train.milestones == (1, 2)


@pytest.mark.parametrize("override, named", [
    ("components.bfp.refine_typo=conv", "components.bfp.refine_typo"),
    ("components.bfp.refine_type=gaussian", "components.bfp.refine_type"),
    ("train.lr=-1", "train.lr"),
    ("components.iou_balanced_sampling.floor_thr=1.5", "components.iou_balanced_sampling"),
    ("model.detector=yolo", "model.detector"),
    ("model.retinanet.bg_iou_thresh=0.6", "model.retinanet"),
    ("model.retinanet.head_convs=0", "model.retinanet.head_convs"),
    ("model.retinanet.head_init=xavier", "model.retinanet.head_init"),
    ("trainer.devices=0", "trainer.devices"),
    ("trainer.num_nodes=0", "trainer.num_nodes"),
    ("model.score_thresh=2", "model.score_thresh"),
    ("model.nms_thresh=-0.1", "model.nms_thresh"),
    ("model.anchor_sizes=[]", "model.anchor_sizes"),
    ("model.aspect_ratios=[0]", "model.aspect_ratios"),
    ("model.max_size=64", "max_size"),
    ("model.roi_heads.bg_iou_thresh=0.7", "model.roi_heads"),
    ("model.rpn.post_nms_top_n_test=0", "model.rpn.post_nms_top_n_test"),
    ("train.milestones=[0, 4]", "train.milestones"),
    ("train.milestones=[-1]", "train.milestones"),
    ("train.milestones=[4, 4]", "train.milestones"),
    ("train.lr_gamma=0", "train.lr_gamma"),
    ("train.lr_gamma=-0.1", "train.lr_gamma"),
    ("train.warmup_ratio=0", "train.warmup_ratio"),
    ("train.warmup_steps=-1", "train.warmup_steps"),
    ("train.momentum=1", "train.momentum"),
    ("train.weight_decay=-1", "train.weight_decay"),
    ("train.max_steps=0", "train.max_steps"),
    ("train.grad_clip=0", "train.grad_clip"),
    ("train.seed=-1", "train.seed"),
    ("data.seed=-1", "data.seed"),
    ("data.num_workers=-1", "data.num_workers"),
    ("components.iou_balanced_loc.w_loc=0", "components.iou_balanced_loc.w_loc"),
])
def test_bad_values_name_the_field(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(Path("configs/faster_rcnn_tiny.yaml"), [override])


@pytest.mark.parametrize("field", ["train.epochs", "train.batch_size", "train.seed", "train.lr", "trainer.devices",
                                   "model.score_thresh", "data.max_images", "train.lr_scaling_batch"])
def test_a_boolean_is_not_a_number(field):
    with pytest.raises(ConfigError, match=f"{field.replace('.', r'[.]')}: .*boolean"):
        load_config(Path("configs/faster_rcnn_tiny.yaml"), [f"{field}=true"])


@pytest.mark.parametrize("override", ["train.lr=[1,", "train.lr={a: 1", "train.lr=!!python/name:os.system",
                                      "train.lr=!!python/object/apply:os.system ['x']"])
def test_override_that_is_not_plain_yaml_names_the_key(override):
    with pytest.raises(ConfigError, match=r"train\.lr: not a plain YAML value"):
        load_config(None, [override])


def test_malformed_override_and_file(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: malformed YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_report_and_mlflow_settings_have_one_home():
    """params.yaml's report and mlflow sections are typed by the config's models, defaults included."""
    assert ReportConfig() == ReportConfig(bootstrap_resamples=1000, confidence=0.95, seed=0, rope=0.5, power=0.8,
                                          target_mde=1.0)
    assert MlflowConfig().experiment == "libra-ablation"
    params = load_params(Path("params.yaml"))
    assert params.report == ReportConfig(bootstrap_resamples=1000, confidence=0.95, seed=0)
    assert params.mlflow.experiment == "libra-ablation" and params.pretrain.seed == 0


@pytest.mark.parametrize("section, named", [
    ({"rope": 0}, "rope"), ({"rope": -0.5}, "rope"), ({"power": 1.0}, "power"), ({"power": 0}, "power"),
    ({"confidence": 1}, "confidence"), ({"bootstrap_resamples": 0}, "bootstrap_resamples"), ({"bootstrap": 9}, "bootstrap"),
    ({"learned_margin": 0}, "learned_margin"), ({"min_val_images": 0}, "min_val_images"),
    ({"equivalence_rope_share": 1}, "equivalence_rope_share"),
])
def test_bad_report_settings_name_the_field(section, named):
    with pytest.raises(ConfigError, match=f"report: {named}"):
        validate_model(ReportConfig, section, "report")


def test_threads_are_not_part_of_a_run_config():
    """A run's torch threads are decided by where it runs, so no config (and no run key) holds them."""
    with pytest.raises(ConfigError, match=r"trainer\.num_threads is not a config field.*execution\.threads"):
        load_config(Path("configs/retinanet_tiny.yaml"), ["trainer.num_threads=2"])
