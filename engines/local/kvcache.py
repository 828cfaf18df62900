"""The embedded engine's KV cache storage: layers that grow in place, and left padding.

Owns: `RoomyLayer`, a transformers cache layer that keeps room to spare along the
sequence so decode steps write in place, `new_cache()` building a `DynamicCache` of them,
and `pad_left` for merging caches of different widths. Does not own which rows are in
the batch or when they are merged or dropped (`engines.local.batcher`).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

__all__ = ["RoomyLayer", "new_cache", "pad_left"]


class RoomyLayer(DynamicLayer):  # type: ignore[no-untyped-call]
    """A cache layer whose keys/values are views into buffers with room to spare along the
    sequence, so a decode step writes its one new position in place. `DynamicLayer` grows
    by `torch.cat`, copying the whole cache every step: `aten::cat` was ~10% of a step's
    CPU time at 8 rows × 100 positions (torch.profiler, fp32, SmolLM2-135M, 2 cores)."""

    _kb: torch.Tensor | None = None
    _vb: torch.Tensor | None = None
    _n = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._kb = self._vb = None
            self._n = 0
        end = self._n + key_states.shape[-2]
        kb, vb = self._kb, self._vb
        if kb is None or vb is None or end > kb.shape[-2]:
            kb, vb = self._regrow(key_states, end)
        kb[:, :, self._n : end].copy_(key_states)
        vb[:, :, self._n : end].copy_(value_states)
        self._n = end
        self.keys, self.values = kb[:, :, :end], vb[:, :, :end]
        return self.keys, self.values

    def _regrow(self, like: torch.Tensor, need: int) -> tuple[torch.Tensor, torch.Tensor]:
        cap = need + max(32, need // 2)
        b, h, _, d = like.shape
        kb = like.new_empty((b, h, cap, d))
        vb = like.new_empty((b, h, cap, d))
        if self._n and self.keys is not None and self.values is not None:
            kb[:, :, : self._n].copy_(self.keys)
            vb[:, :, : self._n].copy_(self.values)
        self._kb, self._vb = kb, vb
        return kb, vb

    def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """New contents after cache surgery (rows merged or dropped); room is added lazily."""
        self.keys, self.values = keys, values
        self._kb = self._vb = None
        self._n = keys.shape[-2]


def new_cache() -> DynamicCache:
    cache = DynamicCache()
    cache.layer_class_to_replicate = RoomyLayer
    return cache


def pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Left-pad `t` with zeros along `dim` up to `width` (padding is masked out anyway)."""
    short = width - t.shape[dim]
    if short <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = short
    return torch.cat([t.new_zeros(shape), t], dim=dim)
