"""The project's YAML files: a missing or malformed file is one line naming what and where."""

from __future__ import annotations

from pathlib import Path

import pytest

from catalog_enrichment.errors import ConfigError, ContractError
from catalog_enrichment.yamlfile import read_yaml

pytestmark = pytest.mark.timeout(10)


def test_a_file_is_read_and_an_empty_one_is_none(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("name: shop\nvalues: [red, '010']\n")
    assert read_yaml(tmp_path / "a.yaml", "config", ConfigError) == {"name": "shop", "values": ["red", "010"]}
    (tmp_path / "empty.yaml").write_text("")
    assert read_yaml(tmp_path / "empty.yaml", "config", ConfigError) is None


def test_missing_and_malformed_files_raise_the_callers_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match=f"taxonomy not found: {tmp_path / 'none.yaml'}"):
        read_yaml(tmp_path / "none.yaml", "taxonomy", ContractError)
    (tmp_path / "bad.yaml").write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match=f"config {tmp_path / 'bad.yaml'} is not valid YAML") as info:
        read_yaml(tmp_path / "bad.yaml", "config", ConfigError)
    assert "\n" not in str(info.value).split(": ", 1)[0]
