"""models.yaml: load it, validate it, and say exactly where it is wrong.

Owns the file format (a top-level `models:` list of `engines.spec.ModelSpec`), the
cross-model rules (unique names for models and adapters), asking each engine what it
refuses, and rendering every problem as `models[2].speculative.num_speculative_tokens:
must be ≥ 1`. It does not start engines (`gateway.served` does) nor define a model's fields
(`engines.spec` does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engines import engine_class
from engines.spec import ModelSpec, SpecIssue


class CatalogError(Exception):
    """models.yaml is invalid; `problems` holds one `path: message` line each."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source} is invalid:\n" + "\n".join(f"  {p}" for p in problems))


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: list[dict[str, Any]] = Field(min_length=1)


@dataclass(frozen=True)
class Catalog:
    models: list[ModelSpec]
    # Directory of the file: relative model and adapter paths resolve against it.
    base_dir: Path


def _path(loc: tuple[int | str, ...], prefix: str = "") -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w.\[\]]*): (.*)$", re.S)


def _message(err: Any) -> tuple[str, str]:
    """A pydantic error → (extra path, human message) in models.yaml's terms."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "missing":
        return "", "required"
    if kind == "extra_forbidden":
        return "", "unknown key"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        sym = {
            "greater_than_equal": "≥",
            "greater_than": ">",
            "less_than_equal": "≤",
            "less_than": "<",
        }[kind]
        bound = next(iter(ctx.values()), "?")
        return "", f"must be {sym} {bound}"
    if kind == "literal_error":
        return "", f"must be one of {ctx.get('expected', '')}"
    if kind == "value_error":
        msg = str(ctx.get("error", err["msg"]))
        m = _FIELD_PREFIX.match(msg)
        return (m.group(1), m.group(2)) if m else ("", msg)
    return "", str(err["msg"]).lower()


def _join(base: str, extra: str) -> str:
    if not extra:
        return base
    return f"{base}{extra}" if extra.startswith("[") else f"{base}.{extra}"


def parse_catalog(
    data: Any,
    *,
    source: str = "models.yaml",
    base_dir: Path | None = None,
    check_engines: bool = True,
) -> Catalog:
    """Validate already-parsed YAML; raise CatalogError listing every problem."""
    problems: list[str] = []
    try:
        raw = _File.model_validate(data)
    except ValidationError as e:
        for err in e.errors():
            extra, msg = _message(err)
            problems.append(f"{_join(_path(err['loc']), extra) or '(top level)'}: {msg}")
        raise CatalogError(source, problems) from None

    specs: list[ModelSpec] = []
    for i, entry in enumerate(raw.models):
        prefix = f"models[{i}]"
        try:
            spec = ModelSpec.model_validate(entry)
        except ValidationError as e:
            for err in e.errors():
                extra, msg = _message(err)
                problems.append(f"{_join(_path(err['loc'], prefix), extra)}: {msg}")
            continue
        if check_engines:
            issues: list[SpecIssue] = engine_class(spec.engine).check_spec(spec)
            problems.extend(f"{_join(prefix, x.path)}: {x.message}" for x in issues)
        specs.append(spec)

    seen: dict[str, str] = {}
    for i, spec in enumerate(specs):
        names = [(f"models[{i}].name", spec.name)]
        if spec.lora:
            names += [
                (f"models[{i}].lora.adapters[{j}].name", a.name)
                for j, a in enumerate(spec.lora.adapters)
            ]
        for where, name in names:
            if name in seen:
                problems.append(f"{where}: {name!r} is already used at {seen[name]}")
            else:
                seen[name] = where
    if problems:
        raise CatalogError(source, problems)
    return Catalog(models=specs, base_dir=base_dir or Path.cwd())


def load_catalog(path: Path, *, check_engines: bool = True) -> Catalog:
    try:
        text = path.read_text()
    except OSError as e:
        raise CatalogError(str(path), [f"cannot read: {e.strerror or e}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CatalogError(str(path), [f"not valid YAML: {e}"]) from None
    return parse_catalog(
        data, source=str(path), base_dir=path.resolve().parent, check_engines=check_engines
    )
