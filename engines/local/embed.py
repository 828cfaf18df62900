"""Sentence embeddings for the embedded engine (`task: embed`), e.g. all-MiniLM-L6-v2.

Owns: loading an encoder checkpoint and reproducing sentence-transformers' pipeline from
the checkpoint's own files (`modules.json`, `1_Pooling/config.json`,
`sentence_bert_config.json`): the transformer, then mean / CLS / max pooling over real
tokens, then L2 normalisation when a `Normalize` module is listed. sentence-transformers
itself is deliberately not a dependency: this is the whole of what it does here.
Does not own the OpenAI response shape (`engines.local.shapes`) or request validation
(`engines.local.engine`).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel, AutoTokenizer

from engines.base import InvalidRequest

__all__ = ["Embedder"]

_BATCH = 32  # inputs per forward; sorted by length so padding stays small


class Embedder:
    def __init__(self, path: str, device: torch.device) -> None:
        self.device = device
        self.tokenizer: Any = AutoTokenizer.from_pretrained(path)
        self.model: Any = AutoModel.from_pretrained(path, dtype=torch.float32).to(device).eval()
        root = Path(path)
        pooling = _read_json(root / "1_Pooling" / "config.json")
        self.pooling = (
            "cls"
            if pooling.get("pooling_mode_cls_token")
            else "max"
            if pooling.get("pooling_mode_max_tokens")
            else "mean"
        )
        modules = _read_json(root / "modules.json", default=[])
        self.normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
        if not (root / "modules.json").exists():
            self.normalize = True  # a bare encoder: unit vectors are what clients expect
        sbert = _read_json(root / "sentence_bert_config.json")
        limits = [
            int(sbert.get("max_seq_length", 10**9)),
            int(getattr(self.model.config, "max_position_embeddings", 10**9)),
            int(getattr(self.tokenizer, "model_max_length", 10**9) or 10**9),
        ]
        self.max_tokens = min(limits)
        self.dimensions = int(
            pooling.get("word_embedding_dimension", self.model.config.hidden_size)
        )
        # The special tokens the tokenizer wraps one text in (BERT: [CLS] … [SEP]), learnt
        # from a probe: token-id inputs get the same, as they would from the text.
        # (transformers 5 dropped `build_inputs_with_special_tokens`, which did this.)
        self._prefix, self._suffix = _special_wrap(self.tokenizer)
        self._lock = threading.Lock()  # one forward at a time: they share the cores anyway

    def tokenize(self, inputs: list[str] | list[list[int]]) -> list[list[int]]:
        """Token ids with special tokens, for strings or token-id lists (OpenAI's input
        forms), refusing out-of-range ids and any input longer than the model takes."""
        if all(isinstance(x, str) for x in inputs):
            ids: list[list[int]] = self.tokenizer(list(inputs), add_special_tokens=True)[
                "input_ids"
            ]
        else:
            vocab = len(self.tokenizer)
            ids = []
            for i, one in enumerate(inputs):
                if not isinstance(one, list) or not all(
                    isinstance(t, int) and not isinstance(t, bool) for t in one
                ):
                    raise InvalidRequest(
                        f"input[{i}]: expected a string or a list of token ids (not mixed)",
                        param="input",
                    )
                if not one:
                    raise InvalidRequest(f"input[{i}] is empty", param="input")
                bad = next((t for t in one if not 0 <= t < vocab), None)
                if bad is not None:
                    raise InvalidRequest(
                        f"input[{i}]: token id {bad} is out of range [0, {vocab})", param="input"
                    )
                ids.append(self._prefix + one + self._suffix)
        for i, one in enumerate(ids):
            if len(one) > self.max_tokens:
                raise InvalidRequest(
                    f"input[{i}] has {len(one)} tokens; this model takes at most {self.max_tokens}",
                    param="input",
                )
        return ids

    def embed(self, ids: list[list[int]]) -> torch.Tensor:
        """[len(ids), dimensions] float32, in input order. Blocking: run in a thread."""
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = torch.empty((len(ids), self.dimensions), dtype=torch.float32)
        pad = int(self.tokenizer.pad_token_id or 0)
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), _BATCH):
                chunk = order[start : start + _BATCH]
                width = max(len(ids[i]) for i in chunk)
                tok = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, i in enumerate(chunk):
                    tok[r, : len(ids[i])] = torch.tensor(ids[i])
                    mask[r, : len(ids[i])] = 1
                hidden = self.model(
                    input_ids=tok.to(self.device), attention_mask=mask.to(self.device)
                ).last_hidden_state.float()
                vec = self._pool(hidden, mask.to(self.device))
                if self.normalize:
                    vec = torch.nn.functional.normalize(vec, p=2, dim=1)
                out[torch.tensor(chunk)] = vec.cpu()
        return out

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "max":
            return hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


def _special_wrap(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(prefix, suffix) ids the tokenizer adds around a single sequence."""
    probe = "hello"
    bare: list[int] = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full: list[int] = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    return [], []


def _read_json(path: Path, default: Any = None) -> Any:
    if not path.exists():
        return {} if default is None else default
    with open(path, encoding="utf-8") as f:
        return json.load(f)
