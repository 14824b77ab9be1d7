"""Config schema and validation: the one config loader.

A config file (`configs/<system>/<setting>.py`) defines `get_config()` returning an
`ml_collections.ConfigDict`. The experiment it names (`config.experiment`) declares a schema, a
ConfigDict whose values are the defaults and whose value types are the key types
(`ml_collections.config_dict.required_placeholder(T)` marks a required key with no default).
`resolve` checks the file against the schema, applies `--set key=value` overrides, checks that
required keys are set, and returns a locked config. A tuple key whose default is a non-empty
tuple of one type takes items of that type only; None is accepted only for a key whose default
is None. Every error names the key, the value given and what was expected; nothing runs before
this succeeds.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import ml_collections
from ml_collections import config_dict


class ConfigError(ValueError):
  """A config file or override that does not fit the experiment's schema."""


def base_schema() -> ml_collections.ConfigDict:
  """Keys every experiment has."""
  return ml_collections.ConfigDict({
      "experiment": config_dict.required_placeholder(str),  # module under experiments/
      "seed": 0,
  })


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """Imports a config file by path and returns its `get_config()`."""
  path = Path(path)
  if not path.is_file():
    raise ConfigError(f"config file {str(path)!r} does not exist (expected a path like "
                      "configs/<system>/<setting>.py)")
  spec = importlib.util.spec_from_file_location(f"_meshwork_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {str(path)!r} defines no get_config()")
  config = module.get_config()
  if isinstance(config, dict):
    config = ml_collections.ConfigDict(config)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"get_config() in {str(path)!r} returned {type(config).__name__}, "
                      "expected an ml_collections.ConfigDict")
  return config


def _field_type(schema: ml_collections.ConfigDict, key: str) -> type:
  field = schema._fields[key]  # pylint: disable=protected-access
  if isinstance(field, config_dict.FieldReference):
    return field.get_type()
  return type(field)


def _raw(field: Any) -> Any:
  """A field's value without resolving it (reading an unset required placeholder raises)."""
  if isinstance(field, config_dict.FieldReference):
    return field._value  # pylint: disable=protected-access
  return field


def _is_section(schema: ml_collections.ConfigDict, key: str) -> bool:
  return isinstance(schema._fields[key], ml_collections.ConfigDict)  # pylint: disable=protected-access


def _known_keys(schema: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for key in schema._fields:  # pylint: disable=protected-access
    if _is_section(schema, key):
      keys += _known_keys(schema[key], f"{prefix}{key}.")
    else:
      keys.append(f"{prefix}{key}")
  return keys


def _unknown_key_error(dotted: str, value: Any, root: ml_collections.ConfigDict) -> ConfigError:
  return ConfigError(f"unknown config key {dotted!r} (given {value!r}); known keys: "
                     + ", ".join(sorted(_known_keys(root))))


def _item_type(default: Any) -> type | None:
  """The item type a tuple key's items must have: its default's, where the default is a
  non-empty tuple of one type (a list item counts as a tuple); else None (unchecked)."""
  if not isinstance(default, (tuple, list)) or not default:
    return None
  types = {tuple if isinstance(x, list) else type(x) for x in default}
  return types.pop() if len(types) == 1 else None


def item_types(schema: ml_collections.ConfigDict, prefix: str = "") -> dict[str, type]:
  """{dotted key: item type} for the schema's tuple keys with a checkable default."""
  out = {}
  for key, field in schema._fields.items():  # pylint: disable=protected-access
    if _is_section(schema, key):
      out.update(item_types(schema[key], f"{prefix}{key}."))
    elif (item := _item_type(_raw(field))) is not None:
      out[f"{prefix}{key}"] = item
  return out


def _check_items(value: Any, item: type, dotted: str) -> Any:
  """`value`'s items checked against `item` (ints become floats where floats are expected, as
  for a scalar key); returns the value with its items converted."""
  def fits(x: Any) -> bool:
    if item in (int, float) and isinstance(x, bool):
      return False
    if item is float:
      return isinstance(x, (int, float))
    if item is tuple:
      return isinstance(x, (tuple, list))
    return isinstance(x, item)

  if not all(fits(x) for x in value):
    raise ConfigError(f"config key {dotted!r}: got {tuple(value)!r}, expected a tuple of "
                      f"{item.__name__}")
  return type(value)(float(x) for x in value) if item is float else value


def _assign(schema: ml_collections.ConfigDict, key: str, value: Any, dotted: str,
            item: type | None = None) -> None:
  expected = _field_type(schema, key)
  if expected is float and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if expected in (int, float) and isinstance(value, bool):
    raise ConfigError(f"config key {dotted!r}: got {value!r} (bool), expected {expected.__name__}")
  if item is not None and isinstance(value, (tuple, list)):
    value = _check_items(value, item, dotted)
  try:
    schema[key] = value
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config key {dotted!r}: got {value!r} ({type(value).__name__}), "
                      f"expected {expected.__name__}") from e


