"""What the image streams share: their input format and option checks.

The image encoders (:mod:`moracl_scenarios.encoders`) take inputs made by :func:`image_inputs`.
"""

from __future__ import annotations

import numpy as np
import torch
from moracl_scenarios.streams import IMAGE_MEAN, IMAGE_STD

__all__ = ["check_count", "image_inputs"]


def image_inputs(images_u8: np.ndarray) -> torch.Tensor:
    """Model inputs from images: ``(n, 28, 28)`` uint8 -> ``(n, 1, 28, 28)`` float32, scaled
    to [0, 1] then normalised by ``IMAGE_MEAN`` / ``IMAGE_STD`` (see ``moracl_scenarios.streams``).

    Raises:
        ValueError: ``images_u8`` is not a uint8 array of shape ``(n, h, w)``.
    """
    if images_u8.dtype != np.uint8 or images_u8.ndim != 3:
        raise ValueError(
            f"expected uint8 images of shape (n, h, w), got {images_u8.dtype} {images_u8.shape}"
        )
    x = torch.from_numpy(np.ascontiguousarray(images_u8)).to(torch.float32) / 255.0
    return ((x - IMAGE_MEAN) / IMAGE_STD).unsqueeze(1)  # (n, h, w) -> (n, 1, h, w)


def check_count(
    scenario: str, option: str, value: object, *, high: int, allow_none: bool = True
) -> int | None:
    """Check an example-count option: an int in ``1..high`` (or ``None`` if allowed).

    Raises:
        ValueError: naming the scenario, the option, the bad value and the valid range.
    """
    if value is None and allow_none:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or not 1 <= value <= high
    ):
        also = " or None" if allow_none else ""
        raise ValueError(
            f"scenario {scenario!r}: {option}={value!r} must be an integer in 1..{high}{also}"
        )
    return int(value)
