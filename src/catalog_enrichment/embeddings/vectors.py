"""A product's encoder outputs as one stored vector, and the fingerprint of the encoders behind it.

With frozen encoders only the fusion and heads differ between two model versions, so what the
encoders made of a product can be kept (the catalog's embedding store) and fused again by any
version whose encoders are the same. Two facts make that safe:

* :func:`encoder_fingerprint` hashes everything that shapes the encoders' outputs - their weights,
  architecture names and timm arguments, the tokenizer, the text length and pooling, the image
  preprocessing, pooling and colour features, the pixels the image decoder makes of reference
  photos (:mod:`catalog_enrichment.data.decoding`), which outputs the fusion reads, and the runtime
  that runs them (``model.encoder_runtime``) - so a stored vector is only ever read back by
  encoders that would compute it again;
* :func:`pack` / :func:`unpack` turn the pooled outputs the fusion reads (``text_pooled``,
  ``image_pooled``, ``image_present``) into one float32 row and back, bit for bit, so scores fused
  from the store equal scores of a fresh encode.

Only a single model whose fusion reads pooled vectors can use the store (:func:`storable`): a
fusion over token sequences (``cross_attention``) or per-field encodings (``hierarchical``) would
need hundreds of vectors per product, and an ensemble's members have encoders of their own.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from catalog_enrichment.data.decoding import current_digest
from catalog_enrichment.models.color import COLOR_VERSION
from catalog_enrichment.models.fusion import FusionInputs
from catalog_enrichment.models.model import AnyModel, MultimodalModel

__all__ = ["content_digest", "encoder_fingerprint", "pack", "storable", "unpack", "width"]


def storable(model: AnyModel) -> bool:
    """Whether ``model``'s encoder outputs fit the store (one model, fusion over pooled vectors)."""
    return isinstance(model, MultimodalModel) and not (model.fusion.needs_tokens or model.fusion.needs_fields)


def _dims(model: MultimodalModel) -> tuple[int, int]:
    fusion = model.fusion
    return (fusion.text_dim if fusion.needs_text else 0, fusion.image_dim if fusion.needs_image else 0)


def width(model: MultimodalModel) -> int:
    """Float32 values per stored vector: text, image, and the image-present flag."""
    text, image = _dims(model)
    return text + image + 1


def encoder_fingerprint(model: MultimodalModel, tokenizer: Any, max_length: int) -> str:
    """Hash of everything that shapes the encoders' outputs (see the module docstring)."""
    h = hashlib.sha256()
    fusion = model.fusion
    needs = (fusion.needs_text, fusion.needs_image, fusion.needs_tokens, fusion.needs_fields)
    colour = COLOR_VERSION if model.cfg.image.color_features else None
    image = model.cfg.image
    # the architecture's name and its timm arguments (global_pool, output_stride) change the outputs
    # of the same weights; the drop rates act in training only
    shaping = sorted((k, v) for k, v in image.timm_kwargs.items() if not k.startswith("drop"))
    image_prep = (model.preprocessing.to_dict(), colour, image.pooling, image.name, shaping)
    text = (model.cfg.text.model_type, model.cfg.text.pooling)
    h.update(repr((needs, max_length, text, image_prep, _dims(model))).encode())
    if model.cfg.encoder_runtime != "torch":  # another runtime's vectors differ in the last bits
        h.update(model.cfg.encoder_runtime.encode())
    if fusion.needs_image:  # another decoder's pixels (data.decoding) give other vectors
        prep = model.preprocessing
        h.update(current_digest(prep.decode_size, prep.interpolation, prep.decode).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(
        (backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode()
    )
    for name, tensor in model.state_dict().items():
        if name.startswith(("text_encoders.", "image_encoder.")):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def content_digest(title: Any, description: Any, image: Any, uri: Any, *, text: bool, images: bool) -> str:
    """Digest of what the encoders read of one product: its texts (``text``) and its image bytes
    and URI (``images``); each value length-prefixed, so no two inputs share a digest by accident."""
    h = hashlib.blake2b(digest_size=16)
    for value, used in ((title, text), (description, text), (image, images), (uri, images)):
        if not used:
            continue
        raw = value.encode() if isinstance(value, str) else value if isinstance(value, bytes) else None
        h.update(b"\0" if raw is None else b"\1" + len(raw).to_bytes(8, "little") + raw)
    return h.hexdigest()


def pack(model: MultimodalModel, inputs: FusionInputs) -> np.ndarray:
    """``(B, width)`` float32: the pooled outputs the fusion reads, side by side."""
    text, image = _dims(model)
    parts = []
    if text:
        assert inputs.text_pooled is not None
        parts.append(inputs.text_pooled)
    if image:
        assert inputs.image_pooled is not None
        parts.append(inputs.image_pooled)
    parts.append(inputs.image_present[:, None])
    return torch.cat([p.float() for p in parts], dim=1).cpu().numpy()


def unpack(model: MultimodalModel, rows: np.ndarray, device: torch.device | str = "cpu") -> FusionInputs:
    """The fusion's inputs from ``(B, width)`` packed rows."""
    text, image = _dims(model)
    matrix = torch.from_numpy(np.ascontiguousarray(rows, np.float32)).to(device)
    return FusionInputs(
        image_present=matrix[:, text + image],
        text_pooled=matrix[:, :text] if text else None,
        image_pooled=matrix[:, text : text + image] if image else None,
    )
