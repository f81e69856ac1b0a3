"""Reading the project's YAML files (configs, contracts, taxonomies) with one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ["read_yaml"]


class _Loader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one: a
    second ``inference:`` block would silently undo the first)."""


def _mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be given again
            continue
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, str | int | float | bool) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice in one mapping", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def read_yaml(path: Path, what: str, error: type[Exception]) -> Any:
    """The YAML document in ``path`` (None when it is empty).

    Raises:
        error: one line naming ``what`` and the path, when the file is missing, not UTF-8 (or
            UTF-16) text, or not valid YAML (a key given twice in one mapping included).
    """
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        return yaml.load(path.read_bytes(), Loader=_Loader)
    except yaml.YAMLError as exc:
        where = " ".join(str(exc).replace('"<byte string>", ', "").split())
        raise error(f"{what} {path} is not valid YAML: {where}") from None
