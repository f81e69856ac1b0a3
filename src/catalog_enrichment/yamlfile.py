"""Reading the project's YAML files (configs, contracts, taxonomies) with one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ["read_yaml"]


def read_yaml(path: Path, what: str, error: type[Exception]) -> Any:
    """The YAML document in ``path`` (None when it is empty).

    Raises:
        error: one line naming ``what`` and the path, when the file is missing or not valid YAML.
    """
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise error(f"{what} {path} is not valid YAML: {exc}") from exc
