"""The tiny profile's backbone body: small enough to train on a CPU, pre-trained by ``libra pretrain``.

Kept apart from the detectors (it imports nothing else from ``pipeline``), so pre-training executes, and
its DVC stage depends on, no detector or component code.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn


def _conv_gn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    groups = min(8, cout)
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(groups, cout),
        nn.ReLU(inplace=True),
    )


class TinyBackbone(nn.Module):
    """A small CPU-friendly body: a stride-4 stem, then one stride-2 stage per width.

    GroupNorm rather than BatchNorm, so a step's result does not depend on how the global batch
    is split across DDP processes. Returns stages at strides 4, 8, 16, 32 as '0'..'3'.
    """

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        self.stem = nn.Sequential(_conv_gn_relu(3, channels[0], 2), _conv_gn_relu(channels[0], channels[0], 2))
        stages = []
        cin = channels[0]
        for i, cout in enumerate(channels):
            stages.append(nn.Sequential(_conv_gn_relu(cin, cout, 1 if i == 0 else 2), _conv_gn_relu(cout, cout, 1)))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.channels = tuple(channels)

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        x = self.stem(x)
        out: OrderedDict[str, Tensor] = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            out[str(i)] = x
        return out
