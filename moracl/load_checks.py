"""What :class:`~moracl.model.MoRAModel` checks before it loads saved adapter tensors into
itself: one adapter of a moracl folder against the model, and saved tensors against the
model's own (names, shapes, dtypes). Nothing here changes a model."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Mapping

from torch import Tensor, nn

from moracl.adapter_files import (
    SavedAdapter,
    SavedLayout,
    check_header,
    expected_state,
    parse_layout,
)
from moracl.checkpoint import WEIGHTS_NAME, open_adapter

__all__ = ["check_loadable", "read_saved_adapter"]


def read_saved_adapter(
    plain: nn.Module,
    directory: str | os.PathLike[str],
    adapter_name: str,
    saved_name: str | None,
    existing: Collection[str],
) -> tuple[SavedAdapter, dict[str, Tensor]]:
    """The adapter ``saved_name`` (default: the only one) of the moracl folder ``directory``
    and its tensors renamed to ``adapter_name``, checked against ``plain`` (the model as its
    layers were before adapting) before any tensor is read.

    Refused with a ``ValueError``: a folder of several adapters without ``saved_name``, a
    ``saved_name`` it does not hold, a folder with ``modules_to_save``, an ``adapter_name``
    among the ``existing`` ones, tensors that do not fit ``plain``."""
    folder = open_adapter(directory)
    where = str(folder.config_path)
    layout = parse_layout(folder.config, where)
    names = [a.name for a in layout.adapters]
    if saved_name is None and len(names) > 1:
        raise ValueError(f"{where} holds adapters {names}; pick one with saved_name=")
    picked = [a for a in layout.adapters if saved_name in (None, a.name)]
    if not picked:
        raise ValueError(f"{where} has no adapter {saved_name!r}; it holds {names}")
    if layout.modules_to_save:
        raise ValueError(
            f"{where} also saves modules_to_save {list(layout.modules_to_save)}; load_adapter "
            "adds adapters only (load the folder with MoRAModel.from_pretrained instead)"
        )
    if adapter_name in existing:
        raise ValueError(f"adapter {adapter_name!r} already exists; have {list(existing)}")
    saved = picked[0]
    renamed = dataclasses.replace(saved, name=adapter_name)
    old, new = f".adapters.{saved.name}.", f".adapters.{adapter_name}."
    header = {k.replace(old, new): v for k, v in folder.header.items() if old in k}
    expected = expected_state(plain, SavedLayout((renamed,), (), ()))
    check_header(expected, header, str(folder.path / WEIGHTS_NAME))
    tensors = {k.replace(old, new): t for k, t in folder.load_tensors().items() if old in k}
    return saved, tensors


def check_loadable(tensors: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> None:
    """Raise ``ValueError`` unless ``tensors`` has exactly the names of ``targets`` (a model's
    adapter state), each of its shape and of its dtype (any floating dtype for a floating
    one)."""
    missing = sorted(set(targets) - set(tensors))
    extra = sorted(set(tensors) - set(targets))
    if missing or extra:
        raise ValueError(
            f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for key, t in tensors.items():
        if t.shape != targets[key].shape:
            layer = key.split(".adapters.")[0]
            raise ValueError(
                f"layer {layer!r}: saved tensor {key!r} has shape {tuple(t.shape)} "
                "but the model's "
                f"has shape {tuple(targets[key].shape)} (the base model's layer shapes differ)"
            )
        want = targets[key].dtype
        if (t.dtype != want) and not (t.is_floating_point() and want.is_floating_point):
            raise ValueError(f"saved tensor {key!r} has dtype {t.dtype} but the model's has {want}")
