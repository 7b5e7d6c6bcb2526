"""The stages of a ``dvc.yaml`` as DVC runs them: a ``foreach`` stage becomes one stage per key, named
``<name>@<key>``, with ``${key}`` and ``${item.<field>}`` substituted (the only templating the project uses)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

_ITEM = re.compile(r"\$\{item\.(\w+)\}")


def _fill(value: Any, key: str, item: Any) -> Any:
    if isinstance(value, str):
        value = value.replace("${key}", key)
        return _ITEM.sub(lambda m: str(item[m.group(1)]), value) if isinstance(item, dict) else value
    if isinstance(value, list):
        return [_fill(v, key, item) for v in value]
    if isinstance(value, dict):
        return {_fill(k, key, item): _fill(v, key, item) for k, v in value.items()}
    return value


def expand(stages: dict[str, dict]) -> dict[str, dict]:
    """``{name: stage}`` with every ``foreach`` stage replaced by its per-key stages, in order."""
    out = {}
    for name, stage in stages.items():
        if "foreach" not in stage:
            out[name] = stage
            continue
        items = stage["foreach"]
        pairs = items.items() if isinstance(items, dict) else ((v, v) for v in items)
        for key, item in pairs:
            out[f"{name}@{key}"] = _fill(stage["do"], str(key), item)
    return out


def load_stages(path: str | Path) -> dict[str, dict]:
    """The expanded stages of the ``dvc.yaml`` at ``path``."""
    return expand(yaml.safe_load(Path(path).read_text())["stages"])
