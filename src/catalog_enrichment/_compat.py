"""Environment fixes that must run before torchvision (and so timm / transformers) is imported.

PyPI's torchvision is a CUDA build. Next to a CPU-only torch its C++ ops are missing, and
``import torchvision`` fails while registering fake kernels for ``torchvision::nms``
("operator torchvision::nms does not exist"), which also breaks ``import timm`` and transformers'
model imports. Defining the two missing operator schemas first lets the import succeed; nothing
here uses those ops. torchvision's own library is tried first, as ``import torchvision`` would load
it: where it loads (a matching CPU or CUDA build, as on a GPU machine) its ops exist and nothing is
defined - a schema defined beside it makes its registration abort the process.

The package ``__init__`` imports this module first, so the driver, Spark Python workers (which
import the package to unpickle the UDF) and MLflow's fresh model-loading processes all get it. To
keep ``import catalog_enrichment`` cheap (the CLI's light commands never touch torch), the fix is
applied by an import hook the moment something first imports torchvision, not at package import.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType

__all__ = ["ensure_torchvision_importable", "install_import_hook"]

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARY: object | None = None  # keeps the torch.library.Library alive for the process


def _has_op(name: str) -> bool:
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
    except RuntimeError:
        return False
    return True


def _load_torchvision_ops() -> bool:
    """Load torchvision's compiled ops as ``import torchvision`` would (``torchvision.extension``);
    False where they do not load (a CUDA build beside a CPU-only torch). They must be tried first:
    schemas defined here beside a library that does load make that library's own registration
    abort the process ("registered ... multiple times")."""
    import importlib.util

    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    for folder in spec.submodule_search_locations:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            library = os.path.join(folder, "_C" + suffix)
            if os.path.exists(library):
                try:
                    torch.ops.load_library(library)
                except (OSError, RuntimeError):
                    return False
                return all(_has_op(name) for name in _SCHEMAS)
    return False


def ensure_torchvision_importable() -> None:
    """Define ``torchvision::nms``/``qnms`` schemas when torchvision's library did not."""
    global _LIBRARY
    if _LIBRARY is not None or os.environ.get("CATALOG_ENRICH_NO_TORCHVISION_FIX"):
        return
    try:
        import torch
    except ImportError:  # torch absent: nothing can break
        return
    if _load_torchvision_ops():
        return
    missing = [name for name in _SCHEMAS if not _has_op(name)]
    if not missing:
        return
    lib = torch.library.Library("torchvision", "DEF")
    for name in missing:
        lib.define(_SCHEMAS[name])
    _LIBRARY = lib


class _TorchvisionHook(importlib.abc.MetaPathFinder):
    """Applies the fix just before the first ``import torchvision``; never finds a module itself."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            ensure_torchvision_importable()
        return None


def install_import_hook() -> None:
    """Arrange for :func:`ensure_torchvision_importable` to run before torchvision loads."""
    if "torchvision" in sys.modules or any(isinstance(f, _TorchvisionHook) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionHook())


install_import_hook()
