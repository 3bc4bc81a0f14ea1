"""Task inference from class statistics: which experience's experts a row should run through.

Without task labels at test time, a model that grew experts per experience must infer each
row's experience. A learned router does that from the rows it trained on plus a small replay
buffer, and favours recent experiences. :class:`GaussianTaskInference` instead keeps, for
every (experience, class) group, the running sum of the rows' frozen features and, for all
rows, their second moment: linear discriminant analysis (one Gaussian per group, one shared
covariance) from every training row, with no row stored. The features are what the first
adapted layer reads (:func:`input_features`), which the frozen model computes before any
expert runs, so they do not drift as experts grow.

Shape legend: ``n`` rows, ``d`` features, ``T`` experiences, ``c`` classes, ``g`` groups.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from moracl.experts.per_sample import pool_weights
from moracl.model import MoRAModel

__all__ = ["GaussianTaskInference", "input_features"]


class _Captured(Exception):
    """Raised by the capture hook to stop the forward once the features are read."""

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.value = value


@torch.no_grad()
def input_features(encoder: MoRAModel, *args: Any, **kwargs: Any) -> Tensor:
    """``(n, d)`` the input of the first adapted layer ``encoder`` runs on ``args``, averaged
    over each row's tokens (padding left out where the model declares
    :func:`~moracl.experts.token_mask`); ``d`` is that layer's input width.

    The forward stops at that layer, so no adapter or expert runs and only the frozen part
    before it is computed.

    Raises:
        ValueError: the forward reached no adapted layer.
    """
    hooks = []

    def capture(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        x: Tensor = inputs[0]  # (n, ..., d)
        lead = x.shape[:-1]
        if len(lead) == 0:
            x, lead = x[None], x[None].shape[:-1]
        weights = pool_weights(lead, x.device, torch.float64)  # (n, t)
        flat = x.reshape(lead[0], -1, x.shape[-1]).double()  # (n, t, d)
        raise _Captured(torch.einsum("nt,ntd->nd", weights, flat))

    for _, layer in encoder.adapted_layers():
        hooks.append(layer.register_forward_pre_hook(capture))
    try:
        encoder.model(*args, **kwargs)
    except _Captured as done:
        return done.value
    finally:
        for h in hooks:
            h.remove()
    raise ValueError("the forward reached no adapted layer: nothing to read features from")


class GaussianTaskInference(nn.Module):
    """Linear discriminant analysis over (experience, class) groups, from running sums.

    :meth:`update` adds the features of an experience's rows; :meth:`scores` gives each
    experience the log-sum-exp of its groups' discriminants,
    ``x·Σ⁻¹μ_g − ½ μ_g·Σ⁻¹μ_g`` (equal priors), with ``μ_g`` a group's mean and ``Σ`` the
    pooled within-group covariance (divided by the row count) shrunk toward a multiple of the
    identity, ``(1 − s)·Σ + s·tr(Σ)/d·I``. The sums are float64 and order-free, so the
    statistics after any experience are those of all its rows at once.

    The statistics are buffers (saved and restored with the model); they take
    ``(T·c + 1)·d + d² + T·c`` numbers, allocated on the first :meth:`update` or when a state
    dict is loaded (``d`` is only known from the features).

    Args:
        experiences: ``T``.
        classes: ``c``, the classes of the whole stream.
        shrinkage: ``s`` in ``[0, 1]``.
    """

    sums: Tensor  # (T, c, d) float64
    counts: Tensor  # (T, c) float64
    second: Tensor  # (d, d) float64, the sum of x xᵀ over all rows

    def __init__(self, experiences: int, classes: int, *, shrinkage: float = 0.1) -> None:
        super().__init__()
        if experiences < 1 or classes < 1:
            raise ValueError(
                f"experiences and classes must be >= 1, got {experiences!r} and {classes!r}"
            )
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage!r}")
        self.experiences = experiences
        self.classes = classes
        self.shrinkage = shrinkage
        f64 = torch.float64
        self.register_buffer("sums", torch.zeros(experiences, classes, 0, dtype=f64))
        self.register_buffer("counts", torch.zeros(experiences, classes, dtype=f64))
        self.register_buffer("second", torch.zeros(0, 0, dtype=f64))
        self._cache: tuple[tuple[int, ...], Tensor, Tensor, Tensor] | None = None

    @property
    def ready(self) -> bool:
        """Whether any rows have been added."""
        return bool((self.counts > 0).any())

    @property
    def dim(self) -> int:
        """``d`` (0 before any statistics)."""
        return int(self.sums.shape[-1])

    def _allocate(self, dim: int) -> None:
        device = self.counts.device
        self.sums = torch.zeros(self.experiences, self.classes, dim, dtype=torch.float64)
        self.sums = self.sums.to(device)
        self.second = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, features: Tensor, experience: int, labels: Tensor) -> None:
        """Add rows of ``experience``: ``features (n, d)`` with class ``labels (n,)``.

        Raises:
            ValueError: an experience or label out of range, mismatched row counts, or a
                feature width other than the statistics'.
        """
        if features.ndim != 2 or labels.shape != features.shape[:1]:
            raise ValueError(
                f"expected features (n, d) and labels (n,), got {tuple(features.shape)} and "
                f"{tuple(labels.shape)}"
            )
        if not 0 <= experience < self.experiences:
            raise ValueError(f"experience must be in [0, {self.experiences}), got {experience!r}")
        if len(labels) and not (int(labels.min()) >= 0 and int(labels.max()) < self.classes):
            raise ValueError(
                f"labels must be in [0, {self.classes}), got {int(labels.min())}.."
                f"{int(labels.max())}"
            )
        if self.dim == 0:
            self._allocate(features.shape[1])
        if features.shape[1] != self.dim:
            raise ValueError(f"expected {self.dim} features per row, got {features.shape[1]}")
        x = features.to(self.second.device, torch.float64)  # (n, d)
        y = labels.to(self.second.device, torch.long)
        self.sums[experience].index_add_(0, y, x)
        self.counts[experience] += torch.bincount(y, minlength=self.classes).double()
        self.second += x.T @ x

    def _discriminant(self) -> tuple[Tensor, Tensor, Tensor]:
        """``W (g, d)``, ``b (g,)`` and the experience of each group ``(g,)``, over the
        groups with rows; cached until the statistics change."""
        key = tuple(  # in-place updates and loads bump a tensor's version
            v for t in (self.sums, self.counts, self.second) for v in (t._version, t.data_ptr())
        )
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1], self._cache[2], self._cache[3]
        present = self.counts > 0  # (T, c)
        if not bool(present.any()):
            raise RuntimeError("no statistics yet: call update() with an experience's rows")
        n = self.counts[present]  # (g,)
        means = self.sums[present] / n[:, None]  # (g, d)
        total = n.sum()
        cov = (self.second - (means.T * n) @ means) / total  # (d, d) pooled within groups
        d = self.dim
        scale = torch.trace(cov) / d
        if not bool(scale > 0):
            scale = torch.ones((), dtype=cov.dtype, device=cov.device)
        eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
        shrunk = (1 - self.shrinkage) * cov + self.shrinkage * scale * eye
        w = torch.linalg.solve(shrunk, means.T).T  # (g, d)
        b = -0.5 * (w * means).sum(1)  # (g,)
        owner = present.nonzero()[:, 0]  # (g,)
        self._cache = (key, w, b, owner)
        return w, b, owner

    @torch.no_grad()
    def group_scores(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """``(n, g)`` every group's discriminant and ``(g,)`` each group's experience."""
        w, b, owner = self._discriminant()
        return features.to(w.device, torch.float64) @ w.T + b, owner

    @torch.no_grad()
    def scores(self, features: Tensor) -> Tensor:
        """``(n, T)`` each experience's log-sum-exp of its groups' discriminants for
        ``features (n, d)`` (``-inf`` for experiences without statistics)."""
        s, owner = self.group_scores(features)  # (n, g), (g,)
        out = s.new_full((s.shape[0], self.experiences), float("-inf"))
        for e in owner.unique().tolist():
            out[:, e] = torch.logsumexp(s[:, owner == e], dim=1)
        return out

    def forward(self, features: Tensor) -> Tensor:
        """``(n,)`` the inferred experience of each row of ``features (n, d)``."""
        return self.scores(features).argmax(1)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        incoming = state_dict.get(prefix + "sums")
        if isinstance(incoming, Tensor) and incoming.shape[-1] != self.dim:
            self._allocate(int(incoming.shape[-1]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"experiences={self.experiences}, classes={self.classes}, dim={self.dim}, "
            f"shrinkage={self.shrinkage}"
        )
