"""What an adapter changed in a transformer's attention: maps with the adapters off and on.

:func:`attention_maps` runs one text through a :class:`~moracl.model.MoRAModel` twice, once
with its adapters disabled and once as it is (a task-routed mixture on task ``task_id``),
and returns the attention probabilities of every layer and head of both runs;
:func:`plot_attention` draws them, layer by layer (rows) and head by head (columns), as
three panels each: adapters off, on, and their difference.  :func:`load_adapted_model` and
:func:`plot_adapter_attention` do the same from a saved adapter folder (``moracl plot
attention``).

The maps come from the Hugging Face model inside the wrapped one (the outermost
``transformers.PreTrainedModel``, e.g. the encoder of a
:class:`~moracl.backbones.SentenceClassifier`), asked for ``output_attentions``.  SDPA and
flash attention do not return probabilities, so that model runs with
``attn_implementation="eager"`` for the call and gets its own setting back afterwards; a model
that cannot switch (a warning from transformers says so) raises ``ValueError``: load it with
``from_pretrained(..., attn_implementation="eager")``.

Shape legend: ``l`` layers, ``h`` heads, ``q`` query tokens, ``k`` key tokens.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from moracl.experts.routers.task import TaskRouter
from moracl.files import write_atomic
from moracl.model import MoRAModel

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "MAX_DEFAULT_HEADS",
    "MAX_DEFAULT_LAYERS",
    "AttentionMaps",
    "attention_maps",
    "load_adapted_model",
    "model_attentions",
    "parse_indices",
    "plot_adapter_attention",
    "plot_attention",
]

#: with ``heads=None`` a model with more heads shows those that changed most
MAX_DEFAULT_HEADS = 4
#: with ``layers=None`` a model with more layers shows those that changed most
MAX_DEFAULT_LAYERS = 6
#: the built-in model name of ``load_adapted_model(model=...)``
MINILM = "minilm"


@dataclass(frozen=True)
class AttentionMaps:
    """Attention probabilities of one text with the adapters off and on.

    Attributes:
        off: ``(l, h, q, k)`` with the adapters disabled (the frozen base).
        on: ``(l, h, q, k)`` with the adapters (task ``task_id`` for a routed mixture).
        task_id: the task the mixtures were routed to, or ``None``.
    """

    off: Tensor
    on: Tensor
    task_id: int | None = None

    def __post_init__(self) -> None:
        if self.off.ndim != 4 or self.off.shape != self.on.shape:
            raise ValueError(
                f"off and on must both be (layers, heads, q, k); got {tuple(self.off.shape)} "
                f"and {tuple(self.on.shape)}"
            )

    @property
    def difference(self) -> Tensor:
        """``on - off``, ``(l, h, q, k)``; each query row sums to 0."""
        return self.on - self.off

    @property
    def num_layers(self) -> int:
        return int(self.off.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.off.shape[1])

    @property
    def num_tokens(self) -> int:
        return int(self.off.shape[2])


# -- computing -------------------------------------------------------------------------------


def _hf_model(model: nn.Module) -> nn.Module:
    """The outermost ``transformers.PreTrainedModel`` in ``model`` (``model`` itself first)."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise ValueError(
        f"{type(model).__name__} holds no Hugging Face transformers model, so it has no "
        f"attention maps to show"
    )


def _set_attention(hf: nn.Module, implementation: str) -> None:
    setter = getattr(hf, "set_attn_implementation", None)
    if callable(setter):
        setter(implementation)
    else:  # older transformers
        hf.config._attn_implementation = implementation  # type: ignore[union-attr]


