import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest
from ml_collections import config_dict

from research.common import config as config_lib

REPO = Path(__file__).resolve().parents[2]


def schema_for(name):
  if name != "toy":
    raise config_lib.ConfigError(f"config key 'experiment': got {name!r}, expected 'toy'")
  return ml_collections.ConfigDict({
      "rounds": 10,
      "learning_rate": 0.1,
      "use_bias": True,
      "hidden": (32, 32),
      "name": "a",
      "data_dir": config_dict.required_placeholder(str),
      "optimizer": {"name": "sgd", "momentum": 0.9},
  })


def given(**kwargs):
  base = {"experiment": "toy", "data_dir": "/tmp/data"}
  base.update(kwargs)
  return ml_collections.ConfigDict(base)


def test_resolve_fills_defaults_and_locks():
  config = config_lib.resolve(given(rounds=3), [], schema_for)
  assert config.rounds == 3 and config.learning_rate == 0.1 and config.seed == 0
  assert config.optimizer.momentum == 0.9
  with pytest.raises(AttributeError):
    config.nosuchkey = 1


def test_override_parses_each_type():
  config = config_lib.resolve(given(), [
      "rounds=7", "learning_rate=1", "use_bias=false", "hidden=(64, 16, 8)", "name=b c",
      "optimizer.momentum=0.5", "seed=3"], schema_for)
  assert config.rounds == 7 and isinstance(config.rounds, int)
  assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
  assert config.use_bias is False
  assert config.hidden == (64, 16, 8)
  assert config.name == "b c"
  assert config.optimizer.momentum == 0.5
  assert config.seed == 3


@pytest.mark.parametrize("override, named", [
    ("rounds=abc", ["'rounds'", "'abc'", "expected int"]),
    ("rounds=1.5", ["'rounds'", "'1.5'", "expected int"]),
    ("learning_rate=fast", ["'learning_rate'", "'fast'", "expected float"]),
    ("use_bias=maybe", ["'use_bias'", "'maybe'", "expected bool"]),
    ("hidden=[1,", ["'hidden'", "expected tuple"]),
])
def test_override_with_wrong_type_names_key_value_and_type(override, named):
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.resolve(given(), [override], schema_for)
  for text in named:
    assert text in str(error.value)


@pytest.mark.parametrize("override", ["nosuchkey=1", "optimizer.nosuch=1", "rounds.x=1"])
def test_override_of_unknown_key_names_it(override):
  with pytest.raises(config_lib.ConfigError, match="unknown config key") as error:
    config_lib.resolve(given(), [override], schema_for)
  assert repr(override.split("=")[0]) in str(error.value)


def test_override_of_a_section_or_without_equals_is_refused():
  with pytest.raises(config_lib.ConfigError, match="'optimizer' is a section"):
    config_lib.resolve(given(), ["optimizer=adam"], schema_for)
  with pytest.raises(config_lib.ConfigError, match="key=value"):
    config_lib.resolve(given(), ["rounds"], schema_for)
  with pytest.raises(config_lib.ConfigError, match="chosen by the config file"):
    config_lib.resolve(given(), ["experiment=other"], schema_for)


def test_config_file_with_unknown_key_or_wrong_type_is_refused():
  with pytest.raises(config_lib.ConfigError, match="unknown config key 'round'"):
    config_lib.resolve(given(round=3), [], schema_for)
  with pytest.raises(config_lib.ConfigError, match="'rounds': got '3' \\(str\\), expected int"):
    config_lib.resolve(given(rounds="3"), [], schema_for)
  with pytest.raises(config_lib.ConfigError, match="'rounds': got True \\(bool\\), expected int"):
    config_lib.resolve(given(rounds=True), [], schema_for)
  with pytest.raises(config_lib.ConfigError, match="unknown config key 'optimizer.lr'"):
    config_lib.resolve(given(optimizer={"lr": 1.0}), [], schema_for)


def test_none_for_a_key_with_a_default_is_refused_naming_it():
  """None in a config file would otherwise silently stand for the default (rounds 10, not
  None): refused, naming the key; a key whose default is None may still be given None."""
  with pytest.raises(config_lib.ConfigError,
                     match=r"'rounds': got None, expected int \(leave the key out for its "
                           r"default, 10\)"):
    config_lib.resolve(given(rounds=None), [], schema_for)
  with pytest.raises(config_lib.ConfigError, match=r"'optimizer.momentum': got None"):
    config_lib.resolve(given(optimizer={"momentum": None}), [], schema_for)

  def with_optional(name):
    schema = schema_for(name)
    schema.limit = config_dict.placeholder(int)  # optional: None by default
    schema.note = None
    return schema

  config = config_lib.resolve(given(limit=None, note=None), [], with_optional)
  assert config.limit is None and config.note is None
  assert config_lib.resolve(given(limit=3), [], with_optional).limit == 3
  # A required key given None is missing, as if left out.
  with pytest.raises(config_lib.ConfigError, match="required config key 'data_dir'"):
    config_lib.resolve(given(data_dir=None), [], schema_for)


@pytest.mark.parametrize("source, value, expected", [
    ("override", "hidden=('a',)", r"'hidden': got \('a',\), expected a tuple of int"),
    ("override", "hidden=(64, 1.5)", r"'hidden': got \(64, 1.5\), expected a tuple of int"),
    ("override", "hidden=(True,)", r"'hidden': got \(True,\), expected a tuple of int"),
    ("override", "scales=('x',)", r"'scales': got \('x',\), expected a tuple of float"),
    ("file", ("a", "b"), r"'hidden': got \('a', 'b'\), expected a tuple of int"),
    ("file", [8, "b"], r"'hidden': got \(8, 'b'\), expected a tuple of int"),
])
def test_tuple_items_of_the_wrong_type_are_refused_naming_the_key(source, value, expected):
  def schema(name):
    schema = schema_for(name)
    schema.scales = (0.5, 1.0)
    return schema

  config, overrides = (given(hidden=value), []) if source == "file" else (given(), [value])
  with pytest.raises(config_lib.ConfigError, match=expected):
    config_lib.resolve(config, overrides, schema)


