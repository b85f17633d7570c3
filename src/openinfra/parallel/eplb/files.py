"""Reading loads (JSON / CSV) and reading / writing plans (JSON) for the CLI and for users."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

__all__ = ["read_loads", "read_plan", "write_plan"]


def _matrix(rows: object, source: str) -> torch.Tensor:
    if isinstance(rows, list) and rows and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rows):
        rows = [rows]  # one layer
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
        raise ValueError(f"{source}: expected a list of layers, each a list of per-expert loads")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise ValueError(f"{source}: every layer must list the same number of experts, got {sorted(widths)}")
    for i, r in enumerate(rows):
        for j, v in enumerate(r):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{source}: load at [layer {i}, expert {j}] is not a number: {v!r}")
    return torch.tensor(rows, dtype=torch.float64)


def read_loads(path: str | Path) -> torch.Tensor:
    """Loads [layers, experts] float64 from ``.json`` (a list of lists, one list, or an object
    with a ``"loads"`` / ``"weight"`` key) or ``.csv`` (one layer per row; a header row and
    blank lines are skipped)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() == ".csv":
        rows = []
        for lineno, row in enumerate(csv.reader(text.splitlines()), 1):
            cells = [c.strip() for c in row if c.strip() != ""]
            if not cells:
                continue
            try:
                rows.append([float(c) for c in cells])
            except ValueError:
                if rows:
                    raise ValueError(f"{path}:{lineno}: not a number in {cells}") from None
                continue  # header
        return _matrix(rows, str(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, dict):
        for key in ("loads", "weight", "weights"):
            if key in data:
                data = data[key]
                break
        else:
            raise ValueError(f"{path}: a JSON object needs a 'loads' key")
    return _matrix(data, str(path))


def read_plan(path: str | Path) -> torch.Tensor:
    """phy2log [layers, replicas] int64 from a plan written by :func:`write_plan` (or a bare list of lists)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, dict):
        if "phy2log" not in data:
            raise ValueError(f"{path}: a plan needs a 'phy2log' key")
        data = data["phy2log"]
    if not isinstance(data, list) or not data or not all(isinstance(r, list) for r in data):
        raise ValueError(f"{path}: phy2log must be a list of layers, each a list of expert ids")
    if not all(isinstance(v, int) and not isinstance(v, bool) for r in data for v in r):
        raise ValueError(f"{path}: phy2log entries must be integer expert ids")
    if len({len(r) for r in data}) != 1:
        raise ValueError(f"{path}: every layer of phy2log must have the same number of slots")
    return torch.tensor(data, dtype=torch.int64)


def write_plan(path: str | Path, phy2log: torch.Tensor, **meta: object) -> None:
    """Write ``{"phy2log": [[...]], **meta}`` as JSON (the format ``--previous`` reads)."""
    Path(path).write_text(json.dumps({"phy2log": phy2log.tolist(), **meta}) + "\n")
