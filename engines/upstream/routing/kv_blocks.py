"""The gateway's own key of a KV-cache block: one rule for the request's blocks and for the
blocks a worker reports holding.

Why not the worker's own block hashes: vLLM chains them from `NONE_HASH`, a random 32-byte
seed drawn at start unless `PYTHONHASHSEED` is set (`vllm/v1/core/kv_cache_utils.py`:
`init_none_hash`), through sha256 of a pickle (or CBOR) of `(parent, token ids, extra
keys)`; a gateway cannot reproduce that, and a restarted worker changes it. But its
`BlockStored` events carry the token ids, the parent hash and the extra keys, so the index
re-keys every block by this module's rule (llm-d's precise prefix-cache scorer does the
same) and keeps the worker's hashes only to follow parents and removals.

The rule, for blocks of `block_size` tokens (only full blocks, as vLLM caches):

    c_i   = mix64(Σ_k tokens_i[k] × MUL[k])                 content of block i (mod 2^64)
    seed  = stable hash of the first block's extra keys     (LoRA name, then cache_salt:
                                                             vLLM's order; 0 without any)
    key_i = key_{i-1} × R + c_i      (key_{-1} = seed)      the chain: block i's key
                                                             depends on all blocks before

`mix64` is splitmix64's finaliser; `MUL` are odd constants drawn once from splitmix64, so
every gateway process computes the same keys. Extra keys beyond LoRA and the salt
(multimodal hashes, prompt embeddings) perturb that block's content, so such blocks never
match a text request. A collision costs a cache miss, never a wrong answer: routing only.

Why this shape: the request side computes every key with numpy in a few vector operations
(`key_i = R^i (seed·R + Σ_{j≤i} c_j R^{-j})`, one cumulative sum), measured 50 µs for
512 blocks on the 2-core dev box against 260 µs for a Python loop of tuple hashes
(docs/benchmarks.md, "KV-cache routing"); the index side, off the request path, follows
the chain block by block in Python from the parent it knows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["BlockHasher", "extra_seed"]

MASK = (1 << 64) - 1
_R = 0x9E3779B97F4A7C15  # odd: invertible mod 2^64
_R_INV = pow(_R, -1, 1 << 64)
_U = np.uint64
U64 = npt.NDArray[np.uint64]


def _splitmix(n: int, state: int = 0x243F6A8885A308D3) -> list[int]:
    out = []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & MASK
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        out.append((z ^ (z >> 31)) | 1)
    return out


def _mix(x: U64) -> U64:
    """splitmix64's finaliser, element-wise (uint64 arithmetic wraps mod 2^64)."""
    x = x ^ (x >> _U(30))
    x = x * _U(0xBF58476D1CE4E5B9)
    x = x ^ (x >> _U(27))
    x = x * _U(0x94D049BB133111EB)
    return x ^ (x >> _U(31))


def extra_seed(extra: Sequence[Any] | None) -> int:
    """The chain's start for a first block with these extra keys (0 for none)."""
    if not extra:
        return 0
    text = "\x1f".join(e.hex() if isinstance(e, bytes) else repr(e) for e in extra)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class BlockHasher:
    """Keys of full blocks of `block_size` tokens (module docstring)."""

    def __init__(self, block_size: int = 16, max_blocks: int = 1 << 14) -> None:
        self.block_size = block_size
        self._mul = np.array(_splitmix(block_size), dtype=np.uint64)
        self._grow(max_blocks)

    def _grow(self, n: int) -> None:
        r = np.empty(n, dtype=np.uint64)
        rinv = np.empty(n, dtype=np.uint64)
        a = b = 1
        for i in range(n):
            r[i], rinv[i] = a, b
            a, b = (a * _R) & MASK, (b * _R_INV) & MASK
        self._r, self._rinv = r, rinv

    def contents(self, tokens: npt.ArrayLike) -> U64:
        """c_i of every full block of `tokens` (a trailing partial block is ignored)."""
        arr = np.asarray(tokens, dtype=np.uint64)
        n = arr.shape[0] // self.block_size
        blocks = arr[: n * self.block_size].reshape(n, self.block_size)
        with np.errstate(over="ignore"):
            return _mix(blocks @ self._mul)

    def keys(self, tokens: npt.ArrayLike, seed: int = 0) -> list[int]:
        """key_i of every full block, the chain started from `seed`."""
        c = self.contents(tokens)
        n = c.shape[0]
        if n == 0:
            return []
        if n > self._r.shape[0]:
            self._grow(max(n, 2 * self._r.shape[0]))
        with np.errstate(over="ignore"):
            s = np.cumsum(c * self._rinv[:n], dtype=np.uint64)
            s += _U((seed * _R) & MASK)
            keys: list[int] = (s * self._r[:n]).tolist()
        return keys

    @staticmethod
    def step(parent: int, content: int) -> int:
        """key_i from key_{i-1} and c_i (the index's block-by-block form)."""
        return (parent * _R + content) & MASK
