"""`gateway eval`: score one or more served models (or adapters) on a JSONL task set
through an OpenAI-compatible URL, and put them side by side.

Owns: reading and checking a task file, rendering each item to a chat request, running the
requests with bounded concurrency and a progress bar, scoring the answers
(`pipeline.metrics`), the JSON report and the side-by-side table. Does not own the metric
definitions (`pipeline.metrics`) or serving (any OpenAI-compatible server, usually the
gateway).

Task file: one JSON object per line.

    {"id": "cap-fr", "type": "exact", "prompt": "…", "answer": "Paris"}
    {"id": "mc-1", "type": "choice", "prompt": "…", "choices": ["…", "…"], "answer": "B"}
    {"id": "sum-1", "type": "generate", "prompt": "…", "answer": ["reference", "…"]}

`answer` is a string or a list of accepted strings (choice: the letter). Optional:
`system` (a system message) and `max_tokens` (default 32 exact, 8 choice, 96 generate).
A choice item's user message is the prompt, then one line per choice ("A. …"), then
"Answer with the letter only." (`render`). Every request is greedy (temperature 0).
Scores: exact items give exact match and "contains" (the answer appears in a longer
reply), choice items accuracy, generate items ROUGE-L (mean) and corpus BLEU (definitions
in `pipeline.metrics`).
A request that fails counts as a wrong answer and is listed under `errors`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import metrics

__all__ = ["EvalError", "Item", "evaluate", "load_tasks", "render", "table"]

KINDS = ("exact", "choice", "generate")
DEFAULT_MAX_TOKENS = {"exact": 32, "choice": 8, "generate": 96}
CHOICE_SUFFIX = "Answer with the letter only."


class EvalError(ValueError):
    """A task file or argument the evaluation cannot use (message says which line)."""


@dataclass(frozen=True, slots=True)
class Item:
    id: str
    kind: str
    prompt: str
    answers: tuple[str, ...]
    choices: tuple[str, ...] = ()
    system: str | None = None
    max_tokens: int = 32


def load_tasks(path: Path) -> list[Item]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise EvalError(f"cannot read task file {path}: {e.strerror or e}") from e
    items: list[Item] = []
    seen: set[str] = set()
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{no}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise EvalError(f"{where}: not JSON ({e})") from e
        if not isinstance(obj, dict):
            raise EvalError(f"{where}: each line must be a JSON object")
        kind = obj.get("type", "exact")
        if kind not in KINDS:
            raise EvalError(f"{where}: type must be one of {', '.join(KINDS)}, got {kind!r}")
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise EvalError(f"{where}: prompt must be a non-empty string")
        ans = obj.get("answer")
        answers = [ans] if isinstance(ans, str) else ans
        if (
            not isinstance(answers, list)
            or not answers
            or not all(isinstance(a, str) for a in answers)
        ):
            raise EvalError(f"{where}: answer must be a string or a list of strings")
        choices = obj.get("choices", [])
        if kind == "choice":
            if (
                not isinstance(choices, list)
                or not 2 <= len(choices) <= 26
                or not all(isinstance(c, str) and c for c in choices)
            ):
                raise EvalError(f"{where}: a choice item needs 2-26 non-empty choices")
            letters = [chr(ord("A") + i) for i in range(len(choices))]
            if len(answers) != 1 or answers[0] not in letters:
                raise EvalError(f"{where}: answer must be one of the letters {letters}")
        elif choices:
            raise EvalError(f"{where}: choices only go with type choice")
        item_id = str(obj.get("id", f"line{no}"))
        if item_id in seen:
            raise EvalError(f"{where}: duplicate id {item_id!r}")
        seen.add(item_id)
        mt = obj.get("max_tokens", DEFAULT_MAX_TOKENS[kind])
        if not isinstance(mt, int) or isinstance(mt, bool) or not 1 <= mt <= 4096:
            raise EvalError(f"{where}: max_tokens must be an integer in 1..4096")
        system = obj.get("system")
        if system is not None and not isinstance(system, str):
            raise EvalError(f"{where}: system must be a string")
        items.append(Item(item_id, kind, prompt, tuple(answers), tuple(choices), system, mt))
    if not items:
        raise EvalError(f"{path}: no items")
    return items


def render(item: Item) -> list[dict[str, str]]:
    """The chat messages sent for one item."""
    text = item.prompt
    if item.kind == "choice":
        lines = [f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(item.choices)]
        text = "\n".join([item.prompt, *lines, CHOICE_SUFFIX])
    msgs = [{"role": "system", "content": item.system}] if item.system else []
    return [*msgs, {"role": "user", "content": text}]


def score_item(item: Item, prediction: str) -> dict[str, Any]:
    if item.kind == "exact":
        return {
            "exact_match": metrics.exact_match(prediction, item.answers),
            "contains": metrics.contains(prediction, item.answers),
        }
    if item.kind == "choice":
        picked = metrics.pick_choice(prediction, item.choices)
        return {"picked": picked, "correct": 1.0 if picked == item.answers[0] else 0.0}
    return {"rouge_l": metrics.rouge_l(prediction, item.answers)}


def summarise(items: Sequence[Item], rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per metric: the mean over its items (BLEU: corpus BLEU over the generate items)."""
    by_kind: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    for item, row in zip(items, rows, strict=True):
        by_kind[item.kind].append(row)
    out: dict[str, Any] = {}
    if by_kind["exact"]:
        r = by_kind["exact"]
        out["exact_match"] = sum(x["exact_match"] for x in r) / len(r)
        out["contains"] = sum(x["contains"] for x in r) / len(r)
    if by_kind["choice"]:
        r = by_kind["choice"]
        out["choice_accuracy"] = sum(x["correct"] for x in r) / len(r)
    if by_kind["generate"]:
        r = by_kind["generate"]
        out["rouge_l"] = sum(x["rouge_l"] for x in r) / len(r)
        gen = [i for i in items if i.kind == "generate"]
        out["bleu"] = metrics.corpus_bleu([x["prediction"] for x in r], [i.answers for i in gen])
    out["counts"] = {k: len(v) for k, v in by_kind.items() if v}
    return out


