"""Every registered fusion: output shapes, gradients reach the encoders it uses, loss falls."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from catalog_enrichment.config import ModelConfig, SyntheticConfig
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.data.dataset import (
    Collator,
    ProductDataset,
    ProductRecords,
    encode_labels,
    train_wordpiece_tokenizer,
)
from catalog_enrichment.data.synthetic import products_batches
from catalog_enrichment.errors import ConfigError
from catalog_enrichment.models.encoders import ImagePreprocessing
from catalog_enrichment.models.fusion import create_fusion, fusion_class, kl_to_uniform, list_fusions
from catalog_enrichment.models.losses import attribute_loss
from catalog_enrichment.models.model import build_model
from tests.conftest import TINY_MODEL

TINY = ModelConfig.model_validate(
    {**TINY_MODEL, "text": {**TINY_MODEL["text"], "vocab_size": 300, "max_length": 24}}
)


@pytest.fixture(scope="module")
def tiny_batch(taxonomy: Taxonomy) -> tuple[dict[str, Any], Any]:
    table = pa.Table.from_batches(
        [b for b, _ in products_batches(SyntheticConfig(products=48, seed=1, image_size=32), taxonomy)]
    )
    records = ProductRecords.from_arrow(table)
    tokenizer = train_wordpiece_tokenizer(records.title, vocab_size=300, max_length=24)
    data = ProductDataset(
        records, np.arange(48), preprocessing=ImagePreprocessing(32), labels=encode_labels(table, taxonomy)
    )
    return Collator(tokenizer, 24)([data[i] for i in range(48)]), tokenizer


def _model(name: str, taxonomy: Taxonomy, tokenizer: Any, **kwargs: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = TINY.model_copy(update={"fusion": name, "fusion_kwargs": kwargs})
    return build_model(cfg, taxonomy, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)


def test_registry_lists_every_method_of_the_papers() -> None:
    assert list_fusions() == sorted(
        [
            "text_only",
            "image_only",
            "late",
            "decision",
            "concat",
            "cross_attention",
            "hierarchical",
            "modality_attention",
        ]
    )


@pytest.mark.parametrize("name", list_fusions())
def test_shapes_and_probabilities(name: str, taxonomy: Taxonomy, tiny_batch) -> None:  # type: ignore[no-untyped-def]
    batch, tokenizer = tiny_batch
    model = _model(name, taxonomy, tokenizer).eval()
    with torch.no_grad():
        out = model(batch)
    for attr in taxonomy:
        p = out.probs[attr.name]
        assert p.shape == (48, len(attr.values))
        assert torch.all((p >= 0) & (p <= 1))
        if attr.kind == "multiclass":
            assert torch.allclose(p.sum(dim=1), torch.ones(48), atol=1e-5)
    if name == "modality_attention":
        assert out.modality_weights is not None
        for w in out.modality_weights.values():
            assert w.shape == (48, 2) and torch.allclose(w.sum(dim=1), torch.ones(48))


@pytest.mark.parametrize("name", list_fusions())
def test_gradients_reach_the_encoders_the_method_uses(name: str, taxonomy: Taxonomy, tiny_batch) -> None:  # type: ignore[no-untyped-def]
    batch, tokenizer = tiny_batch
    model = _model(name, taxonomy, tokenizer)
    out = model(batch)
    kinds = {a.name: a.kind for a in taxonomy}
    loss = sum(attribute_loss(lg, batch["targets"], batch["known"], kinds) for lg in out.train_logits)
    (loss + out.aux_loss).backward()
    cls = fusion_class(name)

    def grad_norm(module: torch.nn.Module) -> float:
        return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)

    if cls.needs_text:
        assert all(grad_norm(enc) > 0 for enc in model.text_encoders)
    else:
        assert len(model.text_encoders) == 0
    if cls.needs_image:
        assert model.image_encoder is not None and grad_norm(model.image_encoder) > 0
    else:
        assert model.image_encoder is None
    if name == "hierarchical":
        assert len(model.text_encoders) == 2  # two text encoders, as in paper 002


@pytest.mark.parametrize("name", list_fusions())
def test_loss_falls_on_a_tiny_seeded_problem(name: str, taxonomy: Taxonomy, tiny_batch) -> None:  # type: ignore[no-untyped-def]
    batch, tokenizer = tiny_batch
    model = _model(name, taxonomy, tokenizer)
    kinds = {a.name: a.kind for a in taxonomy}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        out = model(batch)
        loss = sum(attribute_loss(lg, batch["targets"], batch["known"], kinds) for lg in out.train_logits)
        opt.zero_grad()
        (loss + out.aux_loss).backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


def test_kl_regulariser_is_zero_at_uniform_and_log2_at_collapse() -> None:
    assert float(kl_to_uniform(torch.tensor([0.5, 0.5]))) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_to_uniform(torch.tensor([1.0, 0.0]))) == pytest.approx(np.log(2), abs=1e-4)


def test_late_fusion_picks_alpha_on_heldout(taxonomy: Taxonomy, tiny_batch) -> None:  # type: ignore[no-untyped-def]
    batch, tokenizer = tiny_batch
    model = _model("late", taxonomy, tokenizer).eval()
    with torch.no_grad():
        out = model(batch)
    # make the image branch perfect and the text branch useless: alpha must go to 0 (all image)
    perfect = {}
    for attr in taxonomy:
        t = batch["targets"][attr.name]
        perfect[attr.name] = t.float() if attr.kind == "multilabel" else torch.eye(len(attr.values))[t]
    useless = {a: torch.full_like(p, 0.5) for a, p in perfect.items()}
    chosen = model.fusion.fit_heldout({"text": useless, "image": perfect}, batch["targets"], batch["known"])
    assert all(alpha == 0.0 for alpha in chosen["alpha"].values())
    assert out.branch_probs.keys() == {"text", "image"}


def test_unknown_fusion_and_bad_options_are_clear_errors(taxonomy: Taxonomy) -> None:
    with pytest.raises(ConfigError, match="unknown fusion 'gated'; available: concat"):
        create_fusion("gated", text_dim=4, image_dim=4, heads=[])
    with pytest.raises(ConfigError, match=r"fusion 'late'.*unexpected keyword"):
        create_fusion("late", text_dim=4, image_dim=4, heads=[], kl_lambda=1.0)
    with pytest.raises(ConfigError, match="unknown merge 'max'"):
        create_fusion("hierarchical", text_dim=4, image_dim=4, heads=[], level1="max")


def test_uint8_pixels_are_normalised_inside_the_model(taxonomy: Taxonomy, tiny_batch) -> None:  # type: ignore[no-untyped-def]
    """Training batches and a GPU carry the decoded uint8 pixels (serving on a CPU normalises them in
    its prepare threads, channels-last): the model's output is the same either way."""
    batch, tokenizer = tiny_batch
    model = _model("concat", taxonomy, tokenizer).eval()
    present = batch["image_present"].bool()
    assert present.sum() > 10 and (~present).sum() > 0  # both kinds of row are in the known answer
    as_uint8 = batch["pixel_values"]
    assert as_uint8.dtype == torch.uint8
    floats = model.preprocessing.normalize(as_uint8)
    # the default preprocessing without pretrained weights: (x / 255 - 0.5) / 0.25 on every channel
    assert torch.allclose(floats, (as_uint8.float() / 255 - 0.5) / 0.25, atol=1e-5)
    channels_last = floats.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    with torch.inference_mode():
        expected = model(batch).probs
        got = model({**batch, "pixel_values": channels_last}).probs
    for attribute, probs in expected.items():
        torch.testing.assert_close(got[attribute], probs, atol=1e-5, rtol=1e-4)
