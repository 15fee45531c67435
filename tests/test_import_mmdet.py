"""`libra import-mmdet`: a user's config with _base_ and overrides, and the error and warning paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from detection.config import ConfigError, load_config
from pipeline.mmdet_import import find_mmdet_config, import_mmdet, translate
from stages.cli import main

BASE = find_mmdet_config("faster-rcnn_r50_fpn_1x_coco")


def _user_config(tmp_path: Path, body: str, base: Path = BASE) -> Path:
    path = tmp_path / "my_faster_rcnn.py"
    path.write_text(f"_base_ = {str(base)!r}\n{body}")
    return path


def test_user_config_with_base_and_overrides(tmp_path, capsys):
    config = _user_config(tmp_path, """
model = dict(
    backbone=dict(frozen_stages=-1),
    roi_head=dict(bbox_head=dict(loss_bbox=dict(_delete_=True, type='SmoothL1Loss', beta=1.0, loss_weight=1.0))),
    train_cfg=dict(rcnn=dict(sampler=dict(num=256, neg_pos_ub=3))))
optim_wrapper = dict(optimizer=dict(lr=0.005), clip_grad=dict(max_norm=35, norm_type=2))
param_scheduler = [dict(type='MultiStepLR', begin=0, end=24, by_epoch=True, milestones=[16, 22], gamma=0.1)]
train_cfg = dict(max_epochs=24)
train_dataloader = dict(batch_size=4, dataset=dict(data_root='/data/coco/'))
val_dataloader = dict(dataset=dict(data_root='/data/coco/'))
""")
    out = tmp_path / "ours.yaml"
    assert main(["import-mmdet", str(config), "--out", str(out)]) == 0
    cfg = load_config(out)
    assert cfg.model.backbone.trainable_layers == 5
    assert (cfg.model.box_loss.type, cfg.model.box_loss.beta) == ("smooth_l1", 1.0)
    assert (cfg.model.roi_heads.batch_size_per_image, cfg.model.roi_heads.neg_pos_ub) == (256, 3)
    assert (cfg.train.lr, cfg.train.grad_clip, cfg.train.batch_size, cfg.train.lr_scaling_batch) == (0.005, 35, 4, 16)
    assert (cfg.train.epochs, cfg.train.milestones, cfg.train.warmup_steps) == (24, (16, 22), 0)
    assert cfg.data.root == Path("/data/coco") and cfg.data.train_images == Path("train2017")
    assert (cfg.model.min_size, cfg.model.max_size, cfg.model.anchor_sizes) == (800, 1333, (32, 64, 128, 256, 512))
    assert not cfg.components.balanced_l1.enabled and not cfg.components.iou_balanced_sampling.enabled
    text = out.read_text()
    assert text.startswith("# Translated by `libra import-mmdet` from my_faster_rcnn.py")
    assert "#   default_hooks.logger.interval = 50" in text and "known differences" in text
    assert "model.rpn_head.loss_bbox.type" in capsys.readouterr().out


def test_every_leaf_of_an_official_config_is_accounted_for():
    imported = import_mmdet("libra-retinanet_r50_fpn_1x_coco")
    kinds = {leaf.kind for leaf in imported.leaves}
    assert kinds <= {"mapped", "fixed", "difference", "ignored", "warning"}
    paths = {leaf.path for leaf in imported.leaves}
    assert {"model.neck[1].refine_level", "model.bbox_head.anchor_generator.octave_base_scale",
            "tta_pipeline[1].transforms[0][2].scale", "optim_wrapper.optimizer.lr"} <= paths
    warned = {leaf.path for leaf in imported.of_kind("warning")}
    assert "visualizer.type" in warned and "tta_model.type" in warned
    assert imported.config.model.anchor_sizes == (32, 64, 128, 256, 512)


@pytest.mark.parametrize("body, path", [
    ("model = dict(backbone=dict(depth=101))", "model.backbone.depth"),
    ("custom_hooks = [dict(type='EMAHook')]", "custom_hooks[0].type"),
    ("train_dataloader = dict(dataset=dict(pipeline=[dict(type='LoadImageFromFile'), "
     "dict(type='LoadAnnotations', with_bbox=True), dict(type='Resize', scale=(1333, 800), keep_ratio=True), "
     "dict(type='RandomFlip', prob=0.3), dict(type='PackDetInputs')]))", "train_dataloader.dataset.pipeline[3].prob"),
    ("train_dataloader = dict(dataset=dict(pipeline=[dict(type='LoadImageFromFile'), "
     "dict(type='LoadAnnotations', with_bbox=True), dict(type='Resize', scale=(1333, 800), keep_ratio=True), "
     "dict(type='PackDetInputs')]))", "train_dataloader.dataset.pipeline[0].type"),
    ("model = dict(rpn_head=dict(anchor_generator=dict(scales=[4, 8])))", "model.rpn_head.anchor_generator.scales"),
    ("model = dict(roi_head=dict(bbox_head=dict(in_channels=512)))", "model.roi_head.bbox_head.in_channels"),
    ("optim_wrapper = dict(paramwise_cfg=dict(norm_decay_mult=0.0))", "optim_wrapper.paramwise_cfg.norm_decay_mult"),
    ("optim_wrapper = dict(optimizer=dict(_delete_=True, type='Adam', lr=0.001))", "optim_wrapper.optimizer.type"),
])
def test_a_setting_that_changes_training_without_mapping_is_an_error(tmp_path, capsys, body, path):
    config = _user_config(tmp_path, body + "\n")
    out = tmp_path / "ours.yaml"
    assert main(["import-mmdet", str(config), "--out", str(out)]) == 2
    assert not out.exists()
    captured = capsys.readouterr()
    assert f"ERROR: {path} = " in captured.out and "nothing written" in captured.err
    assert main(["import-mmdet", str(config), "--out", str(out), "--allow-unmapped"]) == 0
    header = out.read_text().split("\nmodel:")[0]
    assert "NOT MAPPED" in header and f"#   {path} = " in header


def test_two_settings_of_one_field_must_agree():
    tree = {"model": {"type": "FasterRCNN", "neck": {"type": "FPN", "out_channels": 256},
                      "rpn_head": {"in_channels": 128}}}
    leaves = {leaf.path: leaf for leaf in translate(tree, "<test>").finish()}
    assert leaves["model.neck.out_channels"].kind == "mapped"
    assert leaves["model.rpn_head.in_channels"].kind == "error"
    assert "model.neck.out_channels" in leaves["model.rpn_head.in_channels"].note


def test_warnings_alone_write_the_config(tmp_path, capsys):
    config = _user_config(tmp_path, "default_hooks = dict(logger=dict(interval=10))\nlog_level = 'DEBUG'\n")
    out = tmp_path / "ours.yaml"
    assert main(["import-mmdet", str(config), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "warning: hooks: checkpoints, logging, timers, visualization: default_hooks." in printed
    assert f"listed in full at the top of {out}" in printed
    assert "default_hooks.logger.interval = 10" in out.read_text()
    assert "#   log_level = 'DEBUG'" in out.read_text()


def test_refuses_to_overwrite_and_unknown_names(tmp_path, capsys):
    out = tmp_path / "ours.yaml"
    out.write_text("kept\n")
    assert main(["import-mmdet", "retinanet_r50_fpn_1x_coco", "--out", str(out)]) == 1
    assert out.read_text() == "kept\n" and "--force" in capsys.readouterr().err
    assert main(["import-mmdet", "no-such-config_1x_coco", "--out", str(tmp_path / "x.yaml")]) == 2
    assert "no-such-config_1x_coco" in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()


def test_a_name_held_by_several_configs_asks_for_a_path():
    with pytest.raises(ConfigError, match="voc0712.*pass the path of one"):
        find_mmdet_config("voc0712")
