"""Named continual-learning streams: a registry of builders returning Avalanche benchmarks.

Every builder returns a :class:`Stream`: the Avalanche benchmark (``train_stream`` and
``test_stream``, one experience per step) and a :class:`StreamInfo` describing it. Samples are
``(x, y, t)``: ``x`` the model input, ``y`` the *global* class id (unique across the stream),
``t`` the task label (the experience index in the task-incremental setting, else 0).
Experiences carry ``task_label``, ``current_experience`` and ``classes_in_this_experience``.

Inputs by modality:
- ``image``: ``x`` float32 ``(1, 28, 28)``, scaled to [0, 1] then normalised by
  :data:`IMAGE_MEAN` / :data:`IMAGE_STD`.
- ``text`` with ``frozen_layers == 0``: ``x`` int64 ``(2, L)``, token ids stacked on the
  attention mask; with ``frozen_layers = k > 0``: ``x`` float32 ``(L, d + 1)``, the hidden
  states after the backbone's first ``k`` (frozen) layers with the attention mask as the last
  channel, computed once and cached.
- ``tabular``: ``x`` float32 ``(f,)``, numeric features (see :mod:`moracl_scenarios.tabular`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moracl.continual.config import Setting
from moracl.registry import Registry

__all__ = [
    "ENCODERS",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "SCENARIOS",
    "SPECS",
    "ScenarioSpec",
    "Setting",
    "Stream",
    "StreamInfo",
    "build_stream",
    "check_options",
    "check_scenario",
    "describe_scenario",
    "load_encoder",
    "tensor_benchmark",
]

IMAGE_MEAN = 0.2
IMAGE_STD = 0.33


@dataclass(frozen=True)
class StreamInfo:
    """What a stream holds.

    Attributes:
        name: the registry name, e.g. ``"split-fashion"``.
        setting: task-, class- or domain-incremental.
        modality: ``"text"`` or ``"image"``.
        backbone: registered backbone name to use (``"minilm"``, ``"cnn-mnist"``, ...).
        frozen_layers: text only, frozen backbone layers precomputed into ``x`` (0: token ids).
        class_names: name of each global class id.
        experience_classes: global class ids of each experience, in stream order.
        experience_names: a short name per experience (a domain or its classes).
        source: where the data comes from (package and path).
        licence: the data's licence.
        backbone_options: what the encoder builder needs beyond the name, as JSON-like
            values (e.g. ``{"path": ...}`` for ``hf-text``, ``{"in_features": ...}`` for
            ``tabular``); empty for the built-in pretrained encoders.
    """

    name: str
    setting: Setting
    modality: str
    backbone: str
    class_names: tuple[str, ...]
    experience_classes: tuple[tuple[int, ...], ...]
    experience_names: tuple[str, ...]
    source: str
    licence: str
    frozen_layers: int = 0
    backbone_options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_experiences(self) -> int:
        return len(self.experience_classes)


@dataclass
class Stream:
    """An Avalanche benchmark and its description."""

    benchmark: Any  # avalanche CLScenario with train_stream / test_stream
    info: StreamInfo


Builder = Callable[..., Stream]
SCENARIOS: Registry[Builder] = Registry("scenario")

EncoderBuilder = Callable[["StreamInfo"], torch.nn.Module]
ENCODERS: Registry[EncoderBuilder] = Registry("backbone")
"""Backbone name -> builder of the frozen feature encoder for a stream.

