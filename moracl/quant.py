"""QLoRA: the frozen base stored in 4-bit NF4 with double-quantised scales, under any adapter.

    base = quantize_base(model)                           # a copy; ``model`` is unchanged
    adapted = MoRAModel(base, AdapterConfig(kind="dora", rank=8))
    merged = adapted.merge_and_unload()                   # ordinary float weights again

The quantiser is torchao's (``torchao.quantization.to_nf4``, the QLoRA format): each block of
``block_size`` weights is scaled by its absolute maximum and rounded to the nearest of 16
NormalFloat levels; the block scales are themselves quantised to int8 in blocks of
``scaler_block_size`` (double quantisation).  A weight costs about 4.13 bits (64/256: 4 bits,
8 bits per 64 weights for the scales, a float per 16384 weights for the scales' scales).

Quantise the base *before* adding adapters: a kind that starts from the frozen weight
(DoRA's magnitude ``‖W‖``) then starts from the weight it will see, so an adapted model
starts equal to its quantised base.  Adapters stay in full precision (fp32 on a half base)
and train as on a float base:

- the frozen output is :func:`moracl.nf4_kernel.nf4_linear` (as torchao's ``linear_nf4``): the
  weight is dequantised for the matmul and again in the backward for the input gradient,
  never saved dense for the backward; on CUDA one Triton kernel dequantises (bit-identical
  to torchao's ``get_original_weight``, which runs elsewhere);
- the fused nodes of :mod:`moracl.adapters.fused` and the routed mixture read plain tensors
  and step aside on a quantised weight (:class:`~moracl.layer.MoRALayer` checks);
- DoRA's norm ``‖W + s·BA‖`` dequantises ``W`` (outside the graph: the norm is detached);
  with dropout in training DoRA's update reads the dense ``W``, which its backward keeps.

Saving writes the adapters only (the base is never saved); loading onto a quantised base is
``MoRAModel.from_pretrained(quantize_base(model), folder)``.  ``merge_and_unload()`` gives
ordinary float weights: the adapted layers' merged weights are the dequantised weight plus
the update, every other quantised layer is dequantised (:func:`dequantize_base`).

The quantisation error: NF4 with these defaults reproduces a Kaiming-uniform weight to a
relative Frobenius error of about 0.09 (``‖W_nf4 − W‖ / ‖W‖``), which a layer's output
inherits; against a float model whose weights *are* the dequantised weights the adapted
outputs and gradients agree to float rounding (``tests/test_qlora.py`` measures both).

Each quantised layer becomes an ``nn.Linear`` (:class:`~moracl.nf4_kernel.NF4Linear`) holding
an ``(o × i)`` ``NF4Tensor`` weight (transformers' ``Conv1D``, which stores ``i × o``, too, as
bitsandbytes' 4-bit loading does).
Calling ``.to(dtype)`` on a quantised model dequantises its weights (``.to(device)`` keeps
them 4-bit): move it, do not cast it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from types import ModuleType

from torch import Tensor, nn

from moracl.guard import check_int
from moracl.layer import MoRALayer, is_conv1d, is_linear_like, linear_features
from moracl.module_tree import set_submodule, structural_copy
from moracl.nf4_kernel import NF4Linear, is_nf4
from moracl.targets import ALL_LINEAR, TargetSpec, select_targets

__all__ = [
    "BaseQuantization",
    "NF4Footprint",
    "dequantize_base",
    "is_nf4",
    "nf4_footprint",
    "nf4_torchao",
    "quantize_base",
]

INSTALL = "pip install torchao (or pip install 'moracl[quant]')"


class BaseQuantization(str, Enum):
    """How the frozen base is stored (the ``quantize_base`` key of a job config)."""

    NF4 = "nf4"  # 4-bit NormalFloat, double-quantised scales (QLoRA)

    @classmethod
    def parse(cls, value: object, key: str = "quantize_base") -> BaseQuantization:
        """``value`` (a member or its name) as a member; else ``ValueError`` naming ``key``,
        the value and the choices."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"{key} must be one of {[m.value for m in cls]} or null, got {value!r}"
            ) from None


def nf4_torchao() -> ModuleType:
    """``torchao.quantization`` (``to_nf4``, ``NF4Tensor``); ``ImportError`` naming the install
    command where torchao is missing."""
    try:  # (moracl/__init__.py drops the log note torch prints as torchao registers enums)
        import torchao.quantization as tq
    except ImportError as e:
        raise ImportError(f"quantize_base=nf4 needs torchao: {INSTALL}") from e
    return tq