@contextmanager
def _recording(model: nn.Module) -> Iterator[list[tuple[Tensor, ...]]]:
    """Inside the block every forward of ``model``'s Hugging Face model runs in eval mode with
    eager attention and ``output_attentions=True``; the yielded list collects each call's
    attentions (one ``(b, h, q, k)`` per layer).  Modes, attention setting and hooks are
    restored in ``finally``."""
    hf = _hf_model(model)
    calls: list[tuple[Tensor, ...]] = []
    modes = [(m, m.training) for m in model.modules()]
    before = hf.config._attn_implementation  # type: ignore[union-attr]

    def ask(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return args, {**kwargs, "output_attentions": True}

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        attentions = getattr(output, "attentions", None)
        if not attentions:
            raise ValueError(
                f"{type(module).__name__} returned no attention maps with "
                f"output_attentions=True (attention implementation "
                f"{module.config._attn_implementation!r}); load it with "  # type: ignore[union-attr]
                f"from_pretrained(..., attn_implementation='eager')"
            )
        calls.append(tuple(attentions))

    hooks = [
        hf.register_forward_pre_hook(ask, with_kwargs=True),
        hf.register_forward_hook(keep),
    ]
    try:
        model.eval()
        if before != "eager":
            _set_attention(hf, "eager")
        yield calls
    finally:
        for hook in hooks:
            hook.remove()
        now = hf.config._attn_implementation  # type: ignore[union-attr]
        if before is not None and now != before:
            _set_attention(hf, str(before))
        for m, training in modes:
            m.training = training


def _real_tokens(inputs: Mapping[str, Any]) -> Tensor | None:
    """Indices of the real tokens ``(n,)`` of the one row, from ``attention_mask``."""
    mask = inputs.get("attention_mask")
    if not isinstance(mask, Tensor):
        return None
    return torch.nonzero(mask.reshape(-1)).reshape(-1)


@torch.no_grad()
def model_attentions(model: nn.Module, inputs: Mapping[str, Any], **kwargs: Any) -> Tensor:
    """The attention probabilities of one forward of ``model(**inputs, **kwargs)`` on one
    text: ``(l, h, q, k)`` on the CPU, in the model's dtype.

    ``model`` is any module holding a Hugging Face model (itself, or a wrapper such as a
    :class:`~moracl.model.MoRAModel` or :class:`~moracl.backbones.SentenceClassifier`); it
    runs in eval mode with eager attention (both restored after).  With an
    ``attention_mask`` in ``inputs``, only the real tokens (mask 1) are kept.
    """
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs must be a mapping of model inputs, got {type(inputs).__name__}")
    with _recording(model) as calls:
        model(**inputs, **kwargs)
    if len(calls) != 1:
        raise ValueError(
            f"the Hugging Face model inside {type(model).__name__} ran {len(calls)} times in one "
            f"forward; expected exactly once"
        )
    maps = torch.stack([a.detach() for a in calls[0]])  # (l, b, h, q, k)
    if maps.shape[1] != 1:
        raise ValueError(f"attention maps are drawn for one text at a time, got {maps.shape[1]}")
    maps = maps[:, 0].cpu()  # (l, h, q, k)
    keep = _real_tokens(inputs)
    if keep is not None and keep.numel() != maps.shape[-1]:
        if keep.numel() == 0 or int(keep.max()) >= maps.shape[-1]:
            raise ValueError(
                f"attention_mask has {int(inputs['attention_mask'].numel())} positions but the "
                f"model attended over {maps.shape[-1]} tokens"
            )
        maps = maps[:, :, keep][:, :, :, keep]  # (l, h, q', k')
    return maps


def attention_maps(
    model: MoRAModel, inputs: Mapping[str, Any], *, task_id: int | None = None
) -> AttentionMaps:
    """Attention probabilities of one text with ``model``'s adapters off and on.

    Args:
        model: the adapted model; its Hugging Face model must return attentions (see the
            module docstring); its modes and attention setting are restored.
        inputs: the keyword inputs of one text (batch of one), e.g. a tokenizer's output
            ``{"input_ids": (1, n), "attention_mask": (1, n)}``.
        task_id: route the model's task-routed mixtures to this task (``task_ids=`` of the
            forward) for the "on" maps; ``None`` for a model without task routing.

    Returns:
        :class:`AttentionMaps` with ``off`` and ``on`` ``(l, h, q, k)``.
    """
    if not isinstance(model, MoRAModel):
        raise TypeError(f"attention_maps needs a MoRAModel, got {type(model).__name__}")
    if any(layer.merged for _, layer in model.adapted_layers()):
        raise ValueError(
            "the adapters are merged into the weights, so they cannot be switched off: "
            "call model.unmerge() first"
        )
    kwargs: dict[str, Any] = {}
    tasks = [m.router.num_tasks for _, m in model.mixtures() if isinstance(m.router, TaskRouter)]
    if task_id is None and tasks:
        raise ValueError(f"the model routes by task: give task_id (--task) in [0, {min(tasks)})")
    if task_id is not None:
        if not isinstance(task_id, int) or isinstance(task_id, bool) or task_id < 0:
            raise ValueError(f"task_id must be an integer >= 0, got {task_id!r}")
        if not any(True for _ in model.mixtures()):
            raise ValueError(
                f"task_id={task_id} given, but the model has no mixture of experts to route "
                f"(its active adapters: {list(model.active_adapters)})"
            )
        device = next(model.parameters()).device
        kwargs["task_ids"] = torch.tensor([task_id], device=device)
    with model.disable_adapters():
        off = model_attentions(model, inputs)
    on = model_attentions(model, inputs, **kwargs)
    return AttentionMaps(off=off, on=on, task_id=task_id)


# -- choosing what to draw -------------------------------------------------------------------


def parse_indices(text: str, size: int, what: str) -> list[int]:
    """Indices from ``"0,1"``, ``"0-3"`` or ``"0,2-4"`` (ranges inclusive), each in
    ``[0, size)``, sorted without repeats; ``what`` names them in the ``ValueError``."""
    out: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None:
            raise ValueError(f"{what} {text!r}: expected indices and ranges such as '0,1' or '0-3'")
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        if last < first:
            raise ValueError(f"{what} {text!r}: range {part.strip()!r} runs backwards")
        if last >= size:
            raise ValueError(
                f"{what} {text!r}: {last} is out of range, the model has {size} (from 0 to "
                f"{size - 1})"
            )
        out.update(range(first, last + 1))
    return sorted(out)


def _pick(
    chosen: Sequence[int] | None, change: Tensor, limit: int, what: str
) -> tuple[list[int], bool]:
    """The indices to draw and whether they were picked by change: ``chosen`` (checked), all
    of them when at most ``limit``, else the ``limit`` with the largest ``change (n,)``."""
    size = int(change.shape[0])
    if chosen is not None:
        picked = list(chosen)
        bad = [i for i in picked if not isinstance(i, int) or not 0 <= i < size]
        if not picked or bad or len(set(picked)) != len(picked):
            raise ValueError(
                f"{what} must be distinct indices in [0, {size}), got {list(chosen)!r}"
            )
        return picked, False
    if size <= limit:
        return list(range(size)), False
    top = torch.topk(change.double(), limit).indices
    return sorted(int(i) for i in top), True


# -- drawing ---------------------------------------------------------------------------------

_DPI = 90
_PANEL_NAMES = ("off", "on", "on − off")


def _labels(tokens: Sequence[str] | None, n: int) -> list[str] | None:
    """Axis labels for ``n`` tokens (shortened), or ``None`` when too many to read."""
    if tokens is None:
        return [str(i) for i in range(n)] if n <= 24 else None
    if len(tokens) != n:
        raise ValueError(f"got {len(tokens)} tokens for attention maps over {n} tokens")
    if n > 32:
        return None
    return [t if len(t) <= 10 else t[:9] + "…" for t in (str(t) for t in tokens)]


def _figure(
    maps: AttentionMaps,
    tokens: Sequence[str] | None,
    layers: list[int],
    heads: list[int],
    title: str,
) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    n = maps.num_tokens
    labels = _labels(tokens, n)
    off, on, diff = (t.double().numpy() for t in (maps.off, maps.on, maps.difference))
    prob_max = max(float(off[layers][:, heads].max()), float(on[layers][:, heads].max()), 1e-12)
    diff_max = max(float(abs(diff[layers][:, heads]).max()), 1e-12)
    prob_norm = Normalize(0.0, prob_max)
    diff_norm = Normalize(-diff_max, diff_max)  # centred at 0

    panel = min(max(1.3, 0.17 * n), 4.0)  # inches per map
    inner, between, row_gap = 0.08, 0.45, 0.3
    top = 0.9 + 0.2 * title.count("\n")  # room for the title above the head names
    cbar, cbar_gap = 0.15, 0.85
    width_maps = len(heads) * (3 * panel + 2 * inner) + (len(heads) - 1) * between
    width = 0.2 + width_maps + 2 * (cbar_gap + cbar) + 0.6
    height = top + len(layers) * panel + (len(layers) - 1) * row_gap + 0.2
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)

    def rect(x: float, y_top: float, w: float, h: float) -> tuple[float, float, float, float]:
        return (x / width, 1 - (y_top + h) / height, w / width, h / height)

    small = 7 if n > 12 else 8
    images: dict[str, Any] = {}
    for r, layer in enumerate(layers):
        y = top + r * (panel + row_gap)
        for c, head in enumerate(heads):
            x0 = 0.2 + c * (3 * panel + 2 * inner + between)
            for p, (values, cmap, norm) in enumerate(
                (
                    (off, "viridis", prob_norm),
                    (on, "viridis", prob_norm),
                    (diff, "RdBu_r", diff_norm),
                )
            ):
                ax = fig.add_axes(rect(x0 + p * (panel + inner), y, panel, panel))
                im = ax.imshow(values[layer, head], cmap=cmap, norm=norm, interpolation="nearest")
                images["diff" if p == 2 else "prob"] = im
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(_PANEL_NAMES[p], fontsize=9)
                    if p == 1:
                        ax.annotate(
                            f"head {head}",
                            xy=(0.5, 1.0),
                            xycoords="axes fraction",
                            xytext=(0, 17),  # points above the panel, over its title
                            textcoords="offset points",
                            ha="center",
                            va="bottom",
                            fontsize=10,
                            weight="bold",
                        )
                if c == 0 and p == 0:
                    if labels is not None:
                        ax.set_yticks(range(n), labels=labels, fontsize=small)
                    ax.set_ylabel(f"layer {layer}\nquery", fontsize=10)
                if r == len(layers) - 1:
                    if labels is not None:
                        ax.set_xticks(range(n), labels=labels, fontsize=small, rotation=90)
                    if p == 1:
                        ax.set_xlabel("key", fontsize=9)
    grid_top, grid_height = top, len(layers) * panel + (len(layers) - 1) * row_gap
    x = 0.2 + width_maps + 0.35
    for key, label in (("prob", "attention probability"), ("diff", "on − off")):
        cax = fig.add_axes(rect(x, grid_top, cbar, grid_height))
        bar = fig.colorbar(images[key], cax=cax)
        bar.set_label(label, fontsize=9)
        bar.ax.tick_params(labelsize=8)
        x += cbar + cbar_gap
    fig.suptitle(title, x=0.02, y=1 - 0.12 / height, ha="left", va="top", fontsize=10)
    return fig


