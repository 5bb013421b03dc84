"""Run configuration: YAML recipe + ``a.b=c`` overrides -> a validated, frozen `Config`.

The schema (sections and defaults) lives in `ssl_ema.config_schema`; methods add their own
sections through the registry (`ssl_ema.methods.registry`). Every error (unknown key, wrong
type, unknown choice) is a :class:`ConfigError` whose one-line message names the key and the
valid choices, raised before any model or data is built.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode

from ssl_ema.config_checks import CHOICES, validate
from ssl_ema.config_schema import (  # the schema, re-exported for the layers above
    Config,
    ConfigError,
    DataConfig,
    EMAConfig,
    EvalConfig,
    LabelsConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScalingConfig,
    TrainConfig,
    dump_yaml,
    to_dict,
)
from ssl_ema.methods.registry import classification_methods, section_key
from ssl_ema.methods.registry import sections as method_sections

# Methods that train a classifier on labels (`MethodSpec.labels`).
CLASSIFICATION_METHODS = classification_methods()


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; convert int -> float and list -> tuple."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value is False and "no" in typing.get_args(tp):
            value = "no"  # YAML 1.1 reads a bare `no` as false: mixed_precision: no
        if value not in typing.get_args(tp):
            valid = ", ".join(map(str, typing.get_args(tp)))
            raise ConfigError(f"{key}: invalid value {value!r}; valid: {valid}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is tuple and typing.get_args(tp)[1:] == (Ellipsis,):
        if isinstance(value, str) and typing.get_args(tp)[0] is str:
            value = [value]  # one name for a list of names, as Accelerate's log_with takes
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = typing.get_args(tp)[0]
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if math.isfinite(number):  # but "nan" / "inf" stay strings: an error below
                value = number
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown key '{full}'; valid keys here: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{full}: expected a section of keys, got {value!r}")
            kwargs[key] = _build(tp, value, f"{full}.")  # type: ignore[arg-type]
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping. PyYAML keeps the last
    value silently, so a second ``train:`` section would replace the first; YAML 1.2 requires
    keys to be unique (spec 3.2.1.1). Merge keys (``<<``) may still be overridden."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            if not isinstance(key, Hashable):
                break  # the base class names that problem
            if key in first:
                raise ConstructorError(None, None, f"key '{key}' appears twice (lines "
                                       f"{first[key]} and {line}), the second would replace "
                                       "the first; keep one", key_node.start_mark)
            first[key] = line
        return super().construct_mapping(node, deep)


def _read_recipe(path: Path) -> Any:
    """The YAML of the recipe at ``path``; ConfigError naming the file and the fix when it is
    not UTF-8 text or not valid YAML (with the line and column)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"recipe '{path}' is not UTF-8 text: byte 0x{raw[e.start]:02x} at "
                          f"offset {e.start} (line {line}); save the file as UTF-8 (e.g. iconv "
                          "-f latin1 -t utf-8)") from None
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # safe: a SafeLoader
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe '{path}' is not valid YAML{_yaml_problem(e)}") from e


