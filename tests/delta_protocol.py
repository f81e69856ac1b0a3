"""Delta tables with reader features delta-rs cannot write, built by hand the way other writers
(Spark, Databricks) write them, following the Delta protocol: an inline deletion vector is the Z85
text of a magic number and a 64-bit "portable" Roaring bitmap of the deleted row indexes."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from deltalake import DeltaTable, TableFeatures

__all__ = ["delete_with_deletion_vector"]

_Z85 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
_DV_MAGIC = 1681511377
_ROARING_NO_RUNS = 12346


def _z85(data: bytes) -> str:
    out = []
    for i in range(0, len(data), 4):
        word, chars = int.from_bytes(data[i : i + 4], "big"), []
        for _ in range(5):
            word, digit = divmod(word, 85)
            chars.append(_Z85[digit])
        out.append("".join(reversed(chars)))
    return "".join(out)


def _bitmap(rows: list[int]) -> bytes:
    """One Roaring array container (rows < 65,536) in a one-bucket 64-bit treemap, with the magic."""
    rows = sorted(set(rows))
    assert rows and rows[-1] < 65536
    roaring = (
        struct.pack("<II", _ROARING_NO_RUNS, 1)
        + struct.pack("<HH", 0, len(rows) - 1)
        + struct.pack("<I", 16)  # offset of the container's data
        + b"".join(struct.pack("<H", r) for r in rows)
    )
    return struct.pack("<i", _DV_MAGIC) + struct.pack("<q", 1) + struct.pack("<i", 0) + roaring


def delete_with_deletion_vector(path: Path, rows: list[int]) -> None:
    """Delete ``rows`` (row indexes) of the table's only data file with an inline deletion vector
    (the table gets the ``deletionVectors`` reader feature), as one new commit."""
    table = DeltaTable(str(path))
    table.alter.add_feature(TableFeatures.DeletionVectors, allow_protocol_versions_increase=True)
    table = DeltaTable(str(path))
    (add,) = [
        json.loads(line)["add"]
        for entry in sorted((path / "_delta_log").glob("*.json"))
        for line in entry.read_text().splitlines()
        if '"add"' in line
    ]
    data = _bitmap(rows)
    dv = {
        "storageType": "i",
        "pathOrInlineDv": _z85(data + b"\0" * (-len(data) % 4)),
        "sizeInBytes": len(data),
        "cardinality": len(set(rows)),
    }
    now = int(time.time() * 1000)
    remove = {"path": add["path"], "deletionTimestamp": now, "dataChange": True, "size": add["size"]}
    commit = [
        {"commitInfo": {"timestamp": now, "operation": "DELETE"}},
        {"remove": remove},
        {"add": {**add, "deletionVector": dv, "dataChange": True}},
    ]
    log = path / "_delta_log" / f"{table.version() + 1:020d}.json"
    log.write_text("".join(json.dumps(action) + "\n" for action in commit))