An encoder is an ``nn.Module`` mapping a batch of ``x`` (as described above) to features
``(b, feature_dim)``, with attributes ``feature_dim: int`` and ``default_targets:
tuple[str, ...]`` (names of the linear layers that adapters go on by default). It is returned
frozen and in eval mode; nothing about it is trainable until adapters are injected. Its weights
are pretrained, except ``tabular``'s, a seeded random-feature network
(:mod:`moracl_scenarios.tabular`). A builder reads ``info.backbone``, ``info.frozen_layers``
and ``info.backbone_options``.
"""


def load_encoder(info: StreamInfo) -> torch.nn.Module:
    """The pretrained feature encoder for ``info.backbone`` (see :data:`ENCODERS`)."""
    return ENCODERS.get(info.backbone)(info)


def build_stream(
    name: str, *, setting: str | Setting | None = None, seed: int = 0, **options: Any
) -> Stream:
    """Build the stream registered as ``name``.

    Args:
        name: one of ``SCENARIOS.names()``.
        setting: ``"task"``, ``"class"`` or ``"domain"``; ``None`` takes the scenario's default.
        seed: seeds the class order, the sampling of examples and any random transform.
        options: builder-specific keyword options (sizes, class lists, ...).

    Raises:
        ValueError: an unknown scenario (lists the valid names), setting or option.
    """
    builder = SCENARIOS.get(name)
    setting = check_scenario(name, setting, options)  # what moracl validate checks too
    return builder(setting=setting, seed=seed, **options)


def tensor_benchmark(
    train: Sequence[tuple[torch.Tensor, torch.Tensor]],
    test: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    task_labels: Sequence[int] | None = None,
) -> Any:
    """An Avalanche benchmark with one experience per ``(x, y)`` pair of tensors.

    Args:
        train: per experience, inputs ``(n, ...)`` and global labels ``(n,)`` int64.
        test: the same for the test stream (same number of experiences).
        task_labels: the task label of each experience (default: all 0).

    Returns:
        A benchmark whose experiences have ``task_label`` and ``classes_in_this_experience``.
    """
    from avalanche.benchmarks import benchmark_from_datasets, with_classes_timeline
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels
    from avalanche.benchmarks.utils import (
        _make_taskaware_tensor_classification_dataset as make_dataset,
    )

    if len(train) != len(test):
        raise ValueError(f"train has {len(train)} experiences but test has {len(test)}")
    labels = list(task_labels) if task_labels is not None else [0] * len(train)
    if len(labels) != len(train):
        raise ValueError(f"{len(labels)} task labels for {len(train)} experiences")

    def datasets(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[Any]:
        out = []
        for (x, y), t in zip(parts, labels):
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"{x.shape[0]} inputs but {y.shape[0]} labels")
            out.append(make_dataset(x, y, targets=y, task_labels=int(t)))
        return out

    bench = benchmark_from_datasets(train=datasets(train), test=datasets(test))
    return with_task_labels(with_classes_timeline(bench))


def check_options(name: str, options: Mapping[str, Any], valid: Sequence[str]) -> None:
    """Raise ``ValueError`` naming unknown builder options and the valid ones."""
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"scenario {name!r}: unknown option(s) {unknown}; valid: {sorted(valid)}")


# -- what a builder accepts, checked before any data is read ---------------------------------


@dataclass(frozen=True)
class ScenarioSpec:
    """What the builder of a stream accepts, checkable without reading any data.

    Attributes:
        settings: the settings it supports; the first is its default.
        options: the names of its keyword options.
        check: raises ``ValueError`` for option values it refuses (names the option, the
            value and what is allowed); reads no data. ``None``: no value checks.
        check_setting: like ``check``, for options refused under one setting only; called
            with the setting and the options after ``check``.
    """

    settings: tuple[Setting, ...]
    options: tuple[str, ...]
    check: Callable[[Mapping[str, Any]], object] | None = None
    check_setting: Callable[[Setting, Mapping[str, Any]], object] | None = None


#: scenario name -> its :class:`ScenarioSpec` (a scenario without one gets its name, its
#: setting and, when its builder's signature lists them, its option names checked)
SPECS: dict[str, ScenarioSpec] = {}


def describe_scenario(name: str, spec: ScenarioSpec) -> None:
    """Record what the builder registered as ``name`` accepts (see :func:`check_scenario`)."""
    if not spec.settings:
        raise ValueError(f"scenario {name!r}: a spec needs at least one setting")
    SPECS[name] = spec


def _setting(value: str | Setting | None) -> Setting | None:
    if value is None or isinstance(value, Setting):
        return value
    try:
        return Setting(value)
    except ValueError:
        raise ValueError(
            f"unknown setting {value!r}; expected one of {[s.value for s in Setting]}"
        ) from None


def _check_signature(name: str, builder: Builder, options: Mapping[str, Any]) -> None:
    """Unknown options of a builder without a spec, when its signature lists its options
    (keyword parameters other than ``setting`` and ``seed``, and no ``**options``)."""
    try:
        params = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):  # a callable without a signature: its builder decides
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    keyword = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    valid = [p.name for p in params if p.kind in keyword and p.name not in ("setting", "seed")]
    check_options(name, options, valid)


def check_scenario(
    name: str, setting: str | Setting | None, options: Mapping[str, Any]
) -> Setting | None:
    """Check a stream request without reading any data, as :func:`build_stream` does before
    it calls the builder; returns the setting the stream will have (the scenario's default
    for ``None``; ``None`` when the scenario has no :class:`ScenarioSpec`).

    Raises:
        ValueError: an unknown scenario (lists the registered ones), an unknown setting or one
            the scenario does not support, an unknown option (lists the valid ones) or an
            option value the scenario refuses.
    """
    builder = SCENARIOS.get(name)
    chosen = _setting(setting)
    spec = SPECS.get(name)
    if spec is None:
        _check_signature(name, builder, options)
        return chosen
    check_options(name, options, spec.options)
    if chosen is None:
        chosen = spec.settings[0]
    if chosen not in spec.settings:
        raise ValueError(
            f"scenario {name!r} supports the settings {[s.value for s in spec.settings]}, "
            f"got {chosen.value!r}"
        )
    if spec.check is not None:
        spec.check(options)
    if spec.check_setting is not None:
        spec.check_setting(chosen, options)
    return chosen
