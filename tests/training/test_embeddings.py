"""The training embedding cache's writes: whole files only, whoever writes at the same time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from catalog_enrichment.embeddings import frozen as embeddings
from catalog_enrichment.embeddings.frozen import save_atomically

pytestmark = pytest.mark.timeout(60)


def test_two_trainings_writing_one_cache_entry_at_once_both_finish_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training B writes and renames the entry while training A is between its write and its rename
    (what two processes interleave into): each renames a file of its own, no rename finds its file
    gone, and the entry is one whole file."""
    path = tmp_path / "cache" / "key.pt"
    real_save = torch.save
    interleaved: list[str] = []

    def save(obj: Any, name: Any) -> None:
        real_save(obj, name)
        if not interleaved:  # A has written; B runs from start to finish now
            interleaved.append(str(name))
            save_atomically({"x": torch.full((3,), 2.0)}, path)

    monkeypatch.setattr(embeddings.torch, "save", save)
    save_atomically({"x": torch.full((3,), 1.0)}, path)
    assert torch.load(path, weights_only=True)["x"].tolist() == [1.0, 1.0, 1.0]  # A renamed last
    assert [p.name for p in path.parent.iterdir()] == ["key.pt"]  # no temporary file left


def test_a_failed_write_leaves_no_entry_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(obj: Any, name: Any) -> None:
        Path(name).write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(embeddings.torch, "save", full_disk)
    with pytest.raises(OSError, match="No space"):
        save_atomically({"x": torch.zeros(1)}, tmp_path / "key.pt")
    assert list(tmp_path.iterdir()) == []
