"""Command-line flags for the engine, derived from the config dataclasses' fields.

Each field ``max_num_seqs`` of ``ModelConfig``/``CacheConfig``/``SchedulerConfig``/
``ParallelConfig`` becomes ``--max-num-seqs``, so flags and config keys never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from engine.config import (
    DEFAULT_MODEL,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)

_GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "parallel": ParallelConfig,
}


def _scalar_type(annotation: Any) -> type:
    """``int | None`` -> int; ``str`` -> str."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        return non_none[0]
    return annotation


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    for group_name, cls in _GROUPS.items():
        group = parser.add_argument_group(f"engine: {group_name}")
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            flag = "--" + field.name.replace("_", "-")
            kind = _scalar_type(hints[field.name])
            if kind is bool:
                group.add_argument(
                    flag, action=argparse.BooleanOptionalAction, default=field.default
                )
            else:
                group.add_argument(flag, type=kind, default=field.default, metavar=kind.__name__)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    values = {
        f.name: getattr(args, f.name) for cls in _GROUPS.values() for f in dataclasses.fields(cls)
    }
    return engine_config_from_kwargs(**values)


def engine_config_from_kwargs(model: str = DEFAULT_MODEL, **kwargs: Any) -> EngineConfig:
    """Sort flat keyword arguments (vLLM's names) into the per-concern config dataclasses."""
    owner = {f.name: group for group, cls in _GROUPS.items() for f in dataclasses.fields(cls)}
    values: dict[str, dict[str, Any]] = {group: {} for group in _GROUPS}
    values["model"]["model"] = model
    for key, value in kwargs.items():
        if key not in owner:
            raise ValueError(f"unknown engine argument {key!r}")
        values[owner[key]][key] = value
    return EngineConfig(
        model=ModelConfig(**values["model"]),
        cache=CacheConfig(**values["cache"]),
        scheduler=SchedulerConfig(**values["scheduler"]),
        parallel=ParallelConfig(**values["parallel"]),
    )
