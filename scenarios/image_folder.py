"""The ``image-folder`` stream: your own images, one folder per class.

Two layouts of the folder ``path`` (told apart by what its sub-folders hold):

- ``path/<class>/<image>``: the classes are cut into ``n_experiences`` groups (settings
  ``class`` and ``task``);
- ``path/<experience>/<class>/<image>``: each sub-folder is an experience (a domain or a task;
  any setting).

Instead of ``path``, ``train`` and ``test`` give the two splits, in the same layout; else
``test_share`` of each class and experience is drawn for test. ``order``,
``n_experiences`` and ``max_per_class`` are as in :mod:`moracl_scenarios.row_plan`; folder
names are the values. Hidden files and folders (``.name``) are skipped; images are the files
with a suffix among :data:`IMAGE_SUFFIXES`, read with Pillow.

Every image is converted to greyscale and stretched to 28×28 (bilinear), the input of the
image encoders (``cnn-fashion``, the default, pretrained on Fashion-MNIST; ``cnn-mnist``,
on MNIST digits): both saw light objects on a dark background, so ``invert: true`` suits dark
ink on light paper. ``x`` is float32 ``(1, 28, 28)``, normalised as in
:mod:`moracl_scenarios.streams`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from moracl_scenarios._image import image_inputs
from moracl_scenarios.row_plan import check_plan_options, check_source, plan_rows
from moracl_scenarios.streams import (
    ENCODERS,
    SCENARIOS,
    ScenarioSpec,
    Setting,
    Stream,
    StreamInfo,
    check_options,
    describe_scenario,
    tensor_benchmark,
)

__all__ = ["IMAGE_SUFFIXES", "SIZE", "ImageFolderOptions", "image_folder_stream", "list_images"]

NAME = "image-folder"
SIZE = 28
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
_NOT_IMAGE_ENCODERS = ("hf-text", "minilm", "tabular")


@dataclass(frozen=True)
class ImageFolderOptions:
    """Options of the ``image-folder`` stream.

    Attributes:
        path: the folder of every image (``<class>/`` or ``<experience>/<class>/``).
        train, test: instead of ``path``, the folder of each split (same layout).
        test_share: without ``train``/``test``: the share of each class and experience drawn
            for test (default 0.2).
        order: experience folder names in stream order (default sorted); in the
            ``<class>/`` layout, class names in the order they are grouped.
        n_experiences: ``<class>/`` layout: groups of classes (default ``classes // 2``).
        max_per_class: at most this many images of each class, experience and split.
        encoder: an image encoder taking ``(1, 28, 28)``: ``cnn-fashion`` (default) or
            ``cnn-mnist`` (or one a plugin registers).
        invert: use ``255 - pixel`` (dark objects on a light background).
    """

    path: str | None = None
    train: str | None = None
    test: str | None = None
    test_share: float = 0.2
    order: list[Any] | None = None
    n_experiences: int | None = None
    max_per_class: int | None = None
    encoder: str = "cnn-fashion"
    invert: bool = False

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> ImageFolderOptions:
        """Check ``options`` (reading no image) and build; unknown ones list the valid."""
        check_options(NAME, options, [f.name for f in fields(cls)])
        check_source(NAME, options)
        check_plan_options(NAME, options)
        opts = cls(**options)
        image_encoders = [n for n in ENCODERS.names() if n not in _NOT_IMAGE_ENCODERS]
        if opts.encoder not in image_encoders:
            raise ValueError(
                f"scenario {NAME!r}: encoder={opts.encoder!r}; expected an image encoder "
                f"among {image_encoders}"
            )
        if not isinstance(opts.invert, bool):
            raise ValueError(f"scenario {NAME!r}: invert={opts.invert!r} must be true or false")
        for p in (opts.path, opts.train, opts.test):
            if p is not None and not Path(p).expanduser().is_dir():
                raise ValueError(f"scenario {NAME!r}: {p!r} must be a folder")
        return opts


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def list_images(root: str | Path) -> tuple[list[Path], list[str], list[str] | None]:
    """The images under ``root``, their class and (in the ``<experience>/<class>/`` layout)
    their experience, in sorted path order.

    Raises:
        ValueError: no sub-folder, a mix of the two layouts, or no image at all.
    """
    folder = Path(root).expanduser()
    tops = _visible_dirs(folder)
    if not tops:
        raise ValueError(f"scenario {NAME!r}: {str(folder)!r} has no sub-folder (one per class)")
    with_images = [d.name for d in tops if _images_in(d)]
    with_dirs = [d.name for d in tops if _visible_dirs(d)]
    if with_images and with_dirs:
        raise ValueError(
            f"scenario {NAME!r}: {str(folder)!r} mixes class folders of images "
            f"({with_images[:3]}) with experience folders of class folders ({with_dirs[:3]})"
        )
    paths: list[Path] = []
    classes: list[str] = []
    experiences: list[str] | None = [] if with_dirs else None
    for top in tops:
        for cls_dir in _visible_dirs(top) if with_dirs else [top]:
            found = _images_in(cls_dir)
            paths += found
            classes += [cls_dir.name] * len(found)
            if experiences is not None:
                experiences += [top.name] * len(found)
    if not paths:
        raise ValueError(
            f"scenario {NAME!r}: no image (suffixes {list(IMAGE_SUFFIXES)}) under {str(folder)!r}"
        )
    return paths, classes, experiences


def _read(path: Path, invert: bool) -> np.ndarray:
    """``(28, 28)`` uint8: the image in greyscale, stretched to 28×28."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            grey = image.convert("L").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"scenario {NAME!r}: cannot read the image {str(path)!r}: {err}") from None
    pixels = np.asarray(grey, dtype=np.uint8)
    return 255 - pixels if invert else pixels


@SCENARIOS.register(NAME)
def image_folder_stream(*, setting: Setting | None = None, seed: int = 0, **options: Any) -> Stream:
    """Build the ``image-folder`` stream (see the module docstring and
    :class:`ImageFolderOptions`).

    Raises:
        ValueError: an unknown or invalid option, a folder in neither layout, an unreadable
            image, or folders that do not fit the setting.
        FileNotFoundError: a path that does not exist.
    """
    opts = ImageFolderOptions.from_options(options)
    chosen = Setting.CLASS if setting is None else Setting(getattr(setting, "value", setting))
    roots = (
        [(opts.path, None)] if opts.path is not None else [(opts.train, False), (opts.test, True)]
    )
    paths: list[Path] = []
    classes: list[str] = []
    experiences: list[str] | None = None
    flags: list[bool] = []
    for root, is_test in roots:
        found, labels, exps = list_images(str(root))
        if paths and (exps is None) != (experiences is None):
            raise ValueError(f"scenario {NAME!r}: 'train' and 'test' have different layouts")
        paths += found
        classes += labels
        if exps is not None:
            experiences = (experiences or []) + exps
        if is_test is not None:
            flags += [is_test] * len(found)
    plan = plan_rows(
        NAME,
        classes,
        setting=chosen,
        experiences=experiences,
        is_test=np.asarray(flags) if flags else None,
        order=opts.order,
        n_experiences=opts.n_experiences,
        max_per_class=opts.max_per_class,
        test_share=opts.test_share,
        seed=seed,
        label_column="class folder",
        experience_column="experience folder",
    )

    def part(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = np.stack([_read(paths[i], opts.invert) for i in rows])  # (n, 28, 28)
        return image_inputs(pixels), torch.from_numpy(plan.labels[rows])  # (n, 1, 28, 28)

    info = StreamInfo(
        name=NAME,
        setting=plan.setting,
        modality="image",
        backbone=opts.encoder,
        class_names=plan.class_names,
        experience_classes=plan.experience_classes,
        experience_names=plan.experience_names,
        source=" + ".join(str(r) for r, _ in roots) + " (image folders)",
        licence="not recorded (the user's own data)",
    )
    train = [part(r) for r in plan.train]
    test = [part(r) for r in plan.test]
    return Stream(tensor_benchmark(train, test, task_labels=plan.task_labels), info)


describe_scenario(
    NAME,
    ScenarioSpec(
        (Setting.CLASS, Setting.TASK, Setting.DOMAIN),
        tuple(f.name for f in fields(ImageFolderOptions)),
        ImageFolderOptions.from_options,
    ),
)
