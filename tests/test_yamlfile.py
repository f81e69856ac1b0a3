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


def test_a_key_given_twice_a_tab_and_bytes_that_are_not_text_are_one_line_errors(tmp_path: Path) -> None:
    """PyYAML keeps the last of two equal keys: a second ``inference:`` block would silently undo
    the first."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("inference:\n  batch_size: 4\ninference:\n  device: cpu\n")
    with pytest.raises(ConfigError, match=r"key 'inference' given twice in one mapping.* line 3") as info:
        read_yaml(twice, "config", ConfigError)
    (tmp_path / "tab.yaml").write_text("inference:\n\tdevice: cpu\n")
    (tmp_path / "latin1.yaml").write_bytes("title: caf\xe9\n".encode("latin-1"))
    for name in ("tab.yaml", "latin1.yaml"):
        with pytest.raises(ConfigError, match=f"config {tmp_path / name} is not valid YAML") as info:
            read_yaml(tmp_path / name, "config", ConfigError)
        assert "\n" not in str(info.value) and "<byte string>" not in str(info.value)
    (tmp_path / "list.yaml").write_text("- {a: 1}\n- {a: 2}\n")  # equal keys in two mappings: fine
    assert read_yaml(tmp_path / "list.yaml", "config", ConfigError) == [{"a": 1}, {"a": 2}]
    (tmp_path / "merge.yaml").write_text("base: &b {x: 1, y: 2}\nrun: {<<: *b, y: 3}\n")  # a merge key
    assert read_yaml(tmp_path / "merge.yaml", "config", ConfigError)["run"] == {"x": 1, "y": 3}
