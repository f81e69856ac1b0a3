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
from catalog_enrichment.data.preprocess import ImagePreprocessing
from catalog_enrichment.data.synthetic import products_batches
from catalog_enrichment.errors import ConfigError
from catalog_enrichment.models.fusion import (
    FusionInputs,
    HeadSpec,
    create_fusion,
    fusion_class,
    fusion_options,
    kl_to_uniform,
    list_fusions,
    trained_fusions,
)
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
            "stack",
        ]
    )
    assert trained_fusions() == [
        f for f in list_fusions() if f != "stack"
    ]  # stack: tests/training/test_stack.py


@pytest.mark.parametrize("name", trained_fusions())
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
    # the encoders' token-level outputs (what frozen training keeps of every product) only where
    # the fusion attends over tokens
    with torch.no_grad():
        encoded = model.encode(batch)
    tokens = (encoded.text_tokens, encoded.text_mask, encoded.image_tokens)
    assert all(t is not None for t in tokens) if model.fusion.needs_tokens else tokens == (None, None, None)


@pytest.mark.parametrize("name", trained_fusions())
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


@pytest.mark.parametrize("name", trained_fusions())
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
    with pytest.raises(ConfigError, match=r"fusion 'late': kl_lambda: Extra inputs are not permitted"):
        create_fusion("late", text_dim=4, image_dim=4, heads=[], kl_lambda=1.0)
    # options are typed by the fusion's own constructor: a wrong type is named before anything runs
    with pytest.raises(
        ConfigError, match=r"hidden_dim: Input should be a valid integer.*takes dropout \(float\)"
    ):
        fusion_options("concat", {"hidden_dim": "wide"})
    assert fusion_options("decision", {"folds": "4", "lr": 0.1}) == {
        "folds": 4,
        "lr": 0.1,
    }  # --set gives text
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


# ----------------------------------------------------------------------------- hierarchical (002)

T1, D1 = torch.tensor([[1.0, 2.0]]), torch.tensor([[10.0, 20.0]])  # encoder 1: title, description
T2, D2 = torch.tensor([[3.0, 4.0]]), torch.tensor([[30.0, 40.0]])  # encoder 2
IMAGE = torch.tensor([[1.0, -1.0, 5.0]])


def _fields(*, description: bool = True, image: bool = True) -> FusionInputs:
    present = torch.tensor([1.0 if description else 0.0])
    return FusionInputs(
        image_present=torch.tensor([1.0 if image else 0.0]),
        image_pooled=IMAGE,
        field_pooled=[[T1, D1], [T2, D2]],
        field_present=[torch.ones(1), present],
    )


def _hierarchical(**kwargs: Any) -> Any:
    return create_fusion(
        "hierarchical", text_dim=2, image_dim=3, heads=[HeadSpec("x", "multiclass", 2)], **kwargs
    )


@pytest.mark.parametrize(
    ("level1", "level2", "expected"),
    [
        # fields within each encoder first (Z(T_f, D_f), Z(T_c, D_c)), then across encoders (002 eq. 1)
        ("concat", "concat", [[1, 2, 10, 20, 3, 4, 30, 40]]),
        ("add", "concat", [[11, 22, 33, 44]]),
        ("concat", "add", [[4, 6, 40, 60]]),
        ("average", "add", [[22, 33]]),
        ("add", "average", [[22, 33]]),
        ("average", "concat", [[5.5, 11, 16.5, 22]]),
    ],
)
def test_hierarchical_merges_fields_within_each_encoder_then_across_encoders(
    level1: str, level2: str, expected: list[list[float]]
) -> None:
    # the reverse order (encoders within each field first) would give [T1, T2, D1, D2] for concat/concat
    # and [T1 + T2, D1 + D2] = [[4, 6, 40, 60]] for add/concat
    fusion = _hierarchical(level1=level1, level2=level2)
    assert torch.equal(fusion.text_vector(_fields()), torch.tensor(expected))


def test_hierarchical_absent_description_counts_as_zero() -> None:
    fusion = _hierarchical(level1="concat", level2="concat")
    assert torch.equal(
        fusion.text_vector(_fields(description=False)), torch.tensor([[1.0, 2, 0, 0, 3, 4, 0, 0]])
    )


@pytest.mark.parametrize("op", ["add", "concat", "average"])
@pytest.mark.parametrize("image", [True, False])
def test_hierarchical_image_level_operation(op: str, image: bool) -> None:
    fusion = _hierarchical(level1="add", level2="concat", image=op)  # text vector [11, 22, 33, 44]
    text = torch.nn.functional.layer_norm(torch.tensor([[11.0, 22, 33, 44]]), (4,))
    normed = torch.nn.functional.layer_norm(IMAGE, (3,)) * (1.0 if image else 0.0)
    if op == "concat":  # sizes may differ: no projection
        assert isinstance(fusion.project_image, torch.nn.Identity)
        expected = torch.cat([text, normed], dim=-1)
    else:  # 3 -> 4 wide: the image is projected to the text's width
        weight = torch.arange(12, dtype=torch.float32).reshape(4, 3) / 10
        with torch.no_grad():
            fusion.project_image.weight.copy_(weight)
            fusion.project_image.bias.fill_(0.5)
        projected = (normed @ weight.T + 0.5) * (1.0 if image else 0.0)
        expected = text + projected if op == "add" else (text + projected) / 2
    joint = fusion.joint_vector(_fields(image=image))
    assert joint.shape == expected.shape and torch.allclose(joint, expected, atol=1e-5)
    assert fusion(_fields(image=image)).probs["x"].shape == (1, 2)


