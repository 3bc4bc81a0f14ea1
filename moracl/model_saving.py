"""Saving and loading a :class:`~moracl.model.MoRAModel`'s adapters: moracl's folder format
(``moracl_config.json``, ``adapter_model.safetensors``, ``checksums.json``) and PEFT's, both
checked before anything is allocated or written (:mod:`moracl.adapter_files`,
:mod:`moracl.peft_read`)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, cast

import torch
from torch import Tensor, nn

from moracl.adapter_files import SavedLayout, check_header, expected_state, parse_layout
from moracl.adapters.base import Adapter, AdapterConfig
from moracl.checkpoint import open_adapter, write_adapter
from moracl.experts.mixture import MixtureConfig
from moracl.guard import assert_finite
from moracl.load_checks import check_loadable, read_saved_adapter
from moracl.module_tree import PlainView
from moracl.peft_layout import FolderFormat, exact_pattern, folder_format
from moracl.peft_read import load_adapter_folder, read_peft, set_vera_projections
from moracl.peft_write import check_moracl_representable, save_peft

if TYPE_CHECKING:
    from moracl.experts.mixture import Mixture
    from moracl.layer import MoRALayer
    from moracl.targets import TargetSpec

__all__ = ["AdapterSaving"]


class AdapterSaving:
    """:class:`~moracl.model.MoRAModel`'s saving and loading methods."""

    if TYPE_CHECKING:  # what they use of the model
        model: nn.Module
        adapter_configs: dict[str, AdapterConfig | MixtureConfig]
        adapter_targets: dict[str, list[str]]
        saved_modules: list[str]
        active_adapters: tuple[str, ...]

        def adapted_layers(self) -> Iterator[tuple[str, MoRALayer]]: ...
        def add_adapter(
            self, name: str, config: AdapterConfig | MixtureConfig, *, target_modules: TargetSpec
        ) -> list[str]: ...
        def set_adapter(self, names: str | Sequence[str]) -> None: ...
        def _add_modules_to_save(self, names: Sequence[str], *, exact: bool = False) -> None: ...
        def _plain(self, path: str) -> nn.Module: ...
        def _layer(self, path: str) -> MoRALayer: ...
        def mixtures(self) -> Iterator[tuple[str, Mixture]]: ...
        def task_factors(self, task_id: int) -> dict[str, tuple[Tensor, Tensor]]: ...

    @torch.no_grad()
    def load_adapter(
        self,
        directory: str | os.PathLike[str],
        adapter_name: str,
        *,
        saved_name: str | None = None,
    ) -> list[str]:
        """Add the adapter saved in ``directory`` (a moracl folder, or one PEFT wrote) as
        ``adapter_name``, inactive and frozen (:meth:`set_adapter` uses it); returns the
        adapted layers' paths.

        ``saved_name`` picks one adapter of a moracl folder holding several.  The folder is
        checked as in :meth:`from_pretrained` before anything changes; a folder with
        ``modules_to_save`` is refused (this model keeps one copy of each such module)."""
        if folder_format(directory) is FolderFormat.PEFT:
            if saved_name is not None:
                raise ValueError(
                    f"{directory} is a PEFT folder of one adapter; saved_name= picks one adapter "
                    f"of a moracl folder, got {saved_name!r}"
                )
            load_adapter_folder(self, directory, adapter_name)
            self.set_adapter(self.active_adapters)  # the new adapter: inactive, frozen
            return list(self.adapter_targets[adapter_name])
        saved, tensors = read_saved_adapter(
            PlainView(self.model), directory, adapter_name, saved_name, self.adapter_configs
        )
        paths = self.add_adapter(
            adapter_name, saved.config, target_modules=exact_pattern(saved.targets)
        )
        targets = self.adapter_state_dict([adapter_name])
        for key, t in tensors.items():
            targets[key].copy_(t)
        self.set_adapter(self.active_adapters)  # the new adapter: inactive, frozen
        return paths

    def adapter_state_dict(
        self, names: Sequence[str] | None = None, *, saved: bool = False
    ) -> dict[str, Tensor]:
        """Tensors of the adapters ``names`` (default: all) and of ``modules_to_save``;
        ``saved``: each adapter's :meth:`~moracl.adapters.base.Adapter.saved_state` (what
        :meth:`save_pretrained` writes) instead of its whole state."""
        names = list(self.adapter_configs) if names is None else list(names)
        out: dict[str, Tensor] = {}
        for path, layer in self.adapted_layers():
            for n in names:
                if n in layer.adapters:
                    module = layer.adapters[n]
                    state = (
                        module.saved_state()
                        if saved and isinstance(module, Adapter)
                        else module.state_dict()
                    )
                    for k, v in state.items():
                        out[f"{path}.adapters.{n}.{k}"] = v
        for path in self.saved_modules:
            for k, v in self._plain(path).state_dict().items():
                out[f"{path}.{k}"] = v
        return out

    def save_pretrained(
        self,
        directory: str | os.PathLike[str],
        names: Sequence[str] | None = None,
        *,
        format: str = "moracl",
        task_id: int | None = None,
    ) -> Path:
        """Write the adapters ``names`` (default: all) into ``directory``; returns it.

        ``format="moracl"``: ``moracl_config.json`` + ``adapter_model.safetensors`` +
        ``checksums.json``, any adapter kind or mixture, read back by :meth:`from_pretrained`.
        ``format="peft"``: PEFT's layout, which ``peft.PeftModel.from_pretrained`` loads:
        LoRA (rsLoRA), DoRA, VeRA and AdaLoRA adapters (of several, each but ``"default"`` in a
        subfolder named after it), or with ``task_id`` task ``task_id``'s update of the active
        task-routed mixtures as one LoRA; what PEFT cannot represent (MoRA, other mixtures) is
        refused (:func:`moracl.peft_files.save_peft`)."""
        formats = [f.value for f in FolderFormat]
        if format not in formats:
            raise ValueError(f"format must be one of {formats}, got {format!r}")
        if format == FolderFormat.PEFT:
            return save_peft(self, directory, names, task_id=task_id)
        if task_id is not None:
            raise ValueError(
                "task_id picks one task's update for format='peft'; moracl's format saves the "
                "whole mixture"
            )
        if any(layer.merged for _, layer in self.adapted_layers()):
            raise RuntimeError("save_pretrained on a merged model: unmerge() first")
        names = list(self.adapter_configs) if names is None else list(names)
        for n in names:
            if n not in self.adapter_configs:
                raise ValueError(f"unknown adapter {n!r}; have {list(self.adapter_configs)}")
        check_moracl_representable(self, names)
        config = {
            "adapters": {
                n: {"config": self._saved_config(n).to_dict(), "targets": self.adapter_targets[n]}
                for n in names
            },
            "active": [n for n in self.active_adapters if n in names],
            "modules_to_save": self.saved_modules,
            "base_model": type(self.model).__name__,
        }
        return write_adapter(directory, config, self.adapter_state_dict(names, saved=True))

    def _saved_config(self, name: str) -> AdapterConfig | MixtureConfig:
        """Adapter ``name``'s config as saved (a kind may save less than it trains with)."""
        config = self.adapter_configs[name]
        if not isinstance(config, AdapterConfig):
            return config
        layers = {p: self._layer(p).adapters[name] for p in self.adapter_targets[name]}
        return config.saved(layers)  # type: ignore[arg-type]

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | os.PathLike[str]) -> Self:
        """Rebuild the adapters saved in ``directory`` on ``model`` and load their tensors.

        Everything is checked before anything is allocated (see :mod:`moracl.adapter_files`):
        the folder (no symbolic links, every file against ``checksums.json``), the config's
        structure, each config's bounds on its layers, and every saved tensor's name, shape and
        dtype against the model; then the tensors, which must be finite.  A refused folder
        raises ``ValueError`` (``FileNotFoundError`` if missing) and is never written to.

        A folder PEFT wrote (an ``adapter_config.json`` with ``peft_type``) is read by
        :meth:`from_peft`; moracl folders of earlier versions (``adapter_config.json`` in
        moracl's layout) still load."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"from_pretrained needs an nn.Module, got {type(model).__name__}")
        if folder_format(directory) is FolderFormat.PEFT:
            return cls.from_peft(model, directory)
        folder = open_adapter(directory)
        layout = parse_layout(folder.config, str(folder.config_path))
        check_header(expected_state(model, layout), folder.header, str(folder.weights_path))
        return cls._from_layout(model, layout, folder.load_tensors())

    @classmethod
    def from_peft(
        cls, model: nn.Module, directory: str | os.PathLike[str], *, adapter_name: str = "default"
    ) -> Self:
        """Load the adapter that PEFT's ``save_pretrained`` wrote into ``directory`` onto
        ``model`` as adapter ``adapter_name``: LoRA, rsLoRA, DoRA, VeRA or AdaLoRA, with its
        ``modules_to_save``; the outputs are PEFT's.  Checked like :meth:`from_pretrained`
        before anything is allocated; safetensors only.  What maps to what, and what is refused
        with a ``ValueError`` naming the option: :mod:`moracl.peft_files`."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"from_peft needs an nn.Module, got {type(model).__name__}")
        read = read_peft(model, directory, adapter_name)
        new = cls._from_layout(model, read.layout, read.tensors)
        set_vera_projections(new.model, adapter_name, read.projections)
        return new

    @classmethod
    def _from_layout(
        cls, model: nn.Module, layout: SavedLayout, tensors: dict[str, Tensor]
    ) -> Self:
        """``model`` with the checked ``layout``'s adapters, loaded with ``tensors``."""
        first, *rest = layout.adapters
        new: Self = cast(Any, cls)(  # a MoRAModel: its constructor
            model,
            first.config,
            target_modules=exact_pattern(first.targets),
            adapter_name=first.name,
            modules_to_save=[],
        )
        for saved in rest:
            new.add_adapter(saved.name, saved.config, target_modules=exact_pattern(saved.targets))
        new._add_modules_to_save(layout.modules_to_save, exact=True)
        new.set_adapter(layout.active)
        new.load_adapter_tensors(tensors)
        return new

    @torch.no_grad()
    def load_adapter_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Copy saved tensors in, checking every name, shape and dtype first and refusing
        non-finite values (nothing changes on error)."""
        assert_finite(tensors, "load_adapter_tensors")
        targets = self.adapter_state_dict()
        check_loadable(tensors, targets)
        for key, t in tensors.items():
            targets[key].copy_(t)
