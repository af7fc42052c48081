"""Read a JSON-lines file (``metrics.jsonl``, ``samples.jsonl``) the way a run may have left it: the
one reader of the tracker (resume), the report and the notebook.

A run killed mid-write leaves its last line cut; that line is dropped. A damaged line anywhere else
means the file was edited or corrupted: an error naming the file and the line, raised before any
caller changes anything (rows after it would otherwise be lost). Standard library only, so the
report and the notebook can import it without torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_rows(path: Path | str, *, required_key: str | None = None) -> list[dict[str, Any]]:
    """The JSON objects of ``path``, one per non-blank line (none if the file does not exist); with
    ``required_key`` each must hold it as an integer (``step``). A cut last line is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    numbered = [(number, line) for number, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
    rows = []
    for i, (number, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(numbered) - 1:
                break  # the write a kill interrupted (a cut object never parses)
            row = None
        if not isinstance(row, dict) or (required_key and not isinstance(row.get(required_key), int)):
            wanted = f"JSON object with a {required_key!r}" if required_key else "JSON object"
            raise ValueError(
                f"{path} line {number} of {len(numbered)} is not a {wanted}: {line[:80]!r}; only the last line "
                "may be cut (by a kill): repair or delete that line"
            )
        rows.append(row)
    return rows
