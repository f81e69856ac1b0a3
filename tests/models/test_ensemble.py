"""Ensembles (001 §3.4): the combination rules' known answers and the members' configs."""

from __future__ import annotations

import pytest
import torch

from catalog_enrichment.config import ModelConfig
from catalog_enrichment.errors import ConfigError
from catalog_enrichment.models.model import EnsembleModel, build_model, combine_members, needs_image
from tests.conftest import TINY_MODEL


def test_mean_combination_averages_the_members() -> None:
    a, b = torch.tensor([[0.2, 0.8]]), torch.tensor([[0.6, 0.4]])
    assert torch.allclose(combine_members([a, b], "multiclass", "mean"), torch.tensor([[0.4, 0.6]]))


def test_vote_ranks_by_votes_and_breaks_ties_by_the_mean() -> None:
    # three members, multi-class over 3 values; votes (argmax): value 0 twice, value 2 once
    members = [
        torch.tensor([[0.5, 0.1, 0.4]]),
        torch.tensor([[0.45, 0.1, 0.45 - 1e-3]]),
        torch.tensor([[0.1, 0.1, 0.8]]),
    ]
    score = combine_members(members, "multiclass", "vote")
    mean = torch.stack(members).mean(dim=0)
    assert torch.allclose(score, (torch.tensor([[2.0, 0.0, 1.0]]) + mean) / 4)
    # value 2 has the higher mean probability but fewer votes: the votes rank first
    assert mean[0, 2] > mean[0, 0] and score[0, 0] > score[0, 2]
    assert float(score.max()) <= 1.0 and float(score.min()) >= 0.0


def test_vote_on_multilabel_counts_members_at_or_above_one_half() -> None:
    members = [torch.tensor([[0.5, 0.2]]), torch.tensor([[0.9, 0.6]])]
    score = combine_members(members, "multilabel", "vote")
    assert torch.allclose(score, (torch.tensor([[2.0, 1.0]]) + torch.tensor([[0.7, 0.4]])) / 3)


def test_unknown_combination_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="unknown ensemble combine 'median'"):
        combine_members([torch.zeros(1, 2)], "multiclass", "median")


def test_members_differ_by_fusion_and_the_ensemble_builds_one_model_per_member(taxonomy) -> None:  # type: ignore[no-untyped-def]
    cfg = ModelConfig.model_validate(
        {**TINY_MODEL, "fusion": "concat", "ensemble": {"members": 3, "fusions": ["concat", "text_only"]}}
    )
    assert [m.fusion for m in cfg.member_configs()] == ["concat", "text_only", "concat"]
    assert all(m.ensemble.members == 1 for m in cfg.member_configs())
    model = build_model(cfg, taxonomy, vocab_size=300)
    assert isinstance(model, EnsembleModel) and len(model.members) == 3
    assert len(model.text_backbone_configs()) == 3 and model.image_encoder is not None
    text_only = cfg.model_copy(
        update={"ensemble": cfg.ensemble.model_copy(update={"fusions": ["text_only"]})}
    )
    assert needs_image(cfg) and not needs_image(text_only)
    assert build_model(text_only, taxonomy, vocab_size=300).image_encoder is None
