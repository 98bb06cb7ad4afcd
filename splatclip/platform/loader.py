"""Reading a job spec: a YAML file plus `--set dotted.key=value` overrides, validated against the
spec's model, and a command line's way to it (`spec_from_args`: one line per wrong field, exit 2).

Errors never echo what might be a secret: a YAML error names its position only, a wrong field's
value is shown only when it is short, plain and not under a secret's name, URL credentials redacted.

A spec is untrusted input. YAML's aliases and merge keys (`<<: *a`) let a few lines name billions of
values; the document's node graph is composed first (an alias is a reference there, so this stays as
small as the text) and the values it expands to are counted on that graph before anything is built,
so such a spec, or such an override, is refused in milliseconds with bounded memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from splatclip.platform.secrets import is_secret_field, redact
from splatclip.platform.specs import Model


MAX_SPEC_BYTES = 1 << 20  # a spec file larger than this is refused unread
MAX_SPEC_VALUES = 100_000  # scalars, lists and mappings a document may expand to, aliases counted where used


class SpecError(Exception):
    """A spec that cannot be used; `problems` holds one line per wrong field."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems



def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=value' -> (['a', 'b'], value), the value read as YAML so numbers and lists keep their type."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise SpecError([f"--set {text!r}: expected dotted.key=value"])
    value = read_yaml(raw, f"--set {key.strip()}") if raw.strip() else ""
    return [p.strip() for p in parts], value


def read_yaml(text: str, where: str) -> Any:
    """YAML text -> Python data; a document that expands past MAX_SPEC_VALUES values (aliases and
    merge keys counted at each use), refers to itself, or nests too deep is a SpecError."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            size = expanded_size(node, MAX_SPEC_VALUES)
        except ValueError as err:
            raise SpecError([f"{where}: {err}"]) from None
        if size > MAX_SPEC_VALUES:
            raise SpecError([f"{where}: the document expands to more than {MAX_SPEC_VALUES} values through aliases "
                             "or merge keys; write the values out"])
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise SpecError([_yaml_problem(where, err)]) from None
    except RecursionError:
        raise SpecError([f"{where}: nested too deep"]) from None
    finally:
        loader.dispose()


def expanded_size(root: yaml.Node, limit: int) -> int:
    """The number of nodes the document under `root` expands to, each alias counted as the whole
    node it names (at each use) and a merged mapping as its entries; counted on the node graph,
    each node once, and capped just past `limit`. A node that contains itself is a ValueError."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            sizes[key] = min(limit + 1, 1 + sum(sizes[id(c)] for c in _children(node)))
            continue
        if key in sizes:
            continue
        on_path.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                raise ValueError("the document refers to itself through an alias")
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def apply_override(data: dict, path: list[str], value: Any, schema: type[BaseModel] | None = None) -> None:
    """Set data[a][b]... = value; list items are addressed by index (stages.0.lr=1e-4). With the spec's
    model `schema`, a list the data does not hold yet starts as the field's default (so stages.0.lr works
    on a spec file without `stages`)."""
    node: Any = data
    model: Any = schema
    for i, part in enumerate(path):
        where = ".".join(path[: i + 1])
        last = i == len(path) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise SpecError([f"--set {'.'.join(path)}: {where} is not an item of a {len(node)}-item list"])
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise SpecError([f"--set {'.'.join(path)}: {'.'.join(path[:i])} is not a mapping"])
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if last:
            node[part] = value
            continue
        if node.get(part) is None:
            default = field.get_default(call_default_factory=True) if field is not None else None
            node[part] = [_dump(d) for d in default] if isinstance(default, list) else {}
        node = node[part]
        model = _inner_model(field.annotation) if field is not None else None


def _dump(value: Any) -> Any:
    return value.model_dump() if isinstance(value, BaseModel) else value


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds, directly, optionally or as list items."""
    from typing import get_args

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        inner = _inner_model(arg)
        if inner is not None:
            return inner
    return None


def _problem_lines(err: ValidationError) -> list[str]:
    """One line per wrong field, naming it. The wrong value is shown only when it is short, plain
    data and neither the field's name nor the error says it could be a secret (an unknown field's
    value never is shown: a misspelled secret key is still a secret); URL credentials are redacted."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(spec)"
        got = e.get("input")
        hidden = (isinstance(got, (dict, list)) or got is None or e["type"] in ("missing", "extra_forbidden")
                  or any(is_secret_field(p) for p in e["loc"]))
        shown = "" if hidden else f" (got {redact(repr(got))[:80]})"
        lines.append(f"{loc}: {redact(e['msg'])}{shown}")
    return lines


def _yaml_problem(where: str, err: yaml.YAMLError) -> str:
    """A YAML error by position and kind, never with the offending text (it may be a secret's line)."""
    mark = getattr(err, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(err, "problem", None) or type(err).__name__
    return f"{where}: not valid YAML{at} ({problem})"


def load_spec(schema: type[Model], path: str | Path | None = None, overrides: list[str] = ()) -> Model:
    """Read a YAML spec (or start empty), apply overrides, validate. Raises SpecError."""
    data: dict = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_SPEC_BYTES + 1)
        except FileNotFoundError:
            raise SpecError([f"{path}: no such spec file"]) from None
        if len(raw) > MAX_SPEC_BYTES:
            raise SpecError([f"{path}: larger than {MAX_SPEC_BYTES} bytes; a spec is a page of settings"])
        try:
            loaded = read_yaml(raw.decode("utf-8"), str(path))
        except UnicodeDecodeError:
            raise SpecError([f"{path}: not UTF-8 text"]) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise SpecError([f"{path}: the spec must be a mapping of fields"])
        data = loaded or {}
    problems = []
    for text in overrides:
        try:
            apply_override(data, *parse_override(text), schema=schema)
        except SpecError as err:
            problems += err.problems
    if problems:
        raise SpecError(problems)
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise SpecError(_problem_lines(err)) from None


def spec_from_args(schema: type[Model], argv: list[str], prog: str, default: str | None = None) -> Model:
    """`prog [SPEC.yaml] [--set a.b=v ...]` -> a validated spec; on any problem print one line per
    wrong field to stderr and exit with status 2."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog=prog, description=f"Run from a {schema.__name__} (YAML).")
    parser.add_argument("spec", nargs="?", default=default, help=f"spec file (default: {default})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        return load_spec(schema, args.spec, args.overrides)
    except SpecError as err:
        for line in err.problems:
            print(f"{prog}: {line}", file=sys.stderr)
        raise SystemExit(2) from None