def _set_nested(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["train.epochs=5", "data.dataset=cifar10"]`` -> nested dict; values parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        try:
            value = yaml.load(raw, Loader=_RecipeLoader) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': the value is not valid YAML"
                              f"{_yaml_problem(e)}") from e
        _set_nested(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# Keys that moved: old recipes and the config.yaml of older runs still load (and resume, and
# match stored results: `ssl_ema.engine.run.config_changes` renames their flat keys too).
MOVED_KEYS: dict[str, str] = {f"method.{k}": f"byol.{k}" for k in (
    "projection_hidden_dim", "projection_dim", "prediction_hidden_dim")}


def _move_old_keys(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with every key of `MOVED_KEYS` at its new place; one given at both is an
    error naming both."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in values.items()}
    for old, new in MOVED_KEYS.items():
        (old_section, key), (new_section, new_key) = old.split("."), new.split(".")
        section = out.get(old_section)
        if not isinstance(section, dict) or key not in section:
            continue
        target = out.setdefault(new_section, {})
        if not isinstance(target, dict):
            continue  # the section's own error comes when it is read
        if new_key in target:
            raise ConfigError(f"{old} and {new} are both given; keep {new} ({old} is its "
                              "old name)")
        target[new_key] = section.pop(key)
    return out


def _method_name(values: Mapping[str, Any]) -> str:
    method = values.get("method")
    name = method.get("name") if isinstance(method, Mapping) else None
    return name if isinstance(name, str) else MethodConfig.name


def _method_sections(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split the recipe's top level into `Config`'s own sections and the run's method section
    (with its defaults where the recipe has none). Another registered method's section is read
    and checked like any, then left out: runs written before a config held only its own
    method's section carry every method's defaults, and they must still load."""
    registered = method_sections()
    own = [f.name for f in dataclasses.fields(Config) if f.name != "sections"]
    clash = set(own) & set(registered)
    if clash:  # a programming error in a method file, not a user error
        raise TypeError(f"method sections {sorted(clash)} shadow Config's own sections")
    run_key = section_key(_method_name(values))
    core: dict[str, Any] = {}
    sections: dict[str, Any] = {} if run_key is None else {run_key: registered[run_key]()}
    for key, value in values.items():
        if key in registered:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key}: expected a section of keys, got {value!r}")
            section = _build(registered[key], value, f"{key}.")
            if key == run_key:
                sections[key] = section
        elif key in own:
            core[key] = value
        else:
            valid = ", ".join([*own, *registered])
            raise ConfigError(f"unknown key '{key}'; valid keys here: {valid}")
    return core, sections


def from_dict(values: Mapping[str, Any]) -> Config:
    """Build and validate a :class:`Config` from nested plain values."""
    core, sections = _method_sections(_move_old_keys(values))
    cfg = dataclasses.replace(_build(Config, core, ""), sections=sections)
    validate(cfg)
    return cfg


def config_from(values: Mapping[str, Any], overrides: Sequence[str] = ()) -> Config:
    """A validated :class:`Config` from nested plain values (a recipe's YAML as a dict) and
    ``a.b=c`` overrides: the Python caller's `load_config`."""
    return from_dict(_merge(dict(values), parse_overrides(overrides)))


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML recipe (safe loader), apply overrides, validate. Raises ConfigError."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe '{path}' not found; pass the path of a YAML file")
        loaded = _read_recipe(path)
        if loaded is None:
            raise ConfigError(f"recipe '{path}' is empty; a recipe names at least its method "
                              "(method: name: byol), see recipes/quickstart.yaml")
        if not isinstance(loaded, dict):
            kind = type(loaded).__name__
            raise ConfigError(f"recipe '{path}' must be a mapping of sections, got {kind}")
        values = loaded
        values.setdefault("run", {})
        if isinstance(values["run"], dict):
            values["run"].setdefault("name", path.stem)
    values = _merge(values, parse_overrides(overrides))
    method = values.get("method")
    if path is not None and not (isinstance(method, Mapping) and "name" in method):
        raise ConfigError(f"recipe '{path}' names no method; add method.name (one of "
                          f"{', '.join(CHOICES['method.name'])}) instead of training the defaults")
    return from_dict(values)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """`` at line L, column C: problem`` of a YAML error (its first line when it has no mark)."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is None or problem is None:
        return f": {str(e).splitlines()[0]}"
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}"


__all__ = [
    "CHOICES", "CLASSIFICATION_METHODS", "Config", "ConfigError", "DataConfig", "EMAConfig",
    "EvalConfig", "LabelsConfig", "MethodConfig", "ModelConfig", "OptimConfig", "RunConfig",
    "ScalingConfig", "TrainConfig", "MOVED_KEYS",
    "dump_yaml", "from_dict", "load_config", "parse_overrides", "to_dict",
]
