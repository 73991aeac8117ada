"""Load recipes: YAML with inheritance, dotted command-line overrides, strict validation.

A recipe may extend others with ``defaults:`` (or ``base:``): a path or a list of paths relative
to the recipe; later ones and the recipe itself win, mappings merge key by key. Overrides are
``section.key=value`` with the value parsed as YAML (``training.train_steps=50``,
``optimizer.lr=1e-4``, ``checkpoint.load=null``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterable

import yaml

from .schema import Config, ConfigError

_BASE_KEYS = ("defaults", "base")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_recipe_dict(path: str | os.PathLike, _chain: tuple = ()) -> dict:
    """The recipe at ``path`` with its bases merged in (no schema checks yet)."""
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in _chain + (path,))
        raise ConfigError(f"recipe inheritance cycle: {cycle}")
    data = _read_yaml(path)
    bases: list = []
    for key in _BASE_KEYS:
        value = data.pop(key, None)
        if value is None:
            continue
        bases.extend([value] if isinstance(value, str) else list(value))
    merged: dict = {}
    for base in bases:
        if not isinstance(base, str):
            raise ConfigError(f"recipe {path}: 'defaults' entries must be paths, got {base!r}")
        base_path = Path(base) if os.path.isabs(base) else path.parent / base
        merged = deep_merge(merged, load_recipe_dict(base_path, _chain + (path,)))
    return deep_merge(merged, data)


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} is not of the form section.key=value "
                f"(for example training.train_steps=50)"
            )
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        if len(keys) < 2 or not all(keys):
            raise ConfigError(f"override {item!r}: the key must name a section and a field")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            child = dict(child) if isinstance(child, dict) else {}
            node[key] = child
            node = child
        node[keys[-1]] = value
    return data


def _strip_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _convert(value: Any, tp, where: str):
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} cannot be null")
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        items = [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)  # YAML reads "1e-4" (no dot) as a string
                except ValueError:
                    pass
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value


def build_dataclass(cls, data: Any, where: str = ""):
    """Instantiate ``cls`` from a mapping, refusing unknown keys with the closest valid name."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{(where + '.') if where else ''}{close[0]}'?" if close else ""
            valid = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key '{path}'{hint} (valid keys here: {valid})")
        kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


def load_config(
    recipe: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    world_size: int | None = None,
    require_data: bool = True,
) -> Config:
    """Recipe (optional) + overrides -> a validated :class:`Config`."""
    data = load_recipe_dict(recipe) if recipe is not None else {}
    data = apply_overrides(data, overrides)
    config = build_dataclass(Config, data)
    config.validate(world_size, require_data=require_data)
    return config


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def save_config(config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically), loadable again with :func:`load_config`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)