def test_hierarchical_same_width_needs_no_projection() -> None:
    fusion = create_fusion(
        "hierarchical", text_dim=2, image_dim=2, heads=[], level1="average", level2="average", image="add"
    )
    assert isinstance(fusion.project_image, torch.nn.Identity)


# ----------------------------------------------------------------------------- decision (001)


def _onehot_probs(rng: np.random.Generator, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.from_numpy(rng.integers(0, k, n))
    return y, torch.eye(k)[y]


def test_decision_fusion_cross_validates_one_net_per_fold_and_averages_them() -> None:
    torch.manual_seed(0)  # the nets' initialisation, whatever the tests before this one drew
    rng = np.random.default_rng(0)
    heads = [HeadSpec("pattern", "multiclass", 6)]
    fusion = create_fusion("decision", text_dim=4, image_dim=4, heads=heads)
    assert len(fusion.decision["pattern"]) == 8  # 001 §4.1: 8-fold cross-validation
    assert fusion.decision["pattern"][0][0].out_features == 6  # hidden size 6
    y, perfect = _onehot_probs(rng, 400, 6)
    useless = torch.full_like(perfect, 1 / 6)
    # the image branch knows the answer and the text branch nothing: every fold's net learns to
    # follow the image on products it has not seen
    report = fusion.fit_heldout(
        {"text": {"pattern": useless}, "image": {"pattern": perfect}},
        {"pattern": y},
        {"pattern": torch.ones(400, dtype=torch.bool)},
    )
    # Over 50 initialisations the folds' macro-F1 was 1.0 for 39 and at least 0.923 for all: with
    # 6 hidden ReLU units, an unlucky start leaves a fold's net a unit short. Their average below
    # followed the image on every fresh product for all 50.
    assert report["decision_fold_macro_f1"]["pattern"] >= 0.9
    fresh_y, fresh = _onehot_probs(rng, 200, 6)
    with torch.no_grad():
        probs = fusion._decide({"pattern": torch.full_like(fresh, 1 / 6)}, {"pattern": fresh})["pattern"]
        x = torch.cat([torch.full_like(fresh, 1 / 6), fresh], dim=-1)
        mean = torch.stack([torch.softmax(net(x), -1) for net in fusion.decision["pattern"]]).mean(dim=0)
    assert torch.allclose(probs, mean)
    assert (probs.argmax(dim=1) == fresh_y).all()


def test_decision_fusion_with_too_few_heldout_products_is_a_clear_error() -> None:
    fusion = create_fusion("decision", text_dim=4, image_dim=4, heads=[HeadSpec("pattern", "multiclass", 3)])
    y = torch.tensor([0, 1, 2] * 3)
    p = torch.eye(3)[y]
    with pytest.raises(ConfigError, match="'pattern' has 9 labelled held-out products, too few for 8-fold"):
        fusion.fit_heldout(
            {"text": {"pattern": p}, "image": {"pattern": p}}, {"pattern": y}, {"pattern": y >= 0}
        )


def test_partial_labels_train_only_the_values_people_judged() -> None:
    """Known answers: multi-label BCE on the judged values only; multi-class CE on a confirmed value
    and -log(1 - p_v) for a rejected one; each partially labelled product counts once."""
    import math

    from catalog_enrichment.models.losses import attribute_loss

    logits = {"ml": torch.tensor([[0.0, 2.0, -1.0]]), "mc": torch.tensor([[0.0, math.log(3.0), 0.0]])}
    targets = {"ml": torch.zeros(1, 3), "mc": torch.tensor([-1])}
    known = {"ml": torch.tensor([False]), "mc": torch.tensor([False])}
    kinds = {"ml": "multilabel", "mc": "multiclass"}
    partial = {
        "ml": torch.tensor([[0, 1, -1]], dtype=torch.int8),
        "mc": torch.tensor([[0, -1, 0]], dtype=torch.int8),
    }
    ml = math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0))  # value 1 present, value 2 absent
    mc = -math.log(1 - 3 / 5)  # p = (1, 3, 1) / 5; value 1 rejected
    loss = attribute_loss(logits, targets, known, kinds, partial)
    assert float(loss) == pytest.approx((ml + mc) / 2, rel=1e-6)
    # without partial labels nothing is learned from these products; with a full label, the usual CE
    assert float(attribute_loss(logits, targets, known, kinds)) == 0.0
    confirmed = {"mc": torch.tensor([[0, 1, 0]], dtype=torch.int8)}
    assert float(
        attribute_loss({"mc": logits["mc"]}, {"mc": targets["mc"]}, {"mc": known["mc"]}, kinds, confirmed)
    ) == pytest.approx(-math.log(3 / 5), rel=1e-6)