def plot_attention(
    maps: AttentionMaps,
    tokens: Sequence[str] | None,
    path: str | os.PathLike[str],
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
) -> Path:
    """Draw ``maps`` into the PNG file ``path`` (written atomically; folders created).

    One row per layer, and per head three maps side by side: adapters off, on (shared colour
    scale from 0 to the largest probability shown) and ``on − off`` (a diverging scale
    centred at 0, symmetric about it).  Rows are queries, columns keys.

    Args:
        maps: from :func:`attention_maps`.
        tokens: the ``q`` token strings labelling the axes (shortened; left out beyond 32
            tokens), or ``None`` for indices.
        path: the PNG file.
        layers, heads: the indices to draw.  ``None``: all of them, or, beyond
            :data:`MAX_DEFAULT_LAYERS` layers / :data:`MAX_DEFAULT_HEADS` heads, those whose
            maps changed most (the largest mean ``|on − off|``), as the title says.

    Returns:
        ``path``.
    """
    if not isinstance(maps, AttentionMaps):
        raise TypeError(f"maps must be AttentionMaps, got {type(maps).__name__}")
    change = maps.difference.abs().double()  # (l, h, q, k)
    layer_ids, by_layer = _pick(layers, change.mean(dim=(1, 2, 3)), MAX_DEFAULT_LAYERS, "layers")
    per_head = change[layer_ids].mean(dim=(0, 2, 3))  # (h,)
    head_ids, by_head = _pick(heads, per_head, MAX_DEFAULT_HEADS, "heads")
    shown = change[layer_ids][:, head_ids]  # (l', h', q, k)
    title = "attention with the adapters off and on"
    if maps.task_id is not None:
        title += f" (task {maps.task_id})"
    title += f"; largest |on − off|: {float(shown.max()):.3g} shown"
    if shown.shape[:2] != change.shape[:2]:
        title += f", {float(change.max()):.3g} over all {maps.num_layers} layers × "
        title += f"{maps.num_heads} heads"
    picked = [w for w, by in (("layers", by_layer), ("heads", by_head)) if by]
    if picked:
        title += f"\nshowing the {' and '.join(picked)} that changed most"
    fig = _figure(maps, tokens, layer_ids, head_ids, title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight", pad_inches=0.15)
    write_atomic(out, buffer.getvalue())
    return out


# -- from a saved adapter folder -------------------------------------------------------------

#: the wrappers of moracl's jobs whose adapters load here, by saved base class name
_WRAPPERS = ("SentenceClassifier",)


def _base_folder(model: str | os.PathLike[str] | None, base_name: str, where: Path) -> Path:
    if model is None:
        if base_name == "SentenceClassifier":  # what moracl finetune saves: MiniLM inside
            model = MINILM
        else:
            raise ValueError(
                f"{where} was saved on a {base_name or 'model of unknown class'}; say which "
                f"base model to load it on with --model PATH (a Hugging Face model folder) "
                f"or --model {MINILM}"
            )
    if str(model) == MINILM:
        from moracl.backbones import minilm_path

        return minilm_path()
    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"--model {str(model)!r}: expected {MINILM!r} or a folder holding a Hugging Face "
            f"model (config.json, weights, tokenizer files)"
        )
    return folder