def quantize_base(
    model: nn.Module,
    *,
    target_modules: TargetSpec = ALL_LINEAR,
    exclude_modules: Sequence[str] = (),
    block_size: int = 64,
    scaler_block_size: int = 256,
) -> nn.Module:
    """A copy of ``model`` whose linear layers ``target_modules`` selects hold their weights in
    NF4 (torchao's ``to_nf4``, double-quantised scales), ready for ``MoRAModel``.

    The copy shares every other tensor with ``model`` (as ``MoRAModel`` does); ``model`` is
    not changed.  Each chosen layer becomes an ``nn.Linear`` with an ``(o × i)`` NF4 weight,
    frozen, and its bias (shared).

    Args:
        model: a plain model (quantise before wrapping it in ``MoRAModel``).
        target_modules: which linear layers (``"all-linear"``: every ``nn.Linear``/``Conv1D``
            but the output layer; names; a regular expression), as for ``MoRAModel``.
        exclude_modules: names left in full precision (a trained head, say).
        block_size: weights per absmax block (even; QLoRA's 64).
        scaler_block_size: block scales per int8 block of the double quantisation (QLoRA's
            256); each layer's ``d_in · d_out`` must be a multiple of
            ``block_size · scaler_block_size``.

    Raises:
        TypeError: ``model`` is adapted already (a ``MoRAModel`` or one holding adapted layers).
        ValueError: bad block sizes, a chosen layer whose size they do not divide (all such
            layers named), or a weight that is not floating or not finite.
        ImportError: torchao is not installed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_base needs an nn.Module, got {type(model).__name__}")
    if any(isinstance(m, MoRALayer) for m in model.modules()):
        raise TypeError(
            "quantize_base takes the base model before adapters are added: "
            "MoRAModel(quantize_base(model), config)"
        )
    check_int("block_size", block_size, gt=0)
    check_int("scaler_block_size", scaler_block_size, gt=0)
    if block_size % 2:
        raise ValueError(f"block_size must be even (two NF4 codes per byte), got {block_size}")
    paths = select_targets(model, target_modules, exclude=exclude_modules)
    paths = [p for p in paths if not is_nf4(model.get_submodule(p).weight)]
    _check_sizes(model, paths, block_size * scaler_block_size)
    tq = nf4_torchao()
    out = structural_copy(model)
    for path in paths:
        layer = model.get_submodule(path)
        d_in, d_out = linear_features(layer)
        w = _weight(layer)  # (o, i)
        q = tq.to_nf4(w.detach().contiguous(), block_size, scaler_block_size)
        bias: Tensor | None = getattr(layer, "bias", None)
        new = NF4Linear(d_in, d_out, bias=bias is not None, device="meta")
        new.weight = nn.Parameter(q, requires_grad=False)
        if bias is not None:
            new.bias = _as_parameter(bias)
        new.train(layer.training)
        set_submodule(out, path, new)
    return out


def dequantize_base(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every NF4 weight is replaced by its
    dequantisation (``NF4Tensor.get_original_weight()``, in the weight's dtype), a frozen
    ordinary parameter; every other tensor is shared, and ``model`` is not changed.  On the
    dequantised base an adapted model computes exactly what it computes on the NF4 one, up to
    float rounding."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"dequantize_base needs an nn.Module, got {type(model).__name__}")
    out = structural_copy(model)
    for module in out.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if is_nf4(p):
                dense = p.get_original_weight()  # type: ignore[attr-defined]
                setattr(module, name, nn.Parameter(dense, requires_grad=False))
    return out


def _weight(layer: nn.Module) -> Tensor:
    """A linear layer's weight as ``(o × i)``."""
    w: Tensor = layer.weight  # type: ignore[assignment]
    return w.t() if is_conv1d(layer) else w


def _as_parameter(t: Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)


def _check_sizes(model: nn.Module, paths: Sequence[str], multiple: int) -> None:
    """``ValueError`` naming every chosen layer NF4 cannot hold as configured."""
    bad: list[str] = []
    for path in paths:
        layer = model.get_submodule(path)
        if not is_linear_like(layer):
            raise ValueError(f"layer {path!r} is a {type(layer).__name__}, not a linear layer")
        w: Tensor = layer.weight  # type: ignore[assignment]
        if not w.is_floating_point():
            raise ValueError(f"layer {path!r}: NF4 quantises float weights, got {w.dtype}")
        if not bool(w.isfinite().all()):
            raise ValueError(f"layer {path!r}: its weight holds non-finite values")
        d_in, d_out = linear_features(layer)
        if (d_in * d_out) % multiple:
            bad.append(f"{path} ({d_in} -> {d_out}: {d_in * d_out} weights)")
    if bad:
        raise ValueError(
            f"NF4 needs each layer's d_in · d_out to be a multiple of block_size · "
            f"scaler_block_size = {multiple}; these are not: {bad}; lower scaler_block_size "
            f"or leave them out (exclude_modules)"
        )


@dataclass(frozen=True)
class NF4Footprint:
    """What a model's NF4 weights take: ``layers`` NF4 weights of ``weights`` numbers in
    ``nf4_bytes`` (packed codes, int8 block scales and their float scales) where dense they
    took ``dense_bytes`` (in their dtype)."""

    layers: int
    weights: int
    nf4_bytes: int
    dense_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nf4_bytes / self.weights if self.weights else 0.0


def nf4_footprint(model: nn.Module) -> NF4Footprint:
    """The storage of ``model``'s NF4 weights against their dense form (the rest of the
    model, adapters and NF4 lookup tables aside)."""
    layers, weights, packed, dense = 0, 0, 0, 0
    for p in model.parameters():
        if is_nf4(p):
            inner = (p.quantized_data, p.quantized_scalers, p.quantization_factor)  # type: ignore[attr-defined]
            layers += 1
            weights += p.numel()
            packed += sum(t.numel() * t.element_size() for t in inner)
            dense += p.numel() * p.element_size()
    return NF4Footprint(layers, weights, packed, dense)
