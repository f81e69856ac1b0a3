"""The GPU check of the scoring path: one stack bundle scores the same hm-fashion products on a CUDA
device as on the CPU's production path (ONNX encoders), every decision compared; throughput and
where a batch's time goes. The bundle is the recommended configuration's (EfficientNet-Lite0 with
stage pooling and colour statistics, n-grams, stack) with a one-layer text encoder in MiniLM's
place, whose 88 MB would not travel to the GPU machine. The GPU machine needs the Pillow the bundle
was trained with (carried as a wheel where its own differs): another decodes the photos to other
pixels, and the bundle refuses it (``catalog_enrichment.data.decoding``).

    python tools/gpu/check.py prepare ../shared/data/hm-fashion gpucheck/   # here: train, export
    python tools/gpu/check.py score gpucheck/ --device cpu --out cpu/      # here: the reference
    python tools/gpu/check.py score gpucheck/ --device cuda --out $OUT     # there (src on the path)
    python tools/gpu/check.py compare gpucheck/ cpu/cpu.npz $OUT/cuda_fp32.npz ...
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))  # on the GPU machine: not installed

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import catalog_enrichment  # noqa: F401  (its torchvision fix first)
from catalog_enrichment.data.decoding import decoder_versions
from catalog_enrichment.inference.bundle import load_bundle
from catalog_enrichment.inference.predictor import BatchPredictor, PredictorOptions, column_values
from catalog_enrichment.metrics import decision_matrix
from catalog_enrichment.models.model import full_float32

TRAIN_PRODUCTS, CHECK_PRODUCTS = 1500, 400
VARIANT_PRODUCTS = (
    128  # encoder_variants' products: 15 MB of features, under the 16 MiB a file may bring back
)
# (name, bf16 autocast, batch size) of each CUDA run; the CPU runs the production default
RUNS = {"cpu": [("cpu", False, 128)], "cuda": [("cuda_fp32", False, 128), ("cuda_bf16", True, 128)]}


def prepare(data: Path, out: Path) -> None:
    """Train the check's bundle on hm-fashion's first training products; keep it (the ONNX graphs
    aside: a GPU serves the torch weights) and the first test products."""
    import yaml
    from transformers import BertConfig, BertModel

    from catalog_enrichment.catalog.lakehouse import read_table
    from catalog_enrichment.config import load_config
    from catalog_enrichment.contracts import load_taxonomy
    from catalog_enrichment.inference.bundle import save_bundle
    from catalog_enrichment.training.pipeline import train

    work = Path(tempfile.mkdtemp())
    pretrained = Path("deploy/config/pretrained.yaml")
    cfg_yaml = yaml.safe_load(pretrained.read_text())
    minilm = (pretrained.parent / cfg_yaml["model"]["text"]["pretrained_path"]).resolve()
    torch.manual_seed(0)
    small = BertConfig(
        vocab_size=BertConfig.from_pretrained(minilm).vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    BertModel(small).save_pretrained(work / "text")
    for f in minilm.glob("*token*"):
        shutil.copy(f, work / "text")
    cfg_yaml["model"]["text"]["pretrained_path"] = str(work / "text")
    cfg_yaml["model"]["image"]["pretrained_path"] = str(
        (pretrained.parent / cfg_yaml["model"]["image"]["pretrained_path"]).resolve()
    )
    cfg_yaml["mlflow"] = {"tracking_uri": f"sqlite:///{work}/mlflow.db"}
    (work / "config.yaml").write_text(yaml.safe_dump(cfg_yaml))
    cfg = load_config(work / "config.yaml")
    taxonomy = load_taxonomy(data / "taxonomy.yaml")
    trained = train(
        read_table(str(data / "train.parquet")).slice(0, TRAIN_PRODUCTS), taxonomy, cfg, progress=print
    )
    out.mkdir(parents=True, exist_ok=True)
    save_bundle(out / "bundle-cpu", trained.bundle())
    shutil.copytree(out / "bundle-cpu", out / "bundle", ignore=shutil.ignore_patterns("onnx"))
    pq.write_table(pq.read_table(data / "test.parquet").slice(0, CHECK_PRODUCTS), out / "products.parquet")


def score(folder: Path, device: str, out: Path) -> None:
    """Each run's scores of the check's products (``<out>/<run>.npz``), its products per second over
    20 copies of them, and one batch at a time unpipelined: seconds per 1,000 products preparing
    (decode, resize, tokenize) against the forward pass (copy to the device, encoders, heads)."""
    out.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(folder / "products.parquet")
    many = pa.concat_tables([table] * 20)
    bundle_path = folder / ("bundle-cpu" if device == "cpu" else "bundle")

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    report: dict[str, object] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "decoders": decoder_versions(),  # another Pillow's pixels: the bundle refuses to load
    }
    for name, autocast, batch_size in RUNS[device]:
        options = PredictorOptions(batch_size=batch_size, autocast=autocast, decode_threads=8)
        predictor = BatchPredictor(load_bundle(bundle_path, device=device), options, device=device)
        np.savez(out / f"{name}.npz", **predictor.score(table))
        np.savez(out / f"{name}_stages.npz", **stages(predictor, table))
        if name == RUNS[device][0][0]:
            np.savez(
                out / f"{device}_variants.npz",
                **encoder_variants(predictor, table.slice(0, VARIANT_PRODUCTS), device),
            )
        timed = many if device == "cuda" else table
        sync()
        start = time.perf_counter()
        predictor.score(timed)
        sync()
        entry: dict[str, float] = {"products_per_s": round(timed.num_rows / (time.perf_counter() - start), 1)}
        cols = [column_values(timed, c) for c in ("title", "description", "image", "image_uri", "category")]
        preparing = forward = 0.0
        for s in range(0, timed.num_rows, batch_size):
            t0 = time.perf_counter()
            batch = predictor.prepare(
                *(c[s : s + batch_size] for c in cols[:4]), categories=cols[4][s : s + batch_size]
            )
            t1 = time.perf_counter()
            predictor.forward(batch)
            sync()
            preparing, forward = preparing + t1 - t0, forward + time.perf_counter() - t1
        entry |= {
            "prepare_s_per_1000": round(preparing * 1000 / timed.num_rows, 3),
            "forward_s_per_1000": round(forward * 1000 / timed.num_rows, 3),
        }
        predictor.close()
        report[name] = entry
        print(name, entry, flush=True)
    (out / f"report_{device}.json").write_text(json.dumps(report, indent=1))


@torch.inference_mode()
def stages(predictor: BatchPredictor, table: pa.Table) -> dict[str, np.ndarray]:
    """What each stage of the stack bundle computed for ``table``: the encoders' pooled vectors (the
    image's split as the stack's blocks read it: CNN stages, colour statistics, close-up) and each
    block's linear scores, so that a difference between two devices can be traced to the stage it
    starts at."""
    model = predictor.bundle.model
    parts: dict[str, list[np.ndarray]] = {}
    for batch in predictor.prepared(table):
        with full_float32():  # as the predictor's forward pass
            x = model.encode({k: v.to(predictor.device) for k, v in batch.inputs.items()})
            image = {f"pooled_{k}": v for k, v in model.fusion.image_blocks(x.image_pooled).items()}
            found = {"text_pooled": x.text_pooled} | image
            found |= {f"block_{k}": v for k, v in model.fusion.block_logits(x).items()}
        for k, v in found.items():
            parts.setdefault(k, []).append(v.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


@torch.inference_mode()
def encoder_variants(predictor: BatchPredictor, table: pa.Table, device: str) -> dict[str, np.ndarray]:
    """The image backbone's pooled stage features (whole photo and close-up; the colour statistics
    are in the stages) of ``table``'s products, computed from the torch weights in float32 as served,
    in float64, and on CUDA in float32 with cuDNN off: a device's float32 rounding tells itself from
    a computation of its own by whether the float64 runs of two devices agree."""
    encoder = predictor.bundle.model.image_encoder
    graph, encoder.graph = encoder.graph, None  # the torch weights, not an exported graph
    try:
        return _variants(predictor, encoder, table, device)
    finally:
        encoder.graph = graph


def _variants(predictor: BatchPredictor, encoder: Any, table: pa.Table, device: str) -> dict[str, np.ndarray]:
    import copy

    runs = {
        "float32": (encoder, torch.float32, True),
        "float64": (copy.deepcopy(encoder).double(), torch.float64, True),
    }
    if device == "cuda":
        runs["float32_no_cudnn"] = (encoder, torch.float32, False)
    parts: dict[str, list[np.ndarray]] = {}
    for batch in predictor.prepared(table):
        raw = batch.inputs["pixel_values"].to(predictor.device)
        for name, (model, dtype, cudnn) in runs.items():
            torch.backends.cudnn.enabled = cudnn
            try:
                with full_float32():
                    # as the encoder's forward: uint8 pixels (sent to a GPU) normalised there
                    x = model.preprocessing.normalize(raw) if raw.dtype == torch.uint8 else raw
                    x = x.to(dtype)
                    feats = model._with_close_up(x) if model.cfg.close_up else model._run(x)
            finally:
                torch.backends.cudnn.enabled = True
            parts.setdefault(name, []).append(feats.cpu().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def compare(folder: Path, reference: Path, others: list[Path]) -> None:
    """Per run and attribute: the largest score difference from the reference, values written by
    each, and products whose decision differs; then per stage (``<run>_stages.npz`` beside each) the
    largest difference relative to the reference's spread across products; and where
    ``cpu_variants.npz`` and ``cuda_variants.npz`` lie beside them, how far the image backbone's
    features part between the devices and precisions (:func:`encoder_variants`)."""
    bundle = load_bundle(folder / "bundle-cpu")
    ref = np.load(reference)
    ref_stages = reference.with_name(f"{reference.stem}_stages.npz")
    for path in others:
        run = np.load(path)
        run_stages = path.with_name(f"{path.stem}_stages.npz")
        if ref_stages.exists() and run_stages.exists():
            a, b = np.load(ref_stages), np.load(run_stages)
            for k in a.files:
                gap = np.abs(a[k] - b[k]).max() / (a[k].std(axis=0).mean() + 1e-12)
                print(f"{path.stem:10s} stage {k:14s} max |difference| / spread {gap:.2e}")
        ref_variants, run_variants = (
            reference.with_name("cpu_variants.npz"),
            path.with_name("cuda_variants.npz"),
        )
        if ref_variants.exists() and run_variants.exists():
            _variant_lines(bundle, np.load(ref_variants), np.load(run_variants))
        for attr in bundle.taxonomy:
            thresholds = bundle.calibration.thresholds(attr.name)
            a, b = (decision_matrix(s[attr.name], attr.kind, thresholds) for s in (ref, run))
            gap = np.abs(ref[attr.name] - run[attr.name]).max()
            print(
                f"{path.stem:10s} {attr.name:13s} max |score difference| {gap:.2e}, "
                f"written {a.sum()} / {b.sum()}, products decided differently {(a != b).any(axis=1).sum()}"
            )


def _variant_lines(bundle: Any, cpu: Any, cuda: Any) -> None:
    """Per pair of encoder variants (``encoder_variants``) and stack block reading the backbone: the
    largest feature difference in the block's standard deviations, and the largest block score
    difference it makes (through the block's standardisation and weights)."""
    fusion = bundle.model.fusion
    whole = fusion.dims["image"]
    pairs = [(("cpu", "float32"), ("cpu", "float64")), (("cpu", "float64"), ("cuda", "float64"))]
    pairs += [(("cpu", "float64"), ("cuda", k)) for k in ("float32", "float32_no_cudnn")]
    found = {"cpu": cpu, "cuda": cuda}
    for (d1, v1), (d2, v2) in pairs:
        if v1 not in found[d1].files or v2 not in found[d2].files:
            continue
        gap = found[d1][v1] - found[d2][v2]
        for block, part in (("image", gap[:, :whole]), ("close_up", gap[:, whole:])):
            if not part.shape[1]:
                continue
            scale = getattr(fusion, f"{block}_scale").double().numpy()
            standard = part / scale  # the block's standardisation (its width's root included)
            logits = standard @ getattr(fusion, f"{block}_weight").double().numpy()
            sd = scale / np.sqrt(part.shape[1])
            worst = np.unravel_index(np.abs(part / sd).argmax(), part.shape)
            print(
                f"{d1} {v1} vs {d2} {v2}, {block}: max |difference| {np.abs(part).max():.2e} = "
                f"{np.abs(part / sd).max():.2e} SDs (feature {worst[1]}, its SD {sd[worst[1]]:.2e}); "
                f"max |block score difference| {np.abs(logits).max():.2e}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("data", type=Path)
    p.add_argument("out", type=Path)
    s = sub.add_parser("score")
    s.add_argument("folder", type=Path)
    s.add_argument("--device", choices=["cpu", "cuda"], required=True)
    s.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("compare")
    c.add_argument("folder", type=Path)
    c.add_argument("reference", type=Path)
    c.add_argument("others", type=Path, nargs="+")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.data, args.out)
    elif args.command == "score":
        score(args.folder, args.device, args.out)
    else:
        compare(args.folder, args.reference, args.others)


if __name__ == "__main__":
    main()