def test_tuple_items_of_the_default_type_are_taken_ints_as_floats():
  def schema(name):
    schema = schema_for(name)
    schema.scales, schema.any, schema.pairs = (0.5, 1.0), (), ((1.0, 0), (2.0, 1))
    return schema

  config = config_lib.resolve(given(scales=(1, 2.5)), ["hidden=(8,)", "any=(1, 'a')",
                                                       "pairs=((3.0, 1),)"], schema)
  assert config.scales == (1.0, 2.5) and all(isinstance(x, float) for x in config.scales)
  assert config.hidden == (8,) and config.any == (1, "a") and config.pairs == ((3.0, 1),)
  # The default's item type holds for an override after the file changed the value.
  with pytest.raises(config_lib.ConfigError, match=r"'scales': got \('x',\), expected a tuple "
                                                   r"of float"):
    config_lib.resolve(given(scales=(2.0,)), ["scales=('x',)"], schema)


def test_missing_required_keys_are_named():
  with pytest.raises(config_lib.ConfigError, match="required config key 'data_dir'"):
    config_lib.resolve(ml_collections.ConfigDict({"experiment": "toy"}), [], schema_for)
  with pytest.raises(config_lib.ConfigError, match="required config key 'experiment'"):
    config_lib.resolve(ml_collections.ConfigDict({"rounds": 1}), [], schema_for)
  # A required key may come from an override instead of the file.
  config = config_lib.resolve(ml_collections.ConfigDict({"experiment": "toy"}),
                              ["data_dir=/x"], schema_for)
  assert config.data_dir == "/x"


def test_load_config_file_errors(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="does not exist"):
    config_lib.load_config_file(tmp_path / "missing.py")
  (tmp_path / "empty.py").write_text("x = 1\n")
  with pytest.raises(config_lib.ConfigError, match="defines no get_config"):
    config_lib.load_config_file(tmp_path / "empty.py")


def launch(*args, cwd=REPO):
  return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300)


def test_launcher_refuses_bad_override_before_running(tmp_path):
  result = launch("configs/fedavg/digits.py", "--set", "rounds=abc", "--workdir", str(tmp_path))
  assert result.returncode == 2
  assert "'rounds'" in result.stderr and "'abc'" in result.stderr and "int" in result.stderr
  assert list(tmp_path.iterdir()) == []  # nothing ran, no run folder

  result = launch("configs/fedavg/digits.py", "--set", "nosuchkey=1", "--workdir", str(tmp_path))
  assert result.returncode == 2
  assert "'nosuchkey'" in result.stderr
  assert list(tmp_path.iterdir()) == []


def test_every_shipped_config_validates():
  from experiments import run as launcher
  configs = sorted((REPO / "configs").glob("*/*.py"))
  assert configs
  for path in configs:
    config, module = launcher.load(str(path))
    assert module.__name__ == f"experiments.{config.experiment}"
    assert (path.parent / "smoke.py").exists(), f"{path.parent} has no smoke.py"


def test_experiment_value_checks_run_at_load():
  from experiments import run as launcher
  with pytest.raises(config_lib.ConfigError, match="'partition': got 'pathological', expected "
                     "one of 'iid', 'dirichlet'"):
    launcher.load("configs/fedavg/digits.py", ["partition=pathological"])
  with pytest.raises(config_lib.ConfigError, match="'local_steps': got 0, expected a positive int"):
    launcher.load("configs/fedavg/digits.py", ["local_steps=0"])
  with pytest.raises(config_lib.ConfigError, match="'experiment': got 'nosuch', expected one of"):
    config_lib.resolve(ml_collections.ConfigDict({"experiment": "nosuch"}), [],
                       lambda name: launcher.experiment_module(name).config_schema())


def _flat(config: ml_collections.ConfigDict, prefix: str = "") -> dict:
  flat = {}
  for key in config.keys():
    value = config_lib._raw(config._fields[key])  # pylint: disable=protected-access
    if isinstance(value, ml_collections.ConfigDict):
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def test_config_files_state_only_what_differs_from_the_schema():
  """Defaults live once, in the experiment's schema: a config file repeating one is refused."""
  from experiments import run as launcher
  repeated = []
  for path in sorted((REPO / "configs").glob("*/*.py")):
    given = config_lib.load_config_file(path)
    schema = config_lib.base_schema()
    specific = launcher.experiment_module(given.experiment).config_schema()
    for key in specific.keys():
      schema[key] = specific._fields[key]  # pylint: disable=protected-access
    defaults = _flat(schema)
    for key, value in _flat(given).items():
      if key != "experiment" and key in defaults and _same(defaults[key], value):
        repeated.append(f"{path.relative_to(REPO)}: {key} = {value!r} (the schema's default)")
  assert not repeated, "\n".join(repeated)


def _same(default, value) -> bool:
  try:
    if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
      return tuple(default) == tuple(value)
    return type(default) is type(value) and default == value or (
        isinstance(default, float) and isinstance(value, (int, float)) and
        not isinstance(value, bool) and float(value) == default)
  except Exception:  # pylint: disable=broad-except
    return False