@dataclass
class _Run:
    model: str
    rows: list[dict[str, Any]] = field(default_factory=list)


async def _ask(
    client: Any, model: str, item: Item, sem: asyncio.Semaphore, timeout_s: float
) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": render(item),
        "max_tokens": item.max_tokens,
        "temperature": 0,
    }
    async with sem:
        t0 = time.perf_counter()
        try:
            resp = await client.post("/v1/chat/completions", json=body, timeout=timeout_s)
        except Exception as e:  # network errors: recorded, scored as wrong
            return {"id": item.id, "prediction": "", "error": f"{type(e).__name__}: {e}"}
        took = time.perf_counter() - t0
    if resp.status_code != 200:
        try:
            msg = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = resp.text[:300]
        return {"id": item.id, "prediction": "", "error": f"HTTP {resp.status_code}: {msg}"}
    data = resp.json()
    text = data["choices"][0]["message"].get("content") or ""
    usage = data.get("usage") or {}
    return {
        "id": item.id,
        "prediction": text,
        "latency_s": round(took, 4),
        "completion_tokens": usage.get("completion_tokens"),
    }


async def evaluate(
    base_url: str,
    models: Sequence[str],
    items: Sequence[Item],
    *,
    concurrency: int = 8,
    api_key: str | None = None,
    timeout_s: float = 120.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every item against every model; the report `gateway eval --json` writes."""
    import httpx
    from tqdm import tqdm

    if concurrency < 1:
        raise EvalError("--concurrency must be at least 1")
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    report: dict[str, Any] = {
        "base_url": base_url,
        "items": len(items),
        "concurrency": concurrency,
        "models": {},
    }
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=base_url.rstrip("/"), headers=headers, limits=limits
    ) as client:
        for model in models:
            sem = asyncio.Semaphore(concurrency)
            bar = tqdm(total=len(items), desc=model, unit="item", disable=not progress, leave=True)
            t0 = time.perf_counter()

            async def one(
                item: Item, model: str = model, bar: Any = bar, sem: Any = sem
            ) -> dict[str, Any]:
                row = await _ask(client, model, item, sem, timeout_s)
                bar.update(1)
                return row

            rows = await asyncio.gather(*(one(i) for i in items))
            bar.close()
            wall = time.perf_counter() - t0
            for item, row in zip(items, rows, strict=True):
                row.update(score_item(item, row["prediction"]))
            scores = summarise(items, rows)
            lat = [r["latency_s"] for r in rows if "latency_s" in r]
            report["models"][model] = {
                "scores": scores,
                "errors": [r for r in rows if "error" in r],
                "wall_s": round(wall, 3),
                "mean_latency_s": round(sum(lat) / len(lat), 4) if lat else None,
                "completion_tokens": sum(r.get("completion_tokens") or 0 for r in rows),
                "results": rows,
            }
    return report


_METRICS = ("exact_match", "contains", "choice_accuracy", "rouge_l", "bleu")


def table(report: dict[str, Any]) -> str:
    """Metrics down, models across; after the first model each value carries its difference
    from the first (what a quantized checkpoint or an adapter changed)."""
    names = list(report["models"])
    runs = [report["models"][n] for n in names]
    first = runs[0]["scores"]
    counts = first.get("counts", {})
    label_n = {
        "exact_match": "exact",
        "contains": "exact",
        "choice_accuracy": "choice",
        "rouge_l": "generate",
        "bleu": "generate",
    }
    rows: list[list[str]] = [["metric", *names]]
    for m in _METRICS:
        if m not in first:
            continue
        row = [f"{m} (n={counts.get(label_n[m], 0)})"]
        for k, run in enumerate(runs):
            v = run["scores"].get(m)
            cell = "-" if v is None else f"{v:.3f}"
            if k and v is not None and first.get(m) is not None:
                cell += f" ({v - first[m]:+.3f})"
            row.append(cell)
        rows.append(row)
    rows.append(["errors", *(str(len(r["errors"])) for r in runs)])
    rows.append(
        [
            "mean latency s",
            *("-" if r["mean_latency_s"] is None else f"{r['mean_latency_s']:.3f}" for r in runs),
        ]
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
