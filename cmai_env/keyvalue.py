"""The one command-line ``key<sep>value`` parser (``--set k=v``, ``--env-kwargs k:v``, ``--param k=v``).

Values are YAML scalars, lists or mappings read with :class:`FloatLoader` (``3e-4`` is a float,
``[32, 32]`` a list, ``true``/``null`` booleans and None), and fractions such as ``8/255`` are
numbers. Torch-free, so the listing commands can import it.
"""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

__all__ = ["FloatLoader", "UniqueKeyLoader", "load_yaml", "load_yaml_mapping", "parse_assignments", "parse_value", "set_dotted"]


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping.

    PyYAML keeps the last value silently, so a ``defense:`` block written twice would lose the
    first. Keys a merge (``<<: *base``) brings in may still be overridden, as YAML intends.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: SafeLoader reports it
                    continue
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark,
                        f"duplicate key {key!r} (first given on line {first.start_mark.line + 1}); give each field once",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


class FloatLoader(UniqueKeyLoader):
    """SafeLoader that also reads ``3e-4`` (no dot) as a float, as YAML 1.2 and humans do."""


FloatLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)

_FRACTION = re.compile(r"^\s*[-+]?\d+(?:\.\d*)?\s*/\s*\d+(?:\.\d*)?\s*$")


def parse_value(text: str) -> Any:
    """A command-line value: a fraction (``8/255`` → float), else YAML (``3e-4`` → float,
    ``[32,32]`` → list, ``none``/``null`` → None, any other word → the string).

    :raises ValueError: text that is neither a fraction nor valid YAML (``[1, 2``).
    """
    if _FRACTION.match(text):
        try:
            numerator, denominator = text.replace(" ", "").split("/")
            return float(Fraction(numerator) / Fraction(denominator))  # Fraction("0.5/255") itself is refused
        except ZeroDivisionError:
            raise ValueError(f"cannot parse value {text!r}: division by zero") from None
    if text.strip().lower() == "none":
        return None
    try:
        return yaml.load(text, Loader=FloatLoader)  # noqa: S506  (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise ValueError(f"cannot parse value {text!r} as YAML: {str(exc).splitlines()[0]}") from None


def load_yaml(path: Path) -> Any:
    """Read a YAML file with :func:`parse_value`'s float rules (safe: no Python objects)."""
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=FloatLoader)  # noqa: S506
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a UTF-8 text file (byte {exc.start} is {exc.object[exc.start:exc.start + 1]!r}); expected YAML") from None


def load_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (a run's ``config.yml``, ``args.yml``).

    :param what: what the mapping holds and why it is needed, for the messages.
    :raises FileNotFoundError, ValueError: naming the file.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {what}")
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping ({what})")
    return data


_EXAMPLES = {"=": "learning_rate=3e-4", ":": "episode_rounds:20"}


def parse_assignments(items: Sequence[str] | Mapping[str, Any] | None, sep: str, option: str) -> dict[str, Any]:
    """``["a=1", "b.c=[1,2]"]`` → ``{"a": 1, "b.c": [1, 2]}`` (a mapping passes through, None is empty).

    :param sep: ``=`` for ``--set`` and ``--param``, ``:`` for ``--env-kwargs``.
    :param option: the option's name, for error messages.
    :raises ValueError: an item without ``sep``, a key that is not an identifier (dots and dashes
        allowed), or a value :func:`parse_value` cannot read; the message names the option and item.
    """
    if items is None:
        return {}
    if isinstance(items, Mapping):
        return dict(items)
    out: dict[str, Any] = {}
    for item in items:
        key, found, value = str(item).partition(sep)
        key = key.strip()
        if not found or not key or not re.fullmatch(r"[A-Za-z_][\w.\-]*", key):
            raise ValueError(f"{option} expects key{sep}value (e.g. {_EXAMPLES.get(sep, 'key' + sep + 'value')}), got {item!r}")
        try:
            out[key] = parse_value(value.strip())
        except ValueError as exc:
            raise ValueError(f"{option} {item!r}: {exc}") from None
    return out


def set_dotted(target: dict[str, Any], key: str, value: Any) -> None:
    """``target["a"]["b"] = value`` for ``key="a.b"``, creating (or replacing non-dict) levels."""
    *parents, leaf = key.split(".")
    node = target
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value
