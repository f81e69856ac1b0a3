"""Full fine-tuning of EfficientNet-Lite0 on hm-fashion's training split, cross-fitted over the
stack's own folds (``export_hm.py``): out-of-fold probabilities for every training product and the
fold models' mean for every test product; beside it, a linear probe on the frozen network's pooled
features at the same input. Needs only torch, timm, numpy and Pillow (the GPU machine's image):

    python tools/gpu/finetune.py gpu/ --out $OUT --epochs 10           # on the GPU
    python tools/gpu/finetune.py gpu/ --out /tmp/x --smoke              # a few products, on a CPU

Writes ``<out>/finetuned.npz`` (``ft_<attribute>`` and ``lp_<attribute>``: ``(n, V)`` probabilities,
in ``product_id`` order) after every fold, and ``<out>/log.txt``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import os
import time
from multiprocessing import Pool
from pathlib import Path

with contextlib.suppress(ImportError):  # with this project: its fix for PyPI's CUDA torchvision
    import catalog_enrichment  # noqa: F401
import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

LR, WEIGHT_DECAY = 1e-3, 0.02  # AdamW; the backbone at half the heads' rate
T0 = time.time()


class Data:
    """The exported folder: photos decoded once into one uint8 tensor on the device, labels, folds."""

    def __init__(self, folder: Path, device: torch.device, smoke: bool) -> None:
        meta = json.loads((folder / "meta.json").read_text())
        blob, offsets = (folder / "images.bin").read_bytes(), meta["offsets"]
        n = 96 if smoke else len(meta["product_id"])
        photos = [blob[start:end] for start, end in itertools.pairwise(offsets[: n + 1])]
        # decoded before any CUDA tensor exists: a forked worker that unpickles one cannot start CUDA,
        # dies, and leaves the pool waiting for its chunk forever
        with Pool(min(16, os.cpu_count() or 1)) as pool:
            pixels = np.stack(pool.map(_decode, photos, chunksize=64))
        self.ids = meta["product_id"][:n]
        self.attrs = list(meta["values"])
        self.sizes = [len(meta["values"][a]) for a in self.attrs]
        self.labels = [torch.tensor(meta[a][:n], device=device) for a in self.attrs]
        self.fold = np.array(meta["fold"][:n])
        self.test = np.array(meta["test"][:n])
        if smoke:  # three folds of 32, one of them the "test" split
            self.fold, self.test = np.arange(n) % 3 - 1, np.arange(n) % 3 == 0
        self.pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().to(device)


def _decode(photo: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(photo)).convert("RGB"))


def log(out: Path, *parts: object) -> None:
    line = f"[{time.time() - T0:7.1f}s] " + " ".join(str(p) for p in parts)
    print(line, flush=True)
    with open(out / "log.txt", "a") as f:
        f.write(line + "\n")


def backbone(state: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and all(k.startswith("classifier") for k in unexpected), (missing, unexpected)
    return model.to(device).to(memory_format=torch.channels_last)


def pixels(data: Data, rows: torch.Tensor, train: bool) -> torch.Tensor:
    """[-1, 1] (the weights' scaling); in training a random flip, scale 0.85-1 and shift of 8 %:
    geometry only, never colour."""
    x = data.pixels[rows].float().div_(127.5).sub_(1.0)
    if train:
        b, dev = x.shape[0], x.device
        scale = torch.empty(b, device=dev).uniform_(0.85, 1.0)
        flip = torch.where(torch.rand(b, device=dev) < 0.5, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 1, 1] = scale * flip, scale
        theta[:, :, 2] = torch.empty(b, 2, device=dev).uniform_(-0.08, 0.08)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    return x.contiguous(memory_format=torch.channels_last)


class Net(nn.Module):
    def __init__(self, body: nn.Module, sizes: list[int]) -> None:
        super().__init__()
        self.body, self.drop = body, nn.Dropout(0.2)
        self.heads = nn.ModuleList(nn.Linear(1280, k) for k in sizes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.drop(self.body(x))
        return [head(features).float() for head in self.heads]


def fine_tune(data: Data, net: Net, rows: np.ndarray, epochs: int, batch_size: int, amp: dict) -> float:
    """AdamW with warm-up and a cosine schedule, one cross-entropy per attribute (label smoothing
    0.1); returns images per second."""
    heads = [p for n, p in net.named_parameters() if n.startswith("heads")]
    body = [p for n, p in net.named_parameters() if not n.startswith("heads")]
    opt = torch.optim.AdamW(
        [{"params": body, "lr": LR / 2}, {"params": heads, "lr": LR}], weight_decay=WEIGHT_DECAY
    )
    steps = epochs * (len(rows) // batch_size)
    warm = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))),
    )
    order_all = torch.as_tensor(rows, device=data.pixels.device)
    seen, start = 0, time.time()
    net.train()
    for _ in range(epochs):
        order = order_all[torch.randperm(len(order_all), device=order_all.device)]
        for s in range(0, len(order) - batch_size + 1, batch_size):
            batch = order[s : s + batch_size]
            with torch.autocast(**amp):
                logits = net(pixels(data, batch, True))
            loss = sum(
                F.cross_entropy(z, y[batch], ignore_index=-1, label_smoothing=0.1)
                for z, y in zip(logits, data.labels, strict=True)
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[union-attr]
            opt.step()
            schedule.step()
            seen += len(batch)
    if data.pixels.is_cuda:
        torch.cuda.synchronize()
    return seen / max(time.time() - start, 1e-9)


@torch.no_grad()
def predict(data: Data, net: Net, rows: np.ndarray, amp: dict) -> list[np.ndarray]:
    """Softmax probabilities, averaged with the horizontally flipped photo's."""
    net.eval()
    out: list[list[np.ndarray]] = [[] for _ in data.attrs]
    index = torch.as_tensor(rows, device=data.pixels.device)
    for s in range(0, len(index), 512):
        x = pixels(data, index[s : s + 512], False)
        with torch.autocast(**amp):
            a, b = net(x), net(torch.flip(x, dims=[3]))
        for k in range(len(data.attrs)):
            out[k].append(((a[k].softmax(1) + b[k].softmax(1)) / 2).cpu().numpy())
    return [np.concatenate(o) for o in out]


def linear_probe(
    features: torch.Tensor, y: torch.Tensor, fit: np.ndarray, held: list[np.ndarray], k: int
) -> list[np.ndarray]:
    """Multinomial logistic regression (L-BFGS, L2 1e-2) on features standardised over ``fit``."""
    mean, sd = features[fit].mean(0), features[fit].std(0) + 1e-6
    z = (features - mean) / sd
    keep = fit[(y[fit] >= 0).cpu().numpy()]
    w = torch.zeros(z.shape[1], k, device=z.device, requires_grad=True)
    b = torch.zeros(k, device=z.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, tolerance_grad=1e-5, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z[keep] @ w + b, y[keep]) + 1e-2 * (w * w).sum() / 2
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return [(z[h] @ w + b).softmax(1).cpu().numpy() for h in held]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="what export_hm.py wrote")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "finetune-out")))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="96 products, one epoch, batches of 16")
    args = parser.parse_args()
    batch_size = 16 if args.smoke else 128
    if args.smoke:
        args.epochs = 1
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = {"device_type": device.type, "dtype": torch.bfloat16, "enabled": device.type == "cuda"}
    data = Data(args.folder, device, args.smoke)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    log(
        args.out,
        "device",
        name,
        "torch",
        torch.__version__,
        "timm",
        timm.__version__,
        "photos",
        tuple(data.pixels.shape),
    )
    state = torch.load(args.folder / "image.pth", map_location="cpu")
    train, test = np.flatnonzero(~data.test), np.flatnonzero(data.test)
    folds = sorted(set(data.fold[train].tolist()))
    n = len(data.ids)
    probs = {
        f"{m}_{a}": np.zeros((n, k), np.float32)
        for m in ("ft", "lp")
        for a, k in zip(data.attrs, data.sizes, strict=True)
    }

    def save() -> None:
        np.savez_compressed(
            args.out / "finetuned.npz",
            product_id=np.array(data.ids),
            **{k: v.astype(np.float16) for k, v in probs.items()},
        )

    with torch.no_grad():  # the frozen network's pooled features, for the linear probe
        frozen = backbone(state, device).eval()
        chunks = []
        for s in range(0, n, 512):
            with torch.autocast(**amp):
                chunks.append(
                    frozen(pixels(data, torch.arange(s, min(n, s + 512), device=device), False)).float()
                )
        features = torch.cat(chunks)
    for k in folds:
        fit, held = train[data.fold[train] != k], train[data.fold[train] == k]
        for a, size, y in zip(data.attrs, data.sizes, data.labels, strict=True):
            oof, tested = linear_probe(features, y, fit, [held, test], size)
            probs[f"lp_{a}"][held] = oof
            probs[f"lp_{a}"][test] += tested / len(folds)
    log(args.out, "linear probe on the frozen pooled features: done")
    for k in folds:
        fit, held = train[data.fold[train] != k], train[data.fold[train] == k]
        start = time.time()
        torch.manual_seed(1 + k)
        net = Net(backbone(state, device), data.sizes).to(device)
        rate = fine_tune(data, net, fit, args.epochs, batch_size, amp)
        oof, tested = predict(data, net, held, amp), predict(data, net, test, amp)
        accuracy = []
        for j, a in enumerate(data.attrs):
            probs[f"ft_{a}"][held] = oof[j]
            probs[f"ft_{a}"][test] += tested[j] / len(folds)
            y = data.labels[j][held].cpu().numpy()
            accuracy.append(f"{a} {np.mean(oof[j][y >= 0].argmax(1) == y[y >= 0]):.3f}")
        save()
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
        log(
            args.out,
            f"fold {k}: {len(fit)} fit, {len(held)} held out, {args.epochs} epochs, {rate:.0f} images/s, "
            f"{time.time() - start:.0f} s, peak {peak:.1f} GiB; out-of-fold top-1 " + ", ".join(accuracy),
        )
    log(args.out, "done")


if __name__ == "__main__":
    main()
