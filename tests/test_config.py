from pathlib import Path

import pytest

from pipeline.config import ConfigError, ExperimentConfig, RetinaNetConfig, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", [p for p in CONFIGS if "study" not in p.name], ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)


def test_paper_recipes():
    frcnn = load_config(Path("configs/faster_rcnn_r50_coco_1x.yaml"))
    retina = load_config(Path("configs/retinanet_r50_coco_1x.yaml"))
    for cfg, lr in ((frcnn, 0.02), (retina, 0.01)):
        assert cfg.train.epochs == 12 and cfg.train.milestones == (8, 11)
        assert cfg.model.retinanet == RetinaNetConfig()
        assert cfg.train.lr == lr and cfg.train.lr_scaling_batch == 16
        assert (cfg.model.min_size, cfg.model.max_size) == (800, 1333)
        assert cfg.model.backbone.name == "resnet50"
    assert frcnn.components.bfp.refine_level == 2 and retina.components.bfp.refine_level == 1


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
])
def test_bad_values_name_the_field(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(Path("configs/faster_rcnn_tiny.yaml"), [override])


def test_malformed_override_and_file(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: malformed YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
