"""The torchvision CPU/CUDA import problem is handled wherever the package is imported."""

from __future__ import annotations

import subprocess
import sys

import pytest

# each test starts a fresh interpreter that imports torch: not the fast tier
pytestmark = pytest.mark.slow

_PROBE = (
    "import catalog_enrichment, sys; "
    "assert 'torch' not in sys.modules, 'importing the package must not import torch'; "
    "import timm; from transformers import BertModel; "
    "m = timm.create_model('resnet18', pretrained=False, num_classes=0); "
    "print('ok', m.num_features)"
)


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)


@pytest.mark.timeout(300)
def test_timm_and_transformers_import_in_a_fresh_process_after_the_package() -> None:
    result = _run(_PROBE)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok 512"


@pytest.mark.timeout(300)
def test_fix_is_needed_here_or_torchvision_works_alone() -> None:
    """Documents the problem: without the package, torchvision either imports (a matching build)
    or fails with the known error; it never fails in some other way we would be hiding."""
    result = _run("import torchvision")
    if result.returncode != 0:
        assert "torchvision::nms does not exist" in result.stderr


@pytest.mark.timeout(300)
def test_torchvisions_own_library_is_tried_first_and_loads_exactly_where_torchvision_imports_alone() -> None:
    """Here (a CUDA torchvision beside a CPU torch) its library does not load and the schemas are
    defined; where torchvision imports on its own its library loads, and nothing is defined."""
    alone = _run("import torchvision").returncode == 0
    result = _run(
        "import catalog_enrichment; from catalog_enrichment import _compat; "
        "print(_compat._load_torchvision_ops())"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(alone)


@pytest.mark.timeout(300)
def test_no_schema_is_defined_beside_a_torchvision_library_that_loads() -> None:
    """A matching torchvision build (the GPU machine's) registers its ops when its library loads:
    a schema defined before it aborted the process ("registered ... multiple times")."""
    code = (
        "import torch, catalog_enrichment; from catalog_enrichment import _compat\n"
        "def loads():  # what loading a matching build's library does\n"
        "    loads.lib = torch.library.Library('torchvision', 'DEF')\n"
        "    for schema in _compat._SCHEMAS.values():\n"
        "        loads.lib.define(schema)\n"
        "    return True\n"
        "_compat._load_torchvision_ops = loads\n"
        "_compat.ensure_torchvision_importable()\n"
        "print(_compat._LIBRARY is None, _compat._has_op('nms'))\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "True True"


@pytest.mark.timeout(300)
def test_fix_is_a_no_op_when_torchvision_is_already_imported() -> None:
    code = (
        "import catalog_enrichment, timm; from catalog_enrichment import _compat; "
        "_compat.install_import_hook(); _compat.ensure_torchvision_importable(); "
        "import torchvision; print('ok')"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.spark
@pytest.mark.timeout(300)
def test_timm_imports_inside_a_spark_python_worker(spark) -> None:  # type: ignore[no-untyped-def]
    """Spark workers import the package to unpickle the function; that alone must fix timm."""
    from catalog_enrichment.data.render import COLOR_RGB  # noqa: F401  (package on the worker path)

    def probe(batches):  # type: ignore[no-untyped-def]
        import importlib
        import os

        import pandas as pd

        import catalog_enrichment  # noqa: F401  (first, as the unpickled UDFs of the job do)

        timm = importlib.import_module("timm")  # not a plain import: isort would hoist it above
        for _ in batches:
            yield pd.DataFrame(
                {
                    "pid": [os.getpid()],
                    "features": [timm.create_model("resnet18", pretrained=False, num_classes=0).num_features],
                }
            )

    rows = spark.range(2, numPartitions=2).mapInPandas(probe, "pid long, features long").collect()
    assert [r.features for r in rows] == [512, 512]
    import os

    assert all(r.pid != os.getpid() for r in rows), "the probe must run in a Python worker"