def load_adapted_model(
    adapter_dir: str | os.PathLike[str], *, model: str | os.PathLike[str] | None = None
) -> tuple[MoRAModel, Any]:
    """The adapter saved in ``adapter_dir`` on its base model, and that model's tokenizer.

    The base model's class is the one the folder records (``base_model``): a transformers
    class (``BertModel``, ``GPT2LMHeadModel``, ...) is loaded from ``model`` by that class; a
    :class:`~moracl.backbones.SentenceClassifier` (what ``moracl finetune`` saves) gets the
    encoder from ``model`` and a head as wide as the saved one.  ``model`` is a local model
    folder (tokenizer files included) or ``"minilm"``; ``None`` means MiniLM for a
    ``SentenceClassifier`` and is refused otherwise.  Loaded offline with eager attention.
    """
    import transformers

    from moracl.checkpoint import open_adapter

    where = Path(adapter_dir)
    saved = open_adapter(where)  # checks the folder; its header gives the head's width
    base_name = str(saved.config.get("base_model", ""))
    folder = _base_folder(model, base_name, where)
    load: dict[str, Any] = {"local_files_only": True, "attn_implementation": "eager"}
    base: nn.Module
    if base_name == "SentenceClassifier":
        from moracl.backbones import SentenceClassifier

        head = saved.header.get("head.weight")
        if head is None or len(head.shape) != 2:
            raise ValueError(f"{where}: a SentenceClassifier adapter without its head.weight")
        encoder = transformers.AutoModel.from_pretrained(folder, **load)
        base = SentenceClassifier(encoder, int(head.shape[0]))
    elif isinstance(cls := getattr(transformers, base_name, None), type) and hasattr(
        cls, "from_pretrained"
    ):
        base = cls.from_pretrained(folder, **load)
    else:
        raise ValueError(
            f"{where} was saved on a {base_name or 'model of unknown class'}; this command "
            f"loads adapters saved on a transformers model class or on one of {list(_WRAPPERS)}"
        )
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return MoRAModel.from_pretrained(base.eval(), where), tokenizer


