"""Self-supervised text adaptation (003): the contrastive loss's known answer, and SimCSE / ConVIRT
folders a text-only model fine-tunes from."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from transformers import AutoTokenizer

from catalog_enrichment.cli import main
from catalog_enrichment.config import SyntheticConfig
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.data.synthetic import generate_marketplace, products_batches
from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.training.pipeline import train
from catalog_enrichment.training.pretrain import PretrainOptions, contrastive_loss, pretrain_text
from tests.conftest import tiny_config


def test_contrastive_loss_known_answer() -> None:
    # orthogonal unit rows, each its own positive: cos = 1 on the diagonal, 0 elsewhere
    x = torch.eye(4) * 3.0  # the loss normalises: the scale does not matter
    tau = 0.1
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 3))
    assert float(contrastive_loss(x, x, tau)) == pytest.approx(expected, abs=1e-6)  # float32
    # positives swapped in pairs: every anchor's positive is orthogonal to it, a negative matches
    swapped = x[[1, 0, 3, 2]]
    assert float(contrastive_loss(x, swapped, tau)) == pytest.approx(
        -math.log(1 / (math.exp(1 / tau) + 3)), rel=1e-5
    )


def _products(n: int, taxonomy: Taxonomy) -> pa.Table:
    cfg = SyntheticConfig(products=n, seed=5, image_size=32)
    return pa.Table.from_batches([b for b, _ in products_batches(cfg, taxonomy)])


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", ["simcse", "convirt"])
def test_an_adapted_encoder_is_a_folder_a_text_only_model_fine_tunes_from(
    method: str, taxonomy: Taxonomy, tmp_path: Path
) -> None:
    table = _products(400, taxonomy)
    lines: list[str] = []
    result = pretrain_text(
        table,
        tiny_config(),
        PretrainOptions(method, epochs=3),  # type: ignore[arg-type]
        out=tmp_path / method,
        progress=lines.append,
    )
    # the objective is learned: the loss falls from its chance level (log of the batch size)
    assert result.losses[-1] < result.losses[0] < math.log(32) + 0.5
    assert result.temperature == (0.1 if method == "convirt" else 0.05)
    assert result.alpha == (0.75 if method == "convirt" else None)
    record = json.loads((tmp_path / method / "pretraining.json").read_text())
    assert record["method"] == method and record["losses"] == result.losses
    assert any(f"{method} epoch 3/3" in line for line in lines)
    cfg = tiny_config(
        fusion="text_only", epochs=1, model={"text": {"pretrained_path": str(tmp_path / method)}}
    )
    trained = train(table, taxonomy, cfg)
    # the fine-tuned model started from the adapted weights and reads with the folder's tokenizer
    assert trained.model.text_encoders[0].backbone.config.hidden_size == 32
    assert trained.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(str(tmp_path / method)).get_vocab()


def test_too_few_products_is_a_clear_error(taxonomy: Taxonomy, tmp_path: Path) -> None:
    with pytest.raises(CatalogEnrichError, match="too few for two batches of 32"):
        pretrain_text(
            _products(40, taxonomy), tiny_config(), PretrainOptions("simcse", epochs=1), out=tmp_path / "x"
        )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_pretrain_text_command(
    taxonomy: Taxonomy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    market = generate_marketplace(
        tmp_path / "m", SyntheticConfig(products=200, seed=2, image_size=32), taxonomy=taxonomy
    )
    args = [
        "pretrain-text",
        "--method",
        "simcse",
        "--data",
        str(market.products),
        "--out",
        str(tmp_path / "enc"),
        "--epochs",
        "1",
        "--set",
        "model.text.hidden_size=32",
        "--set",
        "model.text.num_hidden_layers=1",
    ]
    code = main(args)
    assert code == 0 and (tmp_path / "enc" / "config.json").is_file()
    assert f"next: --set model.text.pretrained_path={tmp_path / 'enc'}" in capsys.readouterr().out
    streamed = ["--out", str(tmp_path / "streamed"), "--set", "training.streaming.enabled=true"]
    assert main([*args[:5], *args[7:], *streamed]) == 0
    assert "simcse: 200 products, 1 epochs" in capsys.readouterr().out
    assert (
        main(["pretrain-text", "--method", "simcse", "--data", str(tmp_path / "nowhere"), "--out", "x"]) == 2
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", ["simcse", "convirt"])
def test_streamed_pretraining_reads_record_batches_learns_and_gives_the_same_encoder_twice(
    method: str, taxonomy: Taxonomy, tmp_path: Path
) -> None:
    from catalog_enrichment.training.stream import Source, arrow_source

    table = _products(400, taxonomy)
    streamed = arrow_source(table, batch_rows=50)
    passes: list[list[int]] = []

    def batches():  # type: ignore[no-untyped-def]
        passes.append([])
        for batch in streamed.batches():
            passes[-1].append(batch.num_rows)
            yield batch

    source = Source(batches, streamed.rows, streamed.names)
    cfg = tiny_config(training={"streaming": {"enabled": True, "shuffle_rows": 64}})
    runs = [
        pretrain_text(source, cfg, PretrainOptions(method, epochs=3), out=tmp_path / f"{method}-{i}")  # type: ignore[arg-type]
        for i in range(2)
    ]
    # one counting pass, then one per epoch; never more than a record batch at a time from the table
    assert len(passes) == 2 * (1 + 3) and all(max(p) == 50 for p in passes)
    with_image = sum(b is not None for b in table["image"].to_pylist())
    assert runs[0].products == (with_image if method == "convirt" else table.num_rows)
    assert runs[0].losses[-1] < runs[0].losses[0] < math.log(32) + 0.5
    assert runs[0].losses == runs[1].losses
    weights = [(tmp_path / f"{method}-{i}" / "model.safetensors").read_bytes() for i in range(2)]
    assert weights[0] == weights[1]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("streamed", [False, True])
def test_convirt_leaves_placeholders_out_as_training_does(
    streamed: bool, taxonomy: Taxonomy, tmp_path: Path
) -> None:
    """40 products whose photo is one grey tile (over the limit of 20) are not their own photos'
    positives: ConVIRT leaves them out, in memory and streamed, and trains on the others."""
    import pyarrow.compute as pc

    from catalog_enrichment.bench.drift import placeholder_images
    from catalog_enrichment.training.stream import arrow_source

    table = _products(200, taxonomy)
    photo = pc.is_valid(table["image"]).to_pylist()
    hit = [i for i, p in enumerate(photo) if p][:40]
    tiled = placeholder_images(table.take(hit))
    rest = table.take([i for i in range(table.num_rows) if i not in set(hit)])
    data = pa.concat_tables([tiled, rest])
    lines: list[str] = []
    result = pretrain_text(
        arrow_source(data, batch_rows=50) if streamed else data,
        tiny_config(training={"streaming": {"enabled": streamed, "shuffle_rows": 64}}),
        PretrainOptions("convirt", epochs=1),
        out=tmp_path / "convirt",
        progress=lines.append,
    )
    assert result.products == sum(photo) - 40
    assert (
        f"convirt: {sum(photo) - 40:,} of 200 products have a usable image (placeholder images left out: 1)"
        in "\n".join(lines)
    )
