"""research/common/versions.py: installed versions and the lock file an environment came from."""

import ast
import hashlib
import platform
import sys
from importlib import metadata
from pathlib import Path

import pytest

from research.common import versions

REPO = Path(__file__).resolve().parents[2]


def test_resolved_versions_match_importlib_metadata():
  found = versions.resolved_versions()
  assert found["python"] == platform.python_version()
  assert set(found) - {"python"} <= set(versions.PACKAGES)
  for name, version in found.items():
    if name != "python":
      assert version == metadata.version(name), name
  for name in versions.PACKAGES:
    try:
      metadata.version(name)
    except metadata.PackageNotFoundError:
      assert name not in found
    else:
      assert name in found


def test_resolved_versions_agree_with_module_versions():
  jax = pytest.importorskip("jax")
  numpy = pytest.importorskip("numpy")
  found = versions.resolved_versions()
  assert found["jax"] == jax.__version__
  assert found["numpy"] == numpy.__version__


def test_a_missing_package_is_left_out_not_an_error():
  found = versions.resolved_versions(["numpy", "no-such-package-meshwork-xyz"])
  assert set(found) == {"python", "numpy"}
  assert versions.resolved_versions(["no-such-package-meshwork-xyz"]) == {
      "python": platform.python_version()}


def test_lock_sha256_reads_the_stamp(tmp_path):
  digest = hashlib.sha256(b"some lock file").hexdigest()
  (tmp_path / versions.STAMP).write_text(f"{digest} 3.11.7\n")
  assert versions.lock_sha256(tmp_path) == digest
  assert versions.lock_sha256(str(tmp_path)) == digest


@pytest.mark.parametrize("content", [None, "", "not-a-hash 3.11.7\n", "ABC" * 30])
def test_lock_sha256_is_none_without_a_valid_stamp(tmp_path, content):
  if content is not None:
    (tmp_path / versions.STAMP).write_text(content)
  assert versions.lock_sha256(tmp_path) is None


def test_lock_sha256_of_this_environment_is_its_stamp():
  stamp = Path(sys.prefix) / versions.STAMP
  if not stamp.exists():
    assert versions.lock_sha256() is None
  else:
    assert versions.lock_sha256() == stamp.read_text().split()[0]


def test_versions_imports_only_the_standard_library():
  # Both environments import it; neither's third-party packages may be assumed.
  tree = ast.parse((REPO / "research" / "common" / "versions.py").read_text())
  roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
           for alias in node.names}
  roots |= {node.module.split(".")[0] for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module}
  assert roots <= set(sys.stdlib_module_names) | {"__future__"}, roots
