"""The two environments stay apart: .venv never imports concrete-ml, research/fhe never jax.

Checked statically on the import statements of every source file, so a stray import fails here
before it breaks the other environment.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JAX_STACK = {"jax", "jaxlib", "flax", "optax", "orbax", "chex", "ml_collections"}
FHE_STACK = {"concrete", "torch", "brevitas"}
# Modules the FHE environment may import from the main tree: numpy/scikit-learn only.
SHARED_WITH_FHE = [REPO / "research" / "common" / "data.py",
                   REPO / "research" / "common" / "records.py",
                   REPO / "research" / "common" / "versions.py"]


def imported_roots(path: Path) -> set[str]:
  roots = set()
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.Import):
      roots |= {alias.name.split(".")[0] for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      roots.add(node.module.split(".")[0])
  return roots


def sources(*folders: str) -> list[Path]:
  return [p for folder in folders for p in (REPO / folder).rglob("*.py")]


def test_main_environment_code_never_imports_the_fhe_stack():
  main_code = [p for p in sources("research", "kernels", "experiments", "configs")
               if "fhe" not in p.relative_to(REPO).parts[:2]]
  assert main_code
  offenders = {str(p.relative_to(REPO)): imported_roots(p) & FHE_STACK for p in main_code}
  assert {k: v for k, v in offenders.items() if v} == {}


def test_fhe_side_never_imports_the_jax_stack():
  fhe_code = sources("research/fhe", "tests/fhe") + SHARED_WITH_FHE
  assert SHARED_WITH_FHE[0] in fhe_code
  offenders = {str(p.relative_to(REPO)): imported_roots(p) & JAX_STACK for p in fhe_code}
  assert {k: v for k, v in offenders.items() if v} == {}


def test_package_inits_import_nothing():
  # research/__init__.py is imported by both environments.
  for init in (REPO / "research").rglob("__init__.py"):
    assert imported_roots(init) <= {"__future__"}, init
