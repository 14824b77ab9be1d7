"""Messages between the hospital (client) and the cloud (server): bundles of files on disk.

A bundle is a folder holding some payload files (ciphertexts, evaluation keys, a zip package) and
`bundle.json`: the format version, the bundle's kind, a `meta` mapping (ids, shapes, counts) and
the size and sha256 of every payload file. A bundle is built in a temporary sibling folder and
renamed into place, so a reader never sees a half-written one; `read_bundle` refuses a bundle
whose format, kind, meta fields, file list, sizes or hashes are not what the reader expects,
naming the field or file. Hashes detect corruption and tampering in transit; they are not
signatures (whoever rewrites bundle.json can rewrite the hashes), which the paper page says.

No concrete-ml import: the main environment may read these files too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from research.common import records

FORMAT = "meshwork.fhe/1"
INDEX = "bundle.json"
KINDS = ("client-package", "server-package", "upload", "model")


class MessageError(ValueError):
  """A bundle that is missing, half-written, tampered with or meant for someone else."""


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


@dataclasses.dataclass(frozen=True)
class Bundle:
  """A verified bundle: where it is, what it says, and its payload files by name."""
  directory: Path
  kind: str
  meta: dict[str, Any]
  files: dict[str, dict[str, Any]]  # name -> {"bytes": int, "sha256": str}
  index_sha256: str  # hash of bundle.json: an id for the whole bundle

  def path(self, name: str) -> Path:
    if name not in self.files:
      raise MessageError(f"{self.kind} bundle {str(self.directory)!r} has no file {name!r}; "
                         f"it has {sorted(self.files)}")
    return self.directory / name

  def read(self, name: str) -> bytes:
    return self.path(name).read_bytes()

  @property
  def total_bytes(self) -> int:
    return sum(entry["bytes"] for entry in self.files.values())


def refuse_existing(directory: str | os.PathLike, overwrite: bool) -> None:
  """Raises FileExistsError if `directory` exists and `overwrite` is off. `write_bundle` checks
  this itself; a party calls it first as well, before the work (keys, encryption, training)
  whose result the bundle would hold."""
  if Path(directory).exists() and not overwrite:
    raise FileExistsError(f"{str(directory)!r} exists; pass overwrite=True (--overwrite) to "
                          "replace it")


def write_bundle(directory: str | os.PathLike, kind: str, files: Mapping[str, bytes | Path],
                 meta: Mapping[str, Any], overwrite: bool = False) -> Path:
  """Writes a bundle atomically: payload files and bundle.json in a temporary folder, renamed.

  `files` maps a plain file name to its bytes or to an existing file to copy.
  """
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r}; expected one of {KINDS}")
  directory = Path(directory)
  for name in files:
    if name == INDEX or "/" in name or name.startswith("."):
      raise ValueError(f"file name {name!r} is not allowed in a bundle (plain names, not "
                       f"{INDEX!r}, not hidden)")
  refuse_existing(directory, overwrite)
  directory.parent.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp",
                                  dir=directory.parent))
  try:
    entries = {}
    for name, content in files.items():
      target = staging / name
      if isinstance(content, (bytes, bytearray)):
        target.write_bytes(content)
        entries[name] = {"bytes": len(content), "sha256": sha256(bytes(content))}
      else:
        shutil.copyfile(content, target)
        entries[name] = {"bytes": target.stat().st_size, "sha256": records.sha256_file(target)}
    index = {"format": FORMAT, "kind": kind, "meta": records.to_jsonable(dict(meta)),
             "files": entries}
    records.atomic_write_json(staging / INDEX, index)
    if directory.exists():
      trash = directory.with_name(f".{directory.name}.old")
      shutil.rmtree(trash, ignore_errors=True)
      os.replace(directory, trash)
      os.replace(staging, directory)
      shutil.rmtree(trash, ignore_errors=True)
    else:
      os.replace(staging, directory)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return directory


def read_bundle(directory: str | os.PathLike, kind: str,
                expect: Mapping[str, Any] | None = None) -> Bundle:
  """Reads and verifies a bundle; `expect` pins meta fields (ids, shapes) the reader knows."""
  directory = Path(directory)
  index_path = directory / INDEX
  if not directory.is_dir():
    raise MessageError(f"{kind} bundle {str(directory)!r} does not exist")
  if not index_path.is_file():
    raise MessageError(f"{kind} bundle {str(directory)!r} has no {INDEX}: it is half-written "
                       "or not a bundle")
  raw = index_path.read_bytes()
  try:
    index = json.loads(raw)
  except json.JSONDecodeError as e:
    raise MessageError(f"{index_path}: not valid JSON ({e})") from None
  if not isinstance(index, dict) or not {"format", "kind", "meta", "files"} <= set(index):
    raise MessageError(f"{index_path}: expected keys format, kind, meta, files")
  if index["format"] != FORMAT:
    raise MessageError(f"{index_path}: format={index['format']!r}, this reader speaks "
                       f"{FORMAT!r}")
  if index["kind"] != kind:
    raise MessageError(f"{index_path}: kind={index['kind']!r}, expected a {kind!r} bundle")
  meta, files = index["meta"], index["files"]
  for key, want in (expect or {}).items():
    if key not in meta:
      raise MessageError(f"{index_path}: meta has no field {key!r} (expected {want!r})")
    if records.to_jsonable(meta[key]) != records.to_jsonable(want):
      raise MessageError(f"{index_path}: meta field {key!r} is {meta[key]!r}, expected {want!r}")
  present = {p.name for p in directory.iterdir()} - {INDEX}
  if present - set(files):
    raise MessageError(f"{kind} bundle {str(directory)!r} holds undeclared files "
                       f"{sorted(present - set(files))}")
  for name, entry in files.items():
    path = directory / name
    if not path.is_file():
      raise MessageError(f"{kind} bundle {str(directory)!r}: declared file {name!r} is missing")
    size = path.stat().st_size
    if size != entry.get("bytes"):
      raise MessageError(f"{kind} bundle {str(directory)!r}: file {name!r} has {size} bytes, "
                         f"{INDEX} says {entry.get('bytes')}")
    digest = records.sha256_file(path)
    if digest != entry.get("sha256"):
      raise MessageError(f"{kind} bundle {str(directory)!r}: file {name!r} has sha256 "
                         f"{digest[:12]}..., {INDEX} says {str(entry.get('sha256'))[:12]}... "
                         "(corrupted or tampered with)")
  return Bundle(directory, kind, meta, files, sha256(raw))


def run_command(action: Callable[[], Any], report_path: str | None = None,
                printed: Callable[[Any], Any] = lambda report: report) -> int:
  """The parties' command-line convention: bad input or a refused message prints `error: ...`
  and exits 2; otherwise the report is written to `report_path` (if any) and one JSON line
  (`printed(report)`) goes to stdout for whoever drives the process."""
  try:
    report = action()
  except (ValueError, FileExistsError) as e:  # MessageError is a ValueError
    print(f"error: {e}", file=sys.stderr)
    return 2
  if report_path:
    records.atomic_write_json(report_path, report)
  print(json.dumps(records.to_jsonable(printed(report))))
  return 0
