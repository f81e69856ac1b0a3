"""Encoders served by ONNX Runtime (``model.encoder_runtime: onnx``).

The transformers text backbone (token ids and mask to its last hidden state) and the timm image
backbone (normalised pixels to its feature map) are exported to ONNX; pooling, colour features,
fusion and heads stay in PyTorch. On CPU, ONNX Runtime runs these graphs several times faster than
eager PyTorch (``bench forward`` measures both on the machine at hand).

The thresholds of a model are computed on the scores of the runtime that serves it: with
``training.encoders: frozen`` the encoders never change, so training exports them before it embeds
a single product, and every score it selects and calibrates on comes from the exported graphs; the
bundle carries the same export (``onnx/``), and executors load it as it is. A GPU serves the
PyTorch encoders of the same weights.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.models.encoders import ImageEncoder, TextEncoder
from catalog_enrichment.types import Say

__all__ = ["OnnxGraph", "attach", "encoders", "export_encoders", "served_by_graphs"]

_OPSET = 17


class OnnxGraph:
    """One exported backbone in an ONNX Runtime session on CPU, called with torch tensors."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # as many threads as torch was given (a Spark task's share of the executor's cores)
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for a missing or broken graph
            raise CatalogEnrichError(f"cannot load the exported encoder {path}: {exc}") from None
        self.path = path
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        feeds = {name: np.ascontiguousarray(inputs[name].detach().cpu().numpy()) for name in self.inputs}
        out = torch.from_numpy(np.asarray(self.session.run(None, feeds)[0]))
        return out.to(inputs[self.inputs[0]].device)  # where the rest of the model runs (a GPU's training)


class _TextBackbone(nn.Module):
    def __init__(self, encoder: TextEncoder) -> None:
        super().__init__()
        self.backbone = encoder.backbone

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        names = ("input_ids", "attention_mask", "token_type_ids")
        return self.backbone(**dict(zip(names, args, strict=False))).last_hidden_state


class _ImageBackbone(nn.Module):
    def __init__(self, encoder: ImageEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encoder.backbone_output(pixel_values)


def encoders(model: nn.Module) -> Iterator[tuple[str, TextEncoder | ImageEncoder]]:
    """``(module name, encoder)`` of every text and image encoder of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, TextEncoder | ImageEncoder):
            yield name, module


def _export_one(encoder: TextEncoder | ImageEncoder, path: Path) -> None:
    wrapper: nn.Module
    if isinstance(encoder, TextEncoder):
        wrapper = _TextBackbone(encoder)
        names = ["input_ids", "attention_mask"] + (["token_type_ids"] if encoder.takes_token_types else [])
        # a padded second row, so that no masking is traced away as if every token were real
        mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
        example: tuple[torch.Tensor, ...] = (torch.ones(2, 8, dtype=torch.long), mask)
        if encoder.takes_token_types:
            example += (torch.zeros(2, 8, dtype=torch.long),)
        axes = {n: {0: "batch", 1: "tokens"} for n in names}
    else:
        wrapper = _ImageBackbone(encoder)
        names = ["pixel_values"]
        size = encoder.preprocessing.size
        example = (torch.zeros(2, 3, size, size),)
        axes = {"pixel_values": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's tracer warnings
        torch.onnx.export(
            wrapper.eval(),
            example,
            str(path),
            input_names=names,
            output_names=["features"],
            dynamic_axes={**axes, "features": {0: "batch"}},
            opset_version=_OPSET,
            dynamo=False,
        )


def export_encoders(model: nn.Module, folder: str | Path) -> Path:
    """Export every encoder of ``model`` (on CPU) into ``folder``, one ``<module name>.onnx`` each."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name, encoder in encoders(model):
        device = next(encoder.parameters()).device
        encoder.to("cpu")
        try:
            _export_one(encoder, out / f"{name}.onnx")
        finally:
            encoder.to(device)
    return out


def attach(model: nn.Module, folder: str | Path) -> None:
    """Serve every encoder of ``model`` (on CPU) from its graph in ``folder``."""
    for name, encoder in encoders(model):
        path = Path(folder) / f"{name}.onnx"
        if not path.is_file():
            raise CatalogEnrichError(f"model.encoder_runtime is onnx but {path} is missing")
        encoder.graph = OnnxGraph(path)


@contextlib.contextmanager
def served_by_graphs(model: nn.Module, say: Say) -> Iterator[None]:
    """While open, every encoder of ``model`` is served by its graph, exported into a temporary
    folder (training with ``training.encoders: frozen``: the scores it selects and calibrates on are
    those of the runtime that serves); afterwards by its PyTorch weights again."""
    say("model.encoder_runtime onnx: exporting the encoders")
    with tempfile.TemporaryDirectory() as folder:
        attach(model, export_encoders(model, folder))
        try:
            yield
        finally:
            for _, encoder in encoders(model):
                encoder.graph = None
