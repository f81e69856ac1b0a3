"""Model input from labelled products: the tokenizer trained on the data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from catalog_enrichment.contracts import IMAGE_DECODABLE, Taxonomy
from catalog_enrichment.data.dataset import (
    Collator,
    ProductDataset,
    ProductRecords,
    encode_labels,
    train_wordpiece_tokenizer,
)
from catalog_enrichment.data.images import ImagePolicy, encode_image
from catalog_enrichment.data.preprocess import ImagePreprocessing
from catalog_enrichment.errors import CatalogEnrichError, ContractError


def test_the_trained_tokenizer_normalises_lower_cases_but_keeps_accents_and_dakuten() -> None:
    texts = ["ガラス 花瓶", "ガラス 花瓶", "Café Crème", "Café Crème", "カラス 置物", "cafe", "fine", "fine"]
    tokenizer = train_wordpiece_tokenizer(texts, vocab_size=200, max_length=16)
    # ガ (ga) and カ (ka) differ only by the dakuten; stripping accents would make them one word
    assert tokenizer("ガラス")["input_ids"] != tokenizer("カラス")["input_ids"]
    assert tokenizer("CAFÉ")["input_ids"] == tokenizer("café")["input_ids"] != tokenizer("cafe")["input_ids"]
    assert tokenizer.decode(tokenizer("Café Crème")["input_ids"], skip_special_tokens=True) == "café crème"
    # one form of each character (NFKC): full-width Latin, half-width katakana, a ligature
    assert tokenizer("ＣＡＦＥ́")["input_ids"] == tokenizer("café")["input_ids"]
    assert tokenizer("ｶﾞﾗｽ")["input_ids"] == tokenizer("ガラス")["input_ids"] != tokenizer("ｶﾗｽ")["input_ids"]
    assert tokenizer("ﬁne")["input_ids"] == tokenizer("fine")["input_ids"]


@pytest.mark.timeout(60)
def test_a_batch_of_items_with_verdicts_on_other_attributes_stacks_them_as_unjudged() -> None:
    """A streamed run encodes each record batch apart: an item of a batch without verdicts has no
    partial labels for an attribute another item's batch judged (the batch failed on it)."""
    tokenizer = train_wordpiece_tokenizer(["red shirt", "blue jeans"], vocab_size=60, max_length=8)

    def item(partial: dict[str, np.ndarray]) -> dict[str, object]:
        return {
            "title": "red shirt", "description": "", "pixel_values": torch.zeros(3, 4, 4), "image_present": 0,
            "targets": {"color": np.int64(-1)}, "known": {"color": False}, "partial": partial,
        }  # fmt: skip

    judged = np.array([1, 0, -1], np.int8)
    for items in ([item({"color": judged}), item({})], [item({}), item({"color": judged})]):
        batch = Collator(tokenizer, 8)(items)
        rows = batch["partial"]["color"].tolist()
        assert sorted(rows) == sorted([judged.tolist(), [0, 0, 0]])


def test_a_label_column_of_numbers_is_refused_naming_its_type_and_the_one_expected() -> None:
    taxonomy = Taxonomy.from_dict(
        {
            "attributes": {
                "color": {"kind": "multilabel", "values": ["red", "blue"]},
                "size": {"kind": "multiclass", "values": ["S", "M"]},
            }
        }
    )
    sizes = pa.array(["S", None, "M"])
    with pytest.raises(
        ContractError,
        match=r"label column 'color' of the multilabel attribute is of Arrow type int64; expected "
        r"list<string> \(or string",
    ):
        encode_labels(pa.table({"color": pa.array([1, 2, None]), "size": sizes}), taxonomy)
    with pytest.raises(ContractError, match=r"'color' .* Arrow type double; expected list<string>"):
        encode_labels(pa.table({"color": pa.array([1.0, None, 2.0]), "size": sizes}), taxonomy)
    with pytest.raises(
        ContractError, match=r"'size' of the multiclass attribute is of Arrow type int64; expected string"
    ):
        encode_labels(
            pa.table({"color": pa.array([["red"], None, []]), "size": pa.array([1, 2, 3])}), taxonomy
        )
    # what the contract says reads; a column of only nulls names no label, whatever its type
    labels = encode_labels(
        pa.table({"color": pa.array([["red"], None, ["blue"]]), "size": pa.array([None] * 3, pa.int64())}),
        taxonomy,
    )
    assert (
        labels.known["color"].tolist() == [True, False, True] and labels.targets["size"].tolist() == [-1] * 3
    )


def test_an_image_that_no_longer_reads_stops_training_naming_the_product(tmp_path: Path) -> None:
    """Training's products are those whose image a check found usable or absent: one that no longer
    decodes when its item is made (the bytes changed) stops the run naming it, as the streamed path
    does, instead of training on it as a product without an image; one whose read fails for now (a
    file or host gone for a while) is that item without its image, not a stopped training."""
    photo = tmp_path / "photo.png"
    photo.write_bytes(encode_image(np.full((32, 32, 3), 90, np.uint8), "PNG"))
    table = pa.table(
        {
            "product_id": ["photo", "none", "gone", "broken"],
            "title": ["a", "b", "c", "d"],
            "image": [None, None, None, b"not an image"],
            "image_uri": [str(photo), None, str(tmp_path / "gone.png"), None],
        }
    )
    records = ProductRecords.from_arrow(table, ImagePolicy(roots=(str(tmp_path),)))
    data = ProductDataset(records, np.arange(4), preprocessing=ImagePreprocessing(32))
    assert data[0]["image_present"] and not data[1]["image_present"]  # no image: scored from text
    assert not data[2]["image_present"]
    with pytest.raises(CatalogEnrichError, match=rf"image of product 'broken' \({IMAGE_DECODABLE}\)"):
        data[3]
