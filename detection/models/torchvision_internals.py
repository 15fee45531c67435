"""The private torchvision helpers the detectors use, imported in this one place.

torchvision does not promise these names (modules starting with ``_``); ``tests/test_models.py``
checks the behaviour the project relies on, so a torchvision upgrade that changes them fails there.
"""

from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher

__all__ = ["BalancedPositiveNegativeSampler", "BoxCoder", "IntermediateLayerGetter", "Matcher"]
