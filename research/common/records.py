"""Run records: the one writer for run folders (resolved config, metrics, summary, figures).

Everything a run writes goes through here so that the guarantees hold everywhere:
- whole files (config.json, summary.json, figures) are written to a temporary name in the same
  folder and renamed, so a killed run never leaves a half-written file under the final name;
- metrics are JSON lines appended one whole line per write and flushed; a reader skips a final
  line that a kill cut short (`read_metrics`).
This module does I/O by design; it has no clocks and no jax import.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np


def to_jsonable(value: Any) -> Any:
  """Converts numpy/jax scalars and arrays, tuples and mappings into plain JSON values.

  Non-finite floats become the strings "nan", "inf", "-inf" so the output stays strict JSON.
  """
  if isinstance(value, Mapping):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if isinstance(value, (str, bool)) or value is None:
    return value
  if isinstance(value, int):
    return value
  if hasattr(value, "__array__") or isinstance(value, np.generic):
    array = np.asarray(value)
    if array.ndim == 0:
      return to_jsonable(array.item())
    return to_jsonable(array.tolist())
  if isinstance(value, float):
    if math.isfinite(value):
      return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
  if isinstance(value, os.PathLike):
    return os.fspath(value)
  raise TypeError(f"cannot record value of type {type(value).__name__}: {value!r}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
  """Hex sha256 of a file, read in chunks (files of any size)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(chunk), b""):
      digest.update(block)
  return digest.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> Path:
  """Writes `data` to `path` via a temporary file in the same folder and an atomic rename;
  `mode` (e.g. 0o600 for a key) is set before any byte is written."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    if mode is not None:
      os.fchmod(fd, mode)
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
  return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
  return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n")


def atomic_save_npz(path: str | os.PathLike, **arrays: Any) -> Path:
  """Saves arrays as an uncompressed .npz atomically."""
  import io  # pylint: disable=import-outside-toplevel

  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return atomic_write_bytes(path, buffer.getvalue())


def atomic_save_figure(path: str | os.PathLike, figure: Any, dpi: int = 120) -> Path:
  """Saves a matplotlib figure atomically; the format follows the suffix of `path`."""
  path = Path(path)
  fmt = path.suffix.lstrip(".") or "png"
  import io

  buffer = io.BytesIO()
  figure.savefig(buffer, format=fmt, dpi=dpi, bbox_inches="tight")
  return atomic_write_bytes(path, buffer.getvalue())


class MetricsWriter:
  """Appends one JSON object per line: {"step": int, <metric>: value, ...}."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._file = open(self.path, "a", encoding="utf-8")

  def write(self, step: int, **metrics: Any) -> dict[str, Any]:
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool):
      raise TypeError(f"metrics step must be an int, got {step!r} ({type(step).__name__})")
    record = {"step": int(step), **to_jsonable(metrics)}
    # One write call per line, flushed: a kill can only truncate the last line.
    self._file.write(json.dumps(record, sort_keys=True) + "\n")
    self._file.flush()
    return record

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads a metrics file, skipping a trailing line that a killed run left incomplete."""
  records = []
  lines = Path(path).read_text(encoding="utf-8").splitlines(keepends=True)
  for i, line in enumerate(lines):
    if not line.endswith("\n") and i == len(lines) - 1:
      break  # cut short by a kill
    if line.strip():
      records.append(json.loads(line))
  return records


def read_json(path: str | os.PathLike) -> Any:
  return json.loads(Path(path).read_text(encoding="utf-8"))


def write_markdown_table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
  """Formats rows as a GitHub markdown table (used by the demo and the paper pages)."""
  header = list(header)
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  for row in rows:
    lines.append("| " + " | ".join(str(c) for c in row) + " |")
  return "\n".join(lines) + "\n"
