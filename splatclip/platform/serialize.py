"""A spec as a tracking run records it: plain JSON with every secret removed, flattened to dotted
params, and a short hash that two runs with the same settings share."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, SecretStr

from splatclip.platform.secrets import redact


def public_dict(spec: BaseModel) -> dict:
    """The spec as plain JSON data with every secret field removed (not masked: removed) and URL
    credentials redacted from every string."""

    def strip(model: BaseModel) -> dict:
        out = {}
        for name in type(model).model_fields:
            value = getattr(model, name)
            if isinstance(value, SecretStr):
                continue
            if isinstance(value, BaseModel):
                out[name] = strip(value)
            elif isinstance(value, list):
                out[name] = [strip(v) if isinstance(v, BaseModel) else clean(v) for v in value]
            elif isinstance(value, dict):
                out[name] = {k: clean(v) for k, v in value.items()}
            else:
                out[name] = clean(value)
        return out

    def clean(value):
        return redact(value) if isinstance(value, str) else value

    return json.loads(json.dumps(strip(spec), default=str))


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}, 'c': [{'d': 2}]} -> {'a.b': 1, 'c.0.d': 2}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                out.update(flatten(v, f"{name}.{i}."))
        else:
            out[name] = value
    return out


def spec_hash(spec: BaseModel) -> str:
    """Short, stable hash of the public spec: two runs with the same settings share it."""
    text = json.dumps(public_dict(spec), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
