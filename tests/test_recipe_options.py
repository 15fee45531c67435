"""Recipe options a pilot candidate may use: the cosine schedule, the EMA of the weights (trained,
validated and evaluated), RetinaNet's classification prior; each against its closed form."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from detection.config import ConfigError, TrainConfig, load_config, save_config
from detection.engine.evaluate import ValidationData, load_trained_model
from detection.engine.module import DetectionModule, ema_decay_at, lr_factor, update_average
from detection.models.detectors import build_detector

CONFIG = Path("configs/retinanet_tiny.yaml")


def test_cosine_lr_at_start_half_and_end():
    train = TrainConfig(schedule="cosine", milestones=(), warmup_steps=0)
    assert lr_factor(0, 10, 100, train) == 1.0
    assert lr_factor(50, 10, 100, train) == pytest.approx(0.5)
    assert lr_factor(25, 10, 100, train) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert lr_factor(100, 10, 100, train) == pytest.approx(0.0)


def test_warmup_multiplies_either_schedule():
    cosine = TrainConfig(schedule="cosine", milestones=(), warmup_steps=10, warmup_ratio=0.1)
    assert lr_factor(0, 10, 100, cosine) == pytest.approx(0.1)
    assert lr_factor(5, 10, 100, cosine) == pytest.approx(0.55 * (1 + math.cos(math.pi * 5 / 100)) / 2)
    step = TrainConfig(epochs=3, milestones=(2,), lr_gamma=0.1, warmup_steps=10, warmup_ratio=0.1)
    assert [lr_factor(s, 10, 30, step) for s in (0, 5, 10, 19, 20, 29)] == pytest.approx(
        [0.1, 0.55, 1.0, 1.0, 0.1, 0.1])


def test_ema_decay_ramps_over_a_fraction_of_the_run():
    train = TrainConfig(ema_decay=0.99, ema_ramp=0.1)
    assert ema_decay_at(0, 1000, train) == 0.0
    assert ema_decay_at(100, 1000, train) == pytest.approx(0.99 * (1 - math.exp(-1)))
    assert ema_decay_at(1000, 1000, train) == pytest.approx(0.99 * (1 - math.exp(-10)))


class _Weights(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))


def test_ema_of_a_linear_sequence_matches_its_closed_form():
    """Weights w_k = k (k = 1..n) averaged from w_0 = 0 at a constant decay d: n - d (1 - d^n) / (1 - d)."""
    model, average, decay, n = _Weights(), _Weights(), 0.9, 25
    for k in range(1, n + 1):
        with torch.no_grad():
            model.w.fill_(k)
            model.count.fill_(k)
        update_average(average, model, decay)
    assert average.w.tolist() == pytest.approx([n - decay * (1 - decay ** n) / (1 - decay)] * 2, rel=1e-12)
    assert average.count.item() == n, "integer tensors are copied, not averaged"


def _module(*overrides: str) -> DetectionModule:
    cfg = load_config(CONFIG, ["model.backbone.weights=null", "model.backbone.from_scratch=true", *overrides])
    return DetectionModule(cfg.to_dict(), num_classes=3, label_to_category_id={1: 1, 2: 2, 3: 3}, steps_per_epoch=5)


def test_the_ema_is_validated_and_checkpointed_only_when_set():
    plain = _module()
    assert plain.evaluated_model is plain.model and not any(k.startswith("ema.") for k in plain.state_dict())
    averaged = _module("train.ema_decay=0.99")
    assert averaged.evaluated_model is averaged.ema
    assert not any(p.requires_grad for p in averaged.ema.parameters())
    model_keys = {k.removeprefix("model.") for k in averaged.state_dict() if k.startswith("model.")}
    assert model_keys == {k.removeprefix("ema.") for k in averaged.state_dict() if k.startswith("ema.")}


def test_evaluation_loads_the_weights_the_run_validates(synthetic_root, tmp_path):
    """A run with train.ema_decay is evaluated with its checkpoint's EMA, not its trained weights."""
    cfg = load_config(CONFIG, [f"data.root={synthetic_root}", "model.backbone.weights=null",
                               "model.backbone.from_scratch=true", "train.ema_decay=0.9"])
    num_classes = ValidationData(cfg).num_classes
    trained, average = build_detector(cfg, num_classes), build_detector(cfg, num_classes)
    with torch.no_grad():
        for p in average.parameters():
            p.add_(1.0)
    state = {**{f"model.{k}": v for k, v in trained.state_dict().items()},
             **{f"ema.{k}": v for k, v in average.state_dict().items()}}
    (tmp_path / "checkpoints").mkdir()
    torch.save({"state_dict": state}, tmp_path / "checkpoints" / "last.ckpt")
    save_config(cfg, tmp_path / "config.yaml")
    _, model, _ = load_trained_model(tmp_path)
    assert all(torch.equal(v, average.state_dict()[k]) for k, v in model.state_dict().items())


def test_retinanet_prior_sets_the_classification_bias():
    cfg = load_config(CONFIG, ["model.backbone.weights=null", "model.backbone.from_scratch=true",
                               "model.retinanet.prior_prob=0.2"])
    bias = build_detector(cfg, 3).head.classification_head.cls_logits.bias
    assert torch.sigmoid(bias).tolist() == pytest.approx([0.2] * bias.numel())


@pytest.mark.parametrize("override, named", [
    ("train.schedule=linear", "train.schedule"),
    ("train.schedule=cosine", "train.milestones: \\[\\]"),
    ("train.ema_decay=1", "train.ema_decay"),
    ("train.ema_decay=0", "train.ema_decay"),
    ("train.ema_ramp=0", "train.ema_ramp"),
    ("model.retinanet.prior_prob=0", "model.retinanet.prior_prob"),
    ("model.retinanet.prior_prob=1", "model.retinanet.prior_prob"),
])
def test_bad_recipe_options_name_the_field(override, named):
    with pytest.raises(ConfigError, match=named):
        load_config(CONFIG, [override])
