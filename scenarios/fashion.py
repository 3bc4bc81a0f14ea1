"""``split-fashion``: Fashion-MNIST split into experiences of new classes.

The ten classes are cut into ``experiences`` groups of equal size (default 5 × 2). With seed
0 the classes keep their natural order (experience 0 is ``T-shirt/top+Trouser``, then
``Pullover+Dress``, ...), the usual Split Fashion-MNIST; any other seed permutes the classes
first. The seed also draws which ``per_class`` train and ``test_per_class`` test images of
each class are used (from the official train and test splits, which are disjoint).

Settings: ``task`` (the default; task label = experience index, one head per task) and
``class`` (task label 0; one head over all classes seen). Labels ``y`` are always the global
Fashion-MNIST class ids (0..9, names in :data:`moracl_scenarios.images.FASHION_CLASSES`). The stream
uses the ``cnn-mnist`` encoder, pretrained on MNIST digits, which holds no clothing.

Source: the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``;
Xiao, Rasul and Vollgraf 2017, MIT licence). Reading it takes a fraction of a second, so no
extra cache is kept.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from moracl_scenarios import images
from moracl_scenarios._image import check_count, image_inputs
from moracl_scenarios.streams import (
    SCENARIOS,
    ScenarioSpec,
    Setting,
    Stream,
    StreamInfo,
    check_options,
    describe_scenario,
)

__all__ = ["fashion_class_order", "split_fashion"]

NAME = "split-fashion"
_OPTIONS = ("experiences", "per_class", "test_per_class", "root")
_TRAIN_PER_CLASS = 6000
_TEST_PER_CLASS = 1000


def fashion_class_order(seed: int) -> list[int]:
    """The order of the ten Fashion-MNIST classes: natural for seed 0, else a seeded shuffle."""
    if seed == 0:
        return list(range(10))
    return [int(c) for c in np.random.default_rng([seed, 0]).permutation(10)]


def _sample(labels: np.ndarray, classes: list[int], n: int | None, rng: Any) -> np.ndarray:
    """Sorted indices of ``n`` seeded draws of each class in ``classes`` (all with ``None``)."""
    picks = [rng.permutation(np.flatnonzero(labels == c))[:n] for c in classes]
    return np.sort(np.concatenate(picks))


def _sizes(options: Mapping[str, Any]) -> tuple[int, int | None, int | None, Path]:
    """The checked ``experiences``, ``per_class``, ``test_per_class`` and ``root`` of
    ``options``; reads no data."""
    experiences = options.get("experiences", 5)
    if isinstance(experiences, bool) or not isinstance(experiences, int) or experiences < 1:
        raise ValueError(f"scenario {NAME!r}: experiences={experiences!r} must divide 10")
    if 10 % experiences:
        raise ValueError(
            f"scenario {NAME!r}: experiences={experiences} must divide the 10 classes "
            f"evenly; expected one of [1, 2, 5, 10]"
        )
    per_class = check_count(NAME, "per_class", options.get("per_class", 1000), high=6000)
    test_per_class = check_count(
        NAME, "test_per_class", options.get("test_per_class", 500), high=1000
    )
    root = options.get("root")
    if root is not None and not isinstance(root, (str, os.PathLike)):
        raise ValueError(f"scenario {NAME!r}: root={root!r} must be a folder path")
    return experiences, per_class, test_per_class, Path(root or images.FASHION_ROOT)


@SCENARIOS.register(NAME)
def split_fashion(*, setting: Setting | None = None, seed: int = 0, **options: Any) -> Stream:
    """Build ``split-fashion``.

    Options:
        experiences: number of experiences; must divide 10 (default 5).
        per_class: train images per class (default 1000; ``None``: all 6,000).
        test_per_class: test images per class (default 500; ``None``: all 1,000).
        root: folder of the IDX files (default ``/usr/share/datasets/fashion-mnist``).

    Inputs ``x`` are float32 ``(1, 28, 28)`` normalised as in ``moracl_scenarios.streams``.

    Raises:
        ValueError: an unknown option, a bad size, ``experiences`` not dividing 10, or the
            ``domain`` setting.
        FileNotFoundError: Fashion-MNIST is missing (names the Debian package).
    """
    check_options(NAME, options, _OPTIONS)
    setting = Setting.TASK if setting is None else Setting(setting)
    if setting is Setting.DOMAIN:
        raise ValueError(
            f"scenario {NAME!r} supports settings ['task', 'class'], got {setting.value!r}"
        )
    experiences, per_class, test_per_class, root = _sizes(options)

    order = fashion_class_order(seed)
    size = 10 // experiences
    groups = [sorted(order[i * size : (i + 1) * size]) for i in range(experiences)]
    x_train, y_train = images.load_fashion_mnist("train", root=root)
    x_test, y_test = images.load_fashion_mnist("test", root=root)
    rng_train = np.random.default_rng([seed, 1])
    rng_test = np.random.default_rng([seed, 2])
    train, test = [], []
    for group in groups:
        tr = _sample(y_train, group, per_class, rng_train)
        te = _sample(y_test, group, test_per_class, rng_test)
        train.append((image_inputs(x_train[tr]), torch.from_numpy(y_train[tr])))
        test.append((image_inputs(x_test[te]), torch.from_numpy(y_test[te])))

    from moracl_scenarios.streams import tensor_benchmark  # imports avalanche

    task_labels = list(range(experiences)) if setting is Setting.TASK else [0] * experiences
    info = StreamInfo(
        name=NAME,
        setting=setting,
        modality="image",
        backbone="cnn-mnist",
        class_names=images.FASHION_CLASSES,
        experience_classes=tuple(tuple(g) for g in groups),
        experience_names=tuple("+".join(images.FASHION_CLASSES[c] for c in g) for g in groups),
        source="Debian package dataset-fashion-mnist, /usr/share/datasets/fashion-mnist",
        licence="MIT",
    )
    return Stream(tensor_benchmark(train, test, task_labels=task_labels), info)


describe_scenario(NAME, ScenarioSpec((Setting.TASK, Setting.CLASS), _OPTIONS, _sizes))
