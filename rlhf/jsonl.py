"""Read a JSON-lines file (``metrics.jsonl``, ``samples.jsonl``) the way a run may have left it.

A run killed mid-write leaves its last line cut; that line is dropped. A damaged line anywhere else
means the file was edited or corrupted, and is an error naming the file and line. Standard library
only, so the report and the notebook can import it without torch.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_rows(path: Path | str) -> list[dict]:
    """The JSON objects of ``path``, one per non-blank line; a cut last line is dropped."""
    path = Path(path)
    lines = path.read_text().splitlines()
    numbered = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    rows = []
    for i, (number, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(numbered) - 1:
                break  # the write a kill interrupted
            raise ValueError(
                f"{path}: line {number} is not valid JSON ({err.msg}); only the last line may be cut"
            ) from err
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {number} is a {type(row).__name__}, expected a JSON object")
        rows.append(row)
    return rows
