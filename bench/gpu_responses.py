"""The Responses API on the GPU (issue 22's H200 bar): the official openai SDK's cases through
the gateway in front of two vLLM replicas of one model. Runs ON the GPU machine after
../shared/gpu/device-setup.sh (as bench/gpu_kv_routing.py does):

    PYTHONPATH=. python3 bench/gpu_responses.py --out "$OUT" --deadline EPOCH_S
    .venv/bin/python bench/gpu_responses.py --dry-run --out /tmp/rgpu   # here, no GPU

One model, `smol` (engine vllm, /root/smol, `replicas: 2` on GPU 0, 0.4 of its memory
each, greedy by default). The cases, each recorded ok or its error in results.json under
`responses`: plain text; instructions with message input; a stream whose events come in
order with sequence numbers and whose final response equals its deltas; a required
function call with JSON arguments (vLLM answers `tool_choice: "required"` by structured
output); a two-turn chain with `previous_response_id`, then `retrieve` and `input_items`;
an unknown model → `NotFoundError`; `/tokenize` relayed to a worker, its count equal to a
chat request's billed prompt tokens. The access log (gateway.log) says which worker
answered each request: `workers_per_request` lists them, so turn 2 on the other replica
shows. The dry run serves `smol` from two simulator replicas instead (`engine: sim`),
where the function-call case fails by design (the simulator never calls a tool).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_proof import Proof, log

WEATHER: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}


def models_yaml(dry_run: bool) -> dict[str, Any]:
    smol: dict[str, Any] = {
        "name": "smol",
        "max_model_len": 2048,
        "replicas": 2,
        "request_defaults": {"temperature": 0},
    }
    if dry_run:
        smol.update({"engine": "sim", "options": {"ttft_ms": 20, "itl_ms": 3}})
    else:
        smol.update(
            {
                "engine": "vllm",
                "model": "/root/smol",
                # vLLM answers tool_choice "required" only with a tool-call parser set.
                "engine_args": {"enable-auto-tool-choice": True, "tool-call-parser": "hermes"},
                "options": {
                    "gpu_ids": [0, 0],
                    "gpu_memory_share": 0.4,
                    "start_timeout_s": 420,
                    "stop_grace_s": 10,
                    "env": {"VLLM_USE_FLASHINFER_SAMPLER": "0"},
                },
            }
        )
    return {"models": [smol]}


class GpuResponses(Proof):
    def prepare(self) -> Path:
        cfg = models_yaml(self.args.dry_run)
        if not self.args.dry_run and shutil.which("vllm") is None:
            cfg["models"][0]["options"]["command"] = [
                sys.executable,
                "-m",
                "vllm.entrypoints.cli.main",
            ]
        self.models = [m["name"] for m in cfg["models"]]
        path = self.work / "models.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.results["models_yaml"] = path.read_text()
        return path

    def cases(self) -> None:
        import openai

        c = self.client()
        out: dict[str, Any] = {}
        self.results["responses"] = out

        def case(name: str, fn: Any) -> None:
            try:
                out[name] = {"ok": True, **(fn() or {})}
            except Exception as exc:  # recorded; the next case runs
                out[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:800]}
            log(f"{name}: {out[name]}")

        def plain() -> dict[str, Any]:
            r = c.responses.create(model="smol", input="What is the capital of France?")
            assert r.status in ("completed", "incomplete") and r.output_text, r
            assert r.usage is not None
            return {"text": r.output_text, "usage": r.usage.model_dump()}

        def instructions() -> dict[str, Any]:
            r = c.responses.create(
                model="smol",
                instructions="Answer in one short sentence.",
                input=[
                    {"role": "user", "content": [{"type": "input_text", "text": "Who are you?"}]}
                ],
                max_output_tokens=40,
            )
            assert r.output_text and r.instructions == "Answer in one short sentence."
            return {"text": r.output_text}

        def stream() -> dict[str, Any]:
            events = list(
                c.responses.create(
                    model="smol", input="Count from one to five.", max_output_tokens=40, stream=True
                )
            )
            kinds = [e.type for e in events]
            assert [e.sequence_number for e in events] == list(range(len(events)))
            assert kinds[:2] == ["response.created", "response.in_progress"], kinds[:4]
            assert kinds[-1] in ("response.completed", "response.incomplete"), kinds[-4:]
            deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
            final = events[-1].response
            assert final.output_text == deltas
            return {"events": len(events), "first_kinds": kinds[:5], "text": deltas}

        def function_call() -> dict[str, Any]:
            r = c.responses.create(
                model="smol",
                input="What is the weather like in Paris right now?",
                tools=[WEATHER],
                tool_choice="required",
                max_output_tokens=80,
            )
            calls = [i for i in r.output if i.type == "function_call"]
            assert calls, r.output
            args = json.loads(calls[0].arguments)
            assert calls[0].name == "get_weather" and isinstance(args, dict)
            return {"name": calls[0].name, "arguments": args}

        def chain() -> dict[str, Any]:
            first = c.responses.create(model="smol", input="My name is Ada.", max_output_tokens=24)
            second = c.responses.create(
                model="smol",
                input="What is my name?",
                previous_response_id=first.id,
                max_output_tokens=24,
            )
            got = c.responses.retrieve(second.id)
            assert got.id == second.id and got.output_text == second.output_text
            items = c.responses.input_items.list(second.id, order="asc").data
            assert [getattr(i, "role", None) for i in items] == ["user", "assistant", "user"]
            assert first.usage is not None and second.usage is not None
            assert second.usage.input_tokens > first.usage.input_tokens
            return {"turn2": second.output_text, "ids": [first.id, second.id]}

        def unknown_model() -> dict[str, Any]:
            try:
                c.responses.create(model="no-such-model", input="hi")
            except openai.NotFoundError as e:
                return {"status": e.status_code}
            raise AssertionError("no NotFoundError")

        def tokenize() -> dict[str, Any]:
            messages = [{"role": "user", "content": "What is the capital of France?"}]
            status, _, raw = self.http("POST", "/tokenize", {"model": "smol", "messages": messages})
            assert status == 200, raw[:300]
            count = json.loads(raw)["count"]
            chat = c.chat.completions.create(model="smol", messages=messages, max_tokens=1)
            assert chat.usage is not None
            return {"count": count, "chat_prompt_tokens": chat.usage.prompt_tokens}

        for name, fn in (
            ("plain", plain),
            ("instructions", instructions),
            ("stream", stream),
            ("function_call", function_call),
            ("chain", chain),
            ("unknown_model", unknown_model),
            ("tokenize", tokenize),
        ):
            case(name, fn)
        workers = []
        for line in self._gw_log_lines():
            if '"route":"responses"' in line:
                try:
                    workers.append(json.loads(line[line.index("{") :]).get("worker"))
                except ValueError:
                    continue
        self.results["workers_per_request"] = workers

    def run(self) -> int:
        cfg = self.step("prepare config", self.prepare)
        if cfg is None:
            self.collect()
            return 1
        self.step("gateway check", self.check, cfg)
        try:
            self.step("start gateway", self.start_gateway, cfg)
            if not self.results["steps"]["start gateway"]["ok"]:
                return 1
            self.step("cases", self.cases)
            return 0
        finally:
            self.step("stop", self.stop_gateway)
            self.collect()
            for name, r in (self.results.get("responses") or {}).items():
                print(f"{name:15s} {'ok' if r['ok'] else 'FAILED: ' + r['error']}")
            print("workers per request:", self.results.get("workers_per_request"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu-responses-out"))
    ap.add_argument("--work", help="scratch directory (default: a new temp dir)")
    ap.add_argument("--deadline", type=float, help="epoch seconds by which to be done")
    ap.add_argument("--budget-s", type=float, default=560.0, help="without --deadline")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--ready-timeout-s", type=float, default=330.0)
    ap.add_argument("--dry-run", action="store_true", help="simulators instead of vLLM")
    return GpuResponses(ap.parse_args()).run()


if __name__ == "__main__":
    sys.exit(main())