def plot_adapter_attention(
    adapter_dir: str | os.PathLike[str],
    text: str,
    path: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | None = None,
    task_id: int | None = None,
    layers: str | Sequence[int] | None = None,
    heads: str | Sequence[int] | None = None,
    max_length: int = 64,
) -> Path:
    """Draw the attention of ``text`` with the adapter of ``adapter_dir`` off and on into
    ``path`` (see :func:`load_adapted_model` for ``model``, :func:`plot_attention` for the
    figure); ``layers`` and ``heads`` may be specs such as ``"0,1"`` or ``"0-3"``."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text must be a non-empty string, got {text!r}")
    adapted, tokenizer = load_adapted_model(adapter_dir, model=model)
    batch = tokenizer([text], truncation=True, max_length=max_length, return_tensors="pt")
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    if "token_type_ids" in batch and "token_type_ids" in _forward_names(adapted):
        inputs["token_type_ids"] = batch["token_type_ids"]
    maps = attention_maps(adapted, inputs, task_id=task_id)
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    pick_layers = (
        parse_indices(layers, maps.num_layers, "--layers") if isinstance(layers, str) else layers
    )
    pick_heads = (
        parse_indices(heads, maps.num_heads, "--heads") if isinstance(heads, str) else heads
    )
    return plot_attention(maps, tokens, path, layers=pick_layers, heads=pick_heads)


def _forward_names(model: MoRAModel) -> set[str]:
    import inspect

    return set(inspect.signature(model.model.forward).parameters)
