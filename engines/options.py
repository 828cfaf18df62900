"""Engine `options:` typed one way: a pydantic model per engine, errors as key paths.

Owns `EngineOptions` (the base every engine's options model extends: unknown keys refused,
values frozen) and `options_issues`, which turns a model's validation errors into
`SpecIssue`s under `options.<key>` — the same key paths `gateway check` prints for every
other section of models.yaml. Does not own any engine's keys: each engine declares its
model next to its code (`engines.upstream.options`, `engines.launch.command`,
`engines.sim`, `engines.local`).
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from engines.spec import ModelSpec, SpecIssue

__all__ = ["EngineOptions", "options_issues", "parse_options"]

OptionsT = TypeVar("OptionsT", bound="EngineOptions")


class EngineOptions(BaseModel):
    """Base of every engine's `options:` model. A typo must be an error, not a no-op."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_options(spec: ModelSpec, model: type[OptionsT]) -> OptionsT:
    """`spec.options` as `model` (call after `options_issues` found nothing)."""
    return model.model_validate(spec.options)


def options_issues(spec: ModelSpec, model: type[EngineOptions]) -> list[SpecIssue]:
    """Every problem of `spec.options` against `model`, as `options.<key>` SpecIssues."""
    try:
        model.model_validate(spec.options)
    except ValidationError as exc:
        known = ", ".join(sorted(model.model_fields))
        out = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                msg = f"unknown option; known: {known}"
            else:
                msg = err["msg"]
            out.append(SpecIssue(path=f"options.{loc}" if loc else "options", message=msg))
        return out
    return []
