"""The search space of ``moracl sweep``: config keys and the values each may take.

A grid is given as ``key=v1,v2,...`` items (``adapter.rank=4,8,16``); values are YAML, read as
overrides are (:func:`moracl.config.parse_yaml`: ``1e-3`` is a number, ``[moracl]`` a list),
and split at the commas outside brackets and quotes, so a value may be a list
(``strategies=[moracl,naive],[moracl]``). A grid search runs every combination, the first key
varying slowest (as :func:`itertools.product`); a random search draws ``N`` distinct
combinations from the grid with a seed (:meth:`SearchSpace.draw`).

    space = SearchSpace.parse(["adapter.rank=4,8,16", "train.lr=1e-3,3e-3"])
    space.size                      # 6
    space.draw(None)[0]             # {'adapter.rank': 4, 'train.lr': 0.001}
    space.draw(3, seed=0)           # 3 of the 6, the same for the same seed
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from moracl.config import ConfigDumper, parse_yaml

__all__ = [
    "RESERVED_KEYS",
    "SearchSpace",
    "check_key",
    "flatten",
    "format_override",
    "format_value",
    "overrides_text",
    "set_key",
    "split_values",
]

#: keys a sweep sets itself (the job and each trial's folder): never swept
RESERVED_KEYS = ("job", "output_dir")

_OPEN = {"[": "]", "{": "}"}


def split_values(text: str) -> list[str]:
    """``text`` split at the commas that are outside brackets and quotes, each part stripped
    (``"4, 8"`` -> ``["4", "8"]``; ``"[a,b],[c]"`` -> ``["[a,b]", "[c]"]``).

    Raises:
        ValueError: unbalanced brackets or an unclosed quote, naming ``text``.
    """
    parts: list[str] = []
    depth: list[str] = []
    quote: str | None = None
    start = 0
    for i, ch in enumerate(text):
        if quote is not None:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in _OPEN:
            depth.append(_OPEN[ch])
        elif ch in "]}":
            if not depth or depth.pop() != ch:
                raise ValueError(f"{text!r} has an unbalanced {ch!r}")
        elif ch == "," and not depth:
            parts.append(text[start:i].strip())
            start = i + 1
    if quote is not None or depth:
        raise ValueError(f"{text!r} has an unclosed {quote or '[ or {'}")
    parts.append(text[start:].strip())
    return parts


def format_value(value: Any) -> str:
    """``value`` as an override writes it: YAML in flow style that :func:`parse_yaml` reads
    back as ``value`` (``0.001``, ``moracl``, ``[moracl, naive]``, ``'1e3'`` for a string)."""
    text = yaml.dump(value, Dumper=ConfigDumper, default_flow_style=True, width=math.inf)
    text = text.strip()
    return text[: -len("\n...")] if text.endswith("\n...") else text  # the end-of-document mark


def format_override(key: str, value: Any) -> str:
    """``key=value`` as on the command line (``train.lr=0.001``)."""
    return f"{key}={format_value(value)}"


def _check_key_syntax(key: str, item: str) -> None:
    parts = key.split(".")
    if not key or not all(p.strip() == p and p for p in parts):
        raise ValueError(
            f"--grid item {item!r}: {key!r} is not a dotted config key; expected e.g. "
            f"adapter.rank=4,8,16"
        )
    if key in RESERVED_KEYS:
        raise ValueError(
            f"--grid item {item!r}: {key!r} cannot be swept (the sweep sets it for each trial)"
        )


def _json_ready(value: Any, where: str) -> Any:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        raise ValueError(
            f"{where}: {value!r} is not a plain YAML value (a number, string, true/false, null "
            f"or a list or mapping of those)"
        ) from None
    return value


@dataclass(frozen=True)
class SearchSpace:
    """Config keys (dotted, in the order given) and the values each takes.

    Attributes:
        grid: key -> its values (at least one each, distinct).
    """

    grid: Mapping[str, tuple[Any, ...]]

    def __post_init__(self) -> None:
        if not self.grid:
            raise ValueError("the grid is empty; give at least one --grid key=v1,v2,...")
        frozen: dict[str, tuple[Any, ...]] = {}
        for key, values in self.grid.items():
            _check_key_syntax(key, key)
            vals = tuple(values)
            if not vals:
                raise ValueError(f"--grid key {key!r} has no values; expected {key}=v1,v2,...")
            seen: list[str] = []
            for v in vals:
                _json_ready(v, f"--grid key {key!r}")
                text = json.dumps(v, sort_keys=True)
                if text in seen:
                    raise ValueError(
                        f"--grid key {key!r} lists the value {format_value(v)} twice; expected "
                        f"distinct values"
                    )
                seen.append(text)
            frozen[key] = vals
        object.__setattr__(self, "grid", frozen)

    @classmethod
    def parse(cls, items: Iterable[str]) -> SearchSpace:
        """The space of ``key=v1,v2,...`` items (values parsed as YAML).

        Raises:
            ValueError: an item without ``=``, an empty or malformed key, an empty value list
                or an empty value, a value that is not valid YAML, a key given twice, a value
                listed twice; each naming the item.
        """
        grid: dict[str, tuple[Any, ...]] = {}
        for item in items:
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep:
                raise ValueError(
                    f"--grid item {item!r} is not of the form key=v1,v2,... (e.g. "
                    f"adapter.rank=4,8,16)"
                )
            _check_key_syntax(key, item)
            if key in grid:
                raise ValueError(f"--grid key {key!r} is given twice; list its values once")
            if not raw.strip():
                raise ValueError(f"--grid item {item!r} has no values; expected {key}=v1,v2,...")
            try:
                texts = split_values(raw)
            except ValueError as e:
                raise ValueError(f"--grid item {item!r}: {e}") from None
            values = []
            for text in texts:
                if not text:
                    raise ValueError(
                        f"--grid item {item!r} has an empty value; expected {key}=v1,v2,... "
                        f"(write '' for an empty string)"
                    )
                values.append(parse_yaml(text, f"--grid item {item!r}: the value {text!r}"))
            grid[key] = tuple(values)
        return cls(grid)

    @property
    def keys(self) -> list[str]:
        return list(self.grid)

    @property
    def size(self) -> int:
        """The number of combinations."""
        return math.prod(len(v) for v in self.grid.values())

    def describe(self) -> str:
        """``adapter.rank: 3 values x train.lr: 2 values``."""
        return " x ".join(
            f"{k}: {len(v)} value{'s' if len(v) != 1 else ''}" for k, v in self.grid.items()
        )

    def combinations(self) -> list[dict[str, Any]]:
        """Every combination, the first key varying slowest."""
        keys = self.keys
        return [dict(zip(keys, combo)) for combo in itertools.product(*self.grid.values())]

    def draw(self, trials: int | None, seed: int = 0) -> list[dict[str, Any]]:
        """The combinations a search runs, in trial order: all of them when ``trials`` is
        ``None`` (grid search), else ``trials`` distinct ones drawn with ``seed`` (random
        search; a prefix of one seeded permutation of the grid, so ``draw(n, s)`` begins with
        ``draw(m, s)`` for ``m < n``).

        Raises:
            ValueError: ``trials`` is not a positive integer or exceeds the grid's size.
        """
        combos = self.combinations()
        if trials is None:
            return combos
        if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
            raise ValueError(f"--trials must be a positive integer, got {trials!r}")
        if trials > len(combos):
            raise ValueError(
                f"--trials {trials} is larger than the grid, which has {len(combos)} "
                f"combinations ({self.describe()}); expected --trials <= {len(combos)}"
            )
        order = list(range(len(combos)))
        random.Random(seed).shuffle(order)
        return [combos[i] for i in order[:trials]]

    def to_dict(self) -> dict[str, list[Any]]:
        return {k: list(v) for k, v in self.grid.items()}


def check_key(config: Any, key: str) -> None:
    """Raise ``ValueError`` when ``key`` (dotted) names no field of the config dataclass
    ``config``. Below a field holding a mapping of free options (``scenario.options``) any
    key is accepted: the job checks those options itself.
    """
    node: Any = config
    walked: list[str] = []
    for part in key.split("."):
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            names = [f.name for f in dataclasses.fields(node)]
            if part not in names:
                where = ".".join(walked) or "the config"
                raise ValueError(
                    f"--grid key {key!r} is not in the config: {where} has no {part!r}; its "
                    f"keys are {sorted(names)}"
                )
            node = getattr(node, part)
        elif isinstance(node, Mapping):
            if part not in node:
                return  # free options: the job's own check reads them
            node = node[part]
        else:
            raise ValueError(
                f"--grid key {key!r} is not in the config: {'.'.join(walked)!r} is a value "
                f"({node!r}), not a section"
            )
        walked.append(part)


def set_key(data: Mapping[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of the config mapping ``data`` with the dotted ``key`` set to ``value`` (the
    sections on the way created when missing); ``data`` is left unchanged."""
    out = dict(data)
    parts = key.split(".")
    node = out
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = {}
        if not isinstance(child, Mapping):
            raise ValueError(f"--grid key {key!r}: {p!r} is not a section")
        node[p] = dict(child)
        node = node[p]
    node[parts[-1]] = value
    return out


def overrides_text(overrides: Mapping[str, Any]) -> str:
    """``adapter.rank=8 train.lr=0.003`` (for messages and tables)."""
    return " ".join(format_override(k, v) for k, v in overrides.items())


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config mapping as ``{dotted key: leaf value}`` (lists are leaves)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out
