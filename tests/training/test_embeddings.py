"""The training embedding cache's writes (whole files only, whoever writes at the same time), its key
and eviction, and what a frozen encode keeps (cache or store)."""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from catalog_enrichment.catalog.embeddings import split_content
from catalog_enrichment.contracts import image_key
from catalog_enrichment.data.dataset import Collator, ProductRecords
from catalog_enrichment.data.images import ImagePolicy
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


def _png(path: Path, colour: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


@functools.cache
def _tiny() -> tuple[Any, Any]:
    """The tiny model (frozen encoders, a storable fusion) and its tokenizer."""
    from catalog_enrichment.contracts import load_taxonomy
    from catalog_enrichment.data.dataset import build_tokenizer
    from catalog_enrichment.training.trained import seeded_model
    from tests.conftest import tiny_config

    cfg = tiny_config(training={"encoders": "frozen"})
    tokenizer = build_tokenizer(cfg.model.text, ["red shirt", "blue shoe"])
    return seeded_model(cfg.model.member_configs()[0], load_taxonomy(), tokenizer, 0), tokenizer


def _records(folder: Path, digests: list[str | None]) -> ProductRecords:
    """Two products: a photo behind an ``image_uri`` in ``folder``, and none; ``digests``: a check's."""
    return ProductRecords(
        ["p1", "p2"], ["red shirt", "blue shoe"], [None, None], [None, None],
        [str(folder / "photo.png"), None], ImagePolicy(roots=(str(folder),)), digests,
    )  # fmt: skip


def _embed(records: ProductRecords, cache: Path | None, store: Any = None) -> list[str]:
    model, tokenizer = _tiny()
    said: list[str] = []
    embeddings.embed_products(
        model, records, Collator(tokenizer, 16), batch_size=4, device=torch.device("cpu"),
        cache_dir=cache, say=said.append, store=store,
    )  # fmt: skip
    return said


def test_the_photo_behind_an_image_uri_is_part_of_the_cache_key(tmp_path: Path) -> None:
    """The same texts and URI with another photo behind it (a replaced file, an outage tile) are
    another cache entry; a URI whose photo no check read is not cached at all."""
    photo = _png(tmp_path / "photo.png", (200, 10, 10))
    model, tokenizer = _tiny()
    keys = [
        embeddings._fingerprint(model, tokenizer, _records(tmp_path, digests), 16)
        for digests in ([image_key(photo), None], [image_key(b"an outage tile"), None], [])
    ]
    assert keys[0] is not None and keys[1] is not None and keys[0] != keys[1]
    assert keys[2] is None
    cache = tmp_path / "cache"
    _embed(_records(tmp_path, []), cache)
    assert not cache.exists() or not list(cache.glob("*.pt"))
    _embed(_records(tmp_path, [image_key(photo), None]), cache)
    assert [p.name for p in cache.glob("*.pt")] == [f"{keys[0]}.pt"]


class _Store:
    """A catalog's embedding store that holds nothing and keeps what is written to it."""

    def __init__(self) -> None:
        self.written: list[dict[str, Any]] = []

    def embeddings_of(self, encoder: str, product_ids: Any) -> pa.Table:
        return pa.table({"product_id": [], "content": [], "embedding": []})

    def write_embeddings(self, rows: str) -> int:
        table = pq.read_table(rows)
        self.written.extend(table.select(["product_id", "content"]).to_pylist())
        return table.num_rows


def test_a_photo_replaced_between_the_check_and_the_encode_is_kept_nowhere(tmp_path: Path) -> None:
    """The check read one photo, the encode another (replaced since): its vector is neither cached
    nor stored beside the check's digest; read as checked, it is kept beside the digest of the
    bytes it came from."""
    checked = image_key(_png(tmp_path / "photo.png", (200, 10, 10)))
    replaced = image_key(_png(tmp_path / "photo.png", (10, 10, 200)))
    cache, store = tmp_path / "cache", _Store()
    said = _embed(_records(tmp_path, [checked, None]), cache)
    assert any("not cached: 1 of them had an image that did not load" in m for m in said), said
    assert not cache.exists() or not list(cache.glob("*.pt"))
    said = _embed(_records(tmp_path, [checked, None]), None, store)
    assert [r["product_id"] for r in store.written] == ["p2"], said
    _embed(_records(tmp_path, [replaced, None]), cache)
    assert len(list(cache.glob("*.pt"))) == 1
    _embed(_records(tmp_path, [replaced, None]), None, store)
    assert [split_content(r["content"])[1] for r in store.written[1:]] == [replaced, None]


def test_cache_files_no_training_used_for_days_are_deleted(tmp_path: Path) -> None:
    """A write deletes the entries (and a killed write's temporary files) nobody read or wrote for
    CACHE_KEEP_DAYS days; reading an entry keeps it."""
    photo = _png(tmp_path / "photo.png", (200, 10, 10))
    cache = tmp_path / "cache"
    _embed(_records(tmp_path, [image_key(photo), None]), cache)
    (used,) = cache.glob("*.pt")
    stale, partial = cache / ("0" * 32 + ".pt"), cache / (".ab" + "0" * 30 + ".pt.abc.partial")
    stale.write_bytes(b"old")
    partial.write_bytes(b"half")
    theirs = cache / "my_checkpoint.pt"  # not the cache's: never deleted
    theirs.write_bytes(b"mine")
    long_ago = time.time() - (embeddings.CACHE_KEEP_DAYS + 1) * 86_400
    for old in (used, stale, partial, theirs):
        os.utime(old, (long_ago, long_ago))
    said = _embed(_records(tmp_path, [image_key(photo), None]), cache)
    assert any("read from" in m for m in said), said  # used now: kept
    _png(tmp_path / "photo.png", (10, 10, 200))
    _embed(_records(tmp_path, [image_key((tmp_path / "photo.png").read_bytes()), None]), cache)
    assert used.exists() and not stale.exists() and not partial.exists() and theirs.exists()
    assert len(list(cache.iterdir())) == 3  # the one used, the one written, the user's
