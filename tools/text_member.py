"""MiniLM's top layers fine-tuned on hm-fashion as a member beside the stack, measured on a CPU: the
stack's own cross-fit folds and text pairs (title, description; ``model.text.max_length``), the
hidden states below the top ``--layers`` layers computed once, then per fold a copy of those layers
and one softmax head per attribute trained over them (AdamW, warm-up then linear decay, label
smoothing 0.1; a label's first value: hm-fashion's products have one per attribute). Out-of-fold
probabilities for every training product; for every test product, the probabilities of the fold
models' weights averaged (one network, as the stack's linear learners are averaged). Writes what
``tools/gpu/compare.py`` reads:

    python tools/text_member.py ../shared/data/hm-fashion textmember/ --epochs 2
    python tools/gpu/compare.py ../shared/data/hm-fashion textmember/meta.json textmember/finetuned.npz \\
        --member "fine-tuned MiniLM top layers" --out textmember/compare.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from gpu.export_hm import stack_folds  # tools/gpu/export_hm.py: the folds the GPU measurement used
from torch import nn

from catalog_enrichment.config import AppConfig, load_config
from catalog_enrichment.contracts import load_taxonomy

BODY_LR, HEAD_LR, WEIGHT_DECAY, BATCH = 1e-4, 2e-3, 0.01, 32


class Member(nn.Module):
    """The text model's top layers over the states below them, mean-pooled, a head per attribute."""

    def __init__(self, layers: nn.ModuleList, width: int, sizes: dict[str, int]) -> None:
        super().__init__()
        self.layers = copy.deepcopy(layers)
        self.heads = nn.ModuleDict({a: nn.Linear(width, v) for a, v in sizes.items()})

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        x, extended = states.float(), (1.0 - mask[:, None, None, :]) * torch.finfo(torch.float32).min
        for layer in self.layers:
            out = layer(x, attention_mask=extended)
            x = out[0] if isinstance(out, tuple) else out
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return {a: head(pooled) for a, head in self.heads.items()}


def _states(cfg: AppConfig, table: pa.Table, n_top: int) -> tuple[torch.Tensor, torch.Tensor, nn.ModuleList]:
    """Every product's hidden states below the top ``n_top`` layers (float16), its mask, and the top
    layers themselves."""
    from transformers import AutoModel

    from catalog_enrichment.data.dataset import load_tokenizer

    path = cfg.model.text.pretrained_path
    if path is None:
        raise SystemExit("the config names no model.text.pretrained_path (run `make weights`)")
    tokenizer, backbone = load_tokenizer(cfg.model.text), AutoModel.from_pretrained(path).eval()
    titles = [t or "" for t in table["title"].to_pylist()]
    descriptions = [d or "" for d in table["description"].to_pylist()]
    length = cfg.model.text.max_length
    states, masks = [], []
    with torch.inference_mode():
        for i in range(0, len(titles), 128):
            batch = tokenizer(
                titles[i : i + 128], descriptions[i : i + 128], truncation=True, max_length=length,
                padding="max_length", return_tensors="pt",
            )  # fmt: skip
            hidden = backbone(**batch, output_hidden_states=True).hidden_states
            states.append(hidden[len(hidden) - 1 - n_top].half())
            masks.append(batch["attention_mask"].float())
    layers = backbone.encoder.layer
    return torch.cat(states), torch.cat(masks), nn.ModuleList(layers[len(layers) - n_top :])


def _fit(
    member: Member,
    states: torch.Tensor,
    mask: torch.Tensor,
    labels: dict[str, torch.Tensor],
    rows: np.ndarray,
    epochs: int,
    seed: int,
) -> Member:
    """``member`` trained on ``rows`` (label -1: unknown, no loss)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(
        [
            {"params": member.layers.parameters(), "lr": BODY_LR},
            {"params": member.heads.parameters(), "lr": HEAD_LR},
        ],
        weight_decay=WEIGHT_DECAY,
    )
    steps = epochs * -(-rows.size // BATCH)
    warm = max(1, int(0.06 * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, s / warm) * (steps - s) / steps
    )
    member.train()
    for _ in range(epochs):
        order = rng.permutation(rows)
        for i in range(0, order.size, BATCH):
            idx = order[i : i + BATCH]
            length = int(mask[idx].sum(1).max())
            out = member(states[idx, :length], mask[idx, :length])
            loss = torch.stack(
                [
                    nn.functional.cross_entropy(out[a], labels[a][idx], ignore_index=-1, label_smoothing=0.1)
                    for a in out
                ]
            ).sum()
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
    return member.eval()


def _probs(
    member: Member, states: torch.Tensor, mask: torch.Tensor, rows: np.ndarray
) -> dict[str, np.ndarray]:
    out: dict[str, list[np.ndarray]] = {a: [] for a in member.heads}
    with torch.inference_mode():
        for i in range(0, rows.size, 256):
            idx = rows[i : i + 256]
            length = int(mask[idx].sum(1).max())
            for a, logits in member(states[idx, :length], mask[idx, :length]).items():
                out[a].append(logits.softmax(-1).numpy())
    return {a: np.concatenate(v) for a, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="the hm-fashion folder")
    parser.add_argument("out", type=Path)
    parser.add_argument("--config", default="deploy/config/pretrained.yaml")
    parser.add_argument("--layers", type=int, default=2, help="top layers of the text model trained")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config)
    taxonomy = load_taxonomy(args.data / "taxonomy.yaml")
    table, test_rows, fold, labels = stack_folds(args.data, cfg, taxonomy)
    folds = int(fold.max()) + 1
    index = {a: torch.tensor(v) for a, v in labels.items()}
    started = time.perf_counter()
    states, mask, layers = _states(cfg, table, args.layers)
    print(f"hidden states of {table.num_rows} products: {time.perf_counter() - started:.0f} s", flush=True)
    sizes = {a.name: len(a.values) for a in taxonomy}
    probs = {a: np.zeros((table.num_rows, v), np.float32) for a, v in sizes.items()}
    fitted = []
    for k in range(folds):
        member = _fit(
            Member(layers, states.shape[-1], sizes),
            states,
            mask,
            index,
            np.flatnonzero((fold >= 0) & (fold != k)),
            args.epochs,
            k,
        )
        for a, p in _probs(member, states, mask, np.flatnonzero(fold == k)).items():
            probs[a][fold == k] = p
        fitted.append(member)
        print(f"fold {k}: {time.perf_counter() - started:.0f} s", flush=True)
    soup = Member(layers, states.shape[-1], sizes)
    soup.load_state_dict(
        {n: torch.stack([m.state_dict()[n] for m in fitted]).mean(0) for n in soup.state_dict()}
    )
    for a, p in _probs(soup.eval(), states, mask, test_rows).items():
        probs[a][test_rows] = p
    ids = table["product_id"].to_pylist()
    (args.out / "meta.json").write_text(json.dumps({"product_id": ids, "fold": fold.tolist()}))
    np.savez_compressed(
        args.out / "finetuned.npz", product_id=np.array(ids), **{f"ft_{a}": p for a, p in probs.items()}
    )
    print(f"{time.perf_counter() - started:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