def merge(schema: ml_collections.ConfigDict, given: ml_collections.ConfigDict,
          root: ml_collections.ConfigDict | None = None, prefix: str = "",
          items: dict[str, type] | None = None) -> None:
  """Writes `given` into `schema` in place, refusing unknown keys and wrong types (and tuple
  items of the wrong type: `items`, by default `item_types(schema)`)."""
  root = schema if root is None else root
  items = item_types(root) if items is None else items
  for key in given.keys():
    dotted = f"{prefix}{key}"
    value = _raw(given._fields[key])  # pylint: disable=protected-access
    if key not in schema._fields:  # pylint: disable=protected-access
      raise _unknown_key_error(dotted, value, root)
    if _is_section(schema, key):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(f"config key {dotted!r}: got {value!r}, expected a section with keys "
                          + ", ".join(sorted(schema[key].keys())))
      merge(schema[key], value, root, f"{dotted}.", items)
    elif value is None:
      # None stands only where the schema's default is None (an optional key, or a required
      # one, which check_required then names); elsewhere it would silently mean the default.
      default = _raw(schema._fields[key])  # pylint: disable=protected-access
      if default is not None:
        raise ConfigError(f"config key {dotted!r}: got None, expected "
                          f"{_field_type(schema, key).__name__} (leave the key out for its "
                          f"default, {default!r})")
    else:
      _assign(schema, key, value, dotted, items.get(dotted))


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def parse_value(text: str, expected: type, dotted: str) -> Any:
  """Parses an override's text as the type the schema declares for `dotted`."""
  def fail() -> ConfigError:
    return ConfigError(f"config key {dotted!r}: got {text!r}, expected {expected.__name__}")

  if expected is bool:
    if text.lower() in _TRUE:
      return True
    if text.lower() in _FALSE:
      return False
    raise fail()
  if expected is int:
    try:
      return int(text)
    except ValueError:
      raise fail() from None
  if expected is float:
    try:
      return float(text)
    except ValueError:
      raise fail() from None
  if expected is str:
    return text
  if expected in (tuple, list):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      raise fail() from None
    if not isinstance(value, (tuple, list)):
      value = (value,)
    return expected(value)
  raise fail()


def apply_override(config: ml_collections.ConfigDict, override: str,
                   items: dict[str, type] | None = None) -> None:
  """Applies one `--set dotted.key=value` to `config` in place (tuple items checked against
  `items`, by default `item_types(config)`)."""
  if "=" not in override:
    raise ConfigError(f"override {override!r} is not of the form key=value")
  dotted, text = override.split("=", 1)
  dotted = dotted.strip()
  node = config
  parts = dotted.split(".")
  for depth, part in enumerate(parts):
    if part not in node._fields:  # pylint: disable=protected-access
      raise _unknown_key_error(dotted, text, config)
    if depth < len(parts) - 1:
      if not _is_section(node, part):
        raise _unknown_key_error(dotted, text, config)
      node = node[part]
  key = parts[-1]
  if _is_section(node, key):
    raise ConfigError(f"config key {dotted!r} is a section; set one of its keys: "
                      + ", ".join(f"{dotted}.{k}" for k in sorted(node[key].keys())))
  items = item_types(config) if items is None else items
  _assign(node, key, parse_value(text, _field_type(node, key), dotted), dotted, items.get(dotted))


def check_required(config: ml_collections.ConfigDict, prefix: str = "") -> None:
  for key in config._fields:  # pylint: disable=protected-access
    field = config._fields[key]  # pylint: disable=protected-access
    dotted = f"{prefix}{key}"
    if isinstance(field, ml_collections.ConfigDict):
      check_required(field, f"{dotted}.")
    elif isinstance(field, config_dict.FieldReference) and _raw(field) is None \
        and getattr(field, "_required", False):
      raise ConfigError(f"required config key {dotted!r} is missing (expected "
                        f"{field.get_type().__name__})")


def resolve(given: ml_collections.ConfigDict, overrides: Sequence[str],
            schema_for: Callable[[str], ml_collections.ConfigDict]) -> ml_collections.ConfigDict:
  """Validates a loaded config against its experiment's schema and applies overrides.

  Args:
    given: what the config file returned.
    overrides: `key=value` strings, applied in order after the file.
    schema_for: maps an experiment name to its schema (raises ConfigError if unknown).
  Returns:
    A locked ConfigDict holding every schema key.
  """
  if "experiment" not in given or not isinstance(given.experiment, str):
    raise ConfigError("required config key 'experiment' is missing (expected str: the name of a "
                      "module under experiments/)")
  for override in overrides:
    if override.split("=", 1)[0].strip() == "experiment":
      raise ConfigError(f"override {override!r}: 'experiment' is chosen by the config file, "
                        "not by --set; pick another config file")
  schema = base_schema()
  specific = schema_for(given.experiment)
  for key in specific.keys():
    schema[key] = specific._fields[key]  # pylint: disable=protected-access
  items = item_types(schema)  # from the defaults, before a file or an override changes them
  merge(schema, given, items=items)
  for override in overrides:
    apply_override(schema, override, items)
  check_required(schema)
  schema.lock()
  return schema


def check_positive(config: ml_collections.ConfigDict, *keys: str) -> None:
  """Range checks for an experiment's `validate_config`: each key must be > 0."""
  for key in keys:
    if not config[key] > 0:
      raise ConfigError(f"config key {key!r}: got {config[key]!r}, expected a positive "
                        f"{type(config[key]).__name__}")


def check_choice(config: ml_collections.ConfigDict, key: str, choices: Sequence[str]) -> None:
  if config[key] not in choices:
    raise ConfigError(f"config key {key!r}: got {config[key]!r}, expected one of "
                      + ", ".join(repr(c) for c in choices))
