"""The `transformers` engine: a Hugging Face causal LM with continuous batching.

Design (measured with ``scripts/bench_engine.py``):

* One background thread owns the model. Each iteration it (1) drops aborted
  requests, (2) admits waiting requests into free batch slots and prefills them
  in ONE forward (new prompt tokens packed back to back, at most
  ``_PREFILL_TOKEN_BUDGET`` per iteration: longer prompts are prefilled in chunks
  across iterations; logits only at prompt ends), (3) runs ONE decode forward
  over all running sequences, then samples, detokenizes and hands the deltas to
  the asyncio side with a single ``call_soon_threadsafe`` per event loop.
  Cancelled requests leave the batch at the start of the next iteration.
* KV cache: per layer a pre-allocated ``[max_batch, kv_heads, capacity, head_dim]``
  tensor; a running sequence owns one row ("slot") and its tokens sit at
  positions ``0..len-1``. Rows are kept compact (0..n-1): when a sequence leaves,
  the last row moves into its hole, so a decode step attends over
  ``cache[:n, :, :T]`` with a per-row length mask. Capacity grows by doubling up
  to the context size.
* Prefix cache: keys/values of recent prompts are kept (LRU, ``_PREFIX_CACHE_BYTES``)
  and copied into the slot of a new prompt that starts the same way (the chat
  template's system preamble, resent conversation history): only the rest is
  prefilled. Its numbers can differ from a whole prefill's in the last bit, which
  bfloat16 GEMMs may turn into another greedy token in a near-tie (seen on an AMX
  host): greedy output is batch-invariant, not cache-invariant.
* Forward: for Llama-style models (llama, mistral, qwen2) a lean forward
  (:class:`_FastDecoder`) with fused q/k/v and gate/up GEMMs, checked against
  transformers' forward at start-up. Any other model runs transformers' own
  forward with attention swapped for :func:`_slot_attention` (registered with
  ``AttentionInterface``); it is called with ``use_cache=False`` and never sees
  a transformers cache.
* CPU weights: with ``DTYPE=auto`` (or ``float16``) the linear layers (lm_head
  included) keep float16 weights packed for fbgemm's fp16-weight/fp32-activation
  GEMM (2x faster than float32 GEMMs at decode batch sizes, float32
  accumulation; the default model comes from a 4-bit GGUF). On CPUs with native
  bf16 (AVX512-BF16, AMX) and ``DTYPE=auto``, prompt prefills run on a oneDNN
  bfloat16 copy instead (twice the multiply-adds per cycle); decode stays on
  fbgemm whatever the batch, so greedy output does not depend on the batch and a
  resumed stream continues exactly (:class:`_PackedLinear`). ``DTYPE=bfloat16`` runs the
  whole model in bfloat16. ``LOAD_IN_8BIT`` on CPU: torch dynamic int8 (per-channel).
  Intra-op threads: all cores but one (see :func:`_cpu_threads`); on 2 cores, two
  lanes split each batch instead (:func:`_cpu_lanes`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import importlib.util
import itertools
import logging
import math
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shared.settings import Settings
from worker.engines import hf_script
from worker.engines.base import (
    BURST_GAP_S,
    BURST_MAX_S,
    Delta,
    Engine,
    EngineRequestError,
    FinishReason,
    GenerationRequest,
    cpu_has_native_bf16,
)
from worker.engines.hf_loader import materialize

log = logging.getLogger(__name__)

SLOT_ATTENTION = "llm_serving_slots"
_GREEDY_TEMPERATURE = 1e-5
_TOP_P_CANDIDATES = 1024  # nucleus sampling looks at this many top tokens before falling back to a full sort
_PREFILL_TOKEN_BUDGET = 512  # prompt tokens per prefill forward; longer prompts are prefilled in chunks
_PREFIX_CACHE_BYTES = 128 * 2**20  # reusable prompt-prefix keys/values kept by the engine
_DETOK_CONTEXT = 6  # prompt tokens kept as decoding context (leading-space handling of sentencepiece)
_MAX_PENDING_TOKENS = 8  # tokens held back waiting for a multi-byte character to complete
_LANE_MIN_ROWS = 3  # a decode batch this big is split over the lanes (see _cpu_lanes)


# --------------------------------------------------------------------------------------------
# Attention over the slot cache
# --------------------------------------------------------------------------------------------

_local = threading.local()


class _SlotCache:
    """Per-layer key/value tensors ``[max_batch, kv_heads, capacity, head_dim]``, one row per sequence."""

    def __init__(self, layers: int, max_batch: int, kv_heads: int, head_dim: int, max_len: int, dtype, device):
        self.layers, self.max_batch, self.kv_heads, self.head_dim = layers, max_batch, kv_heads, head_dim
        self.max_len, self.dtype, self.device = max_len, dtype, device
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.ensure(min(256, max_len))

    def ensure(self, length: int) -> None:
        if length <= self.capacity:
            return
        if length > self.max_len:
            raise RuntimeError(f"sequence of {length} tokens exceeds the cache ({self.max_len})")
        new = self.capacity or 256
        while new < length:
            new *= 2
        new = min(self.max_len, -(-new // 64) * 64)
        shape = (self.max_batch, self.kv_heads, new, self.head_dim)
        ks, vs = [], []
        for i in range(self.layers):
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if self.capacity:
                k[:, :, : self.capacity].copy_(self.k[i])
                v[:, :, : self.capacity].copy_(self.v[i])
            ks.append(k)
            vs.append(v)
        self.k, self.v = ks, vs
        self.capacity = new

    def move_row(self, src: int, dst: int, length: int) -> None:
        for k, v in zip(self.k, self.v, strict=True):
            k[dst, :, :length].copy_(k[src, :, :length])
            v[dst, :, :length].copy_(v[src, :, :length])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class _Decode:
    """One decode step: row i holds its new token at position ``pos[i]``; keys up to ``kv_len``."""

    def __init__(self, cache: _SlotCache, pos: torch.Tensor, kv_len: int, dtype, first: int = 0):
        n = pos.shape[0]
        self.cache, self.pos, self.kv_len, self.first = cache, pos, kv_len, first
        self.rows = torch.arange(first, first + n, device=pos.device)
        visible = torch.arange(kv_len, device=pos.device)[None, :] <= pos[:, None]
        self.mask = torch.zeros(n, 1, 1, kv_len, dtype=dtype, device=pos.device)
        self.mask.masked_fill_(~visible[:, None, None, :], float("-inf"))
        # attend_flat works on [rows * kv_heads, ...] matrices (views of the cache: no copies)
        self.mask3 = self.mask.expand(n, cache.kv_heads, 1, kv_len).reshape(n * cache.kv_heads, 1, kv_len)
        self.span = slice(first, first + n)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, softcap) -> Any:
        n, hq, _, d = q.shape
        kvh = k.shape[1]
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        kc[self.rows, :, self.pos] = k[:, :, 0]
        vc[self.rows, :, self.pos] = v[:, :, 0]
        keys = kc[self.span, :, : self.kv_len]
        values = vc[self.span, :, : self.kv_len]
        # GQA without repeating keys: the query heads of one kv head form the "query length" dim.
        qg = q.reshape(n, kvh, hq // kvh, d)
        scores = torch.matmul(qg, keys.transpose(-1, -2))
        scores.mul_(scale)
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        scores.add_(self.mask)
        probs = torch.softmax(scores.float(), dim=-1).to(values.dtype)
        out = torch.matmul(probs, values)  # n, kvh, g, d
        return out.reshape(n, 1, hq, d)

    def attend_flat(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Any:
        """``q [n, heads, d]``, ``k``/``v`` ``[n, kv_heads, d]`` -> ``[n, heads * d]``, in 6 ops."""
        n, hq, d = q.shape
        kvh = k.shape[1]
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        kc[self.rows, :, self.pos] = k
        vc[self.rows, :, self.pos] = v
        keys = kc[self.span, :, : self.kv_len].reshape(n * kvh, self.kv_len, d)
        values = vc[self.span, :, : self.kv_len].reshape(n * kvh, self.kv_len, d)
        # GQA without repeating keys: the query heads of one kv head are the rows of one matrix.
        scores = torch.baddbmm(self.mask3, q.reshape(n * kvh, hq // kvh, d), keys.transpose(1, 2), alpha=scale)
        if scores.dtype != torch.float32:
            return torch.bmm(torch.softmax(scores.float(), -1).to(values.dtype), values).view(n, hq * d)
        return torch.bmm(torch.softmax(scores, -1), values).view(n, hq * d)


class _Prefill:
    """New tokens of several sequences packed into one row of the model input.

    Sequence i owns slot ``rows[i]``; its first ``cached[i]`` tokens are already in
    the slot (a reused prefix or an earlier chunk) and its ``new[i]`` tokens follow
    at positions ``cached[i]...``. Each new token attends to its own sequence only,
    causally: one attention call per sequence (a block-diagonal mask over the
    packed tokens costs ~7x more on CPU), or flash-attn's varlen kernel.
    """

    def __init__(self, cache: _SlotCache, rows: list[int], cached: list[int], new: list[int], flash: bool,
                 prompt: bool = True):
        self.cache, self.flash = cache, flash
        self.prompt = prompt  # False: a resumed stream's delivered tokens, recomputed with decode numerics
        device = cache.device
        self.q_rows = torch.tensor([r for r, n in zip(rows, new, strict=True) for _ in range(n)], device=device)
        self.q_pos = torch.cat([torch.arange(c, c + n) for c, n in zip(cached, new, strict=True)]).to(device)
        totals = [c + n for c, n in zip(cached, new, strict=True)]
        # per sequence: (first packed index, last + 1, slot row, cached tokens, mask or None for plain causal)
        self.parts: list[tuple[int, int, int, int, torch.Tensor | None]] = []
        start = 0
        for r, c, n in zip(rows, cached, new, strict=True):
            mask = None
            if c:  # queries at c..c+n-1 see keys 0..their own position (causal, aligned bottom-right)
                mask = torch.arange(c + n, device=device)[None, :] <= torch.arange(c, c + n, device=device)[:, None]
            self.parts.append((start, start + n, r, c, mask))
            start += n
        if flash:
            self.longest_q, self.longest_k = max(new), max(totals)
            self.cu_q = _cumulative(new, device)
            self.cu_k = _cumulative(totals, device)
            if any(cached):
                k_rows = [r for r, t in zip(rows, totals, strict=True) for _ in range(t)]
                self.k_rows = torch.tensor(k_rows, device=device)
                self.k_pos = torch.cat([torch.arange(t) for t in totals]).to(device)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, softcap) -> Any:
        """``q [1, heads, t, d]``, ``k``/``v`` ``[1, kv_heads, t, d]`` -> ``[1, t, heads, d]``."""
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        kc[self.q_rows, :, self.q_pos] = k[0].transpose(0, 1)
        vc[self.q_rows, :, self.q_pos] = v[0].transpose(0, 1)
        if self.flash:
            return self._flash(layer, q, k, v, scale, softcap)
        outs = []
        for a, b, row, c, mask in self.parts:
            if c:
                keys, values = kc[row : row + 1, :, : c + b - a], vc[row : row + 1, :, : c + b - a]
            else:
                keys, values = k[:, :, a:b], v[:, :, a:b]
            if softcap:
                outs.append(_eager_attention(q[:, :, a:b], keys, values, scale, softcap, mask))
                continue
            out = F.scaled_dot_product_attention(
                q[:, :, a:b], keys, values, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
            )
            outs.append(out.transpose(1, 2))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _flash(self, layer: int, q, k, v, scale: float, softcap) -> torch.Tensor:
        from flash_attn import flash_attn_varlen_func

        if hasattr(self, "k_rows"):  # the keys include cached tokens: read them all back from the slots
            kc, vc = self.cache.k[layer], self.cache.v[layer]
            keys = kc[self.k_rows, :, self.k_pos]
            values = vc[self.k_rows, :, self.k_pos]
        else:
            keys, values = k[0].transpose(0, 1), v[0].transpose(0, 1)
        extra = {"softcap": softcap} if softcap else {}
        out = flash_attn_varlen_func(
            q[0].transpose(0, 1),
            keys,
            values,
            self.cu_q,
            self.cu_k,
            self.longest_q,
            self.longest_k,
            softmax_scale=scale,
            causal=True,  # bottom-right aligned when keys outnumber queries (flash-attn >= 2.1)
            **extra,
        )
        return out.unsqueeze(0)

    def attend_flat(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Any:
        """``q [t, heads, d]``, ``k``/``v`` ``[t, kv_heads, d]`` -> ``[t, heads * d]``."""
        out = self.attend(layer, q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], scale, None)
        return out.reshape(q.shape[0], -1)


def _cumulative(lengths: list[int], device) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.cumsum(torch.tensor(lengths, device=device), 0)
    return cu


class _PrefixEntry:
    __slots__ = ("k", "nbytes", "tokens", "v")

    def __init__(self, tokens: tuple[int, ...], k: torch.Tensor, v: torch.Tensor):
        self.tokens, self.k, self.v = tokens, k, v
        self.nbytes = 2 * k.numel() * k.element_size()


class _PrefixCache:
    """Keys/values of recent prompts' prefixes, reused by prompts that start the same way.

    Chat prompts share the chat template's system preamble, and clients resend
    conversation history. Prefixes are matched in blocks of ``BLOCK`` tokens
    (chained block hashes, verified token by token on a hit); each stored prompt
    indexes all its block boundaries. Least recently used entries are evicted
    beyond ``budget`` bytes.
    """

    BLOCK = 16

    def __init__(self, budget: int):
        self.budget = budget
        self.entries: collections.OrderedDict[int, _PrefixEntry] = collections.OrderedDict()
        self.index: dict[int, _PrefixEntry] = {}
        self.nbytes = 0
        self.hits = 0
        self.hit_tokens = 0

    def _hashes(self, tokens: list[int], limit: int) -> list[int]:
        h, out = 0, []
        for end in range(self.BLOCK, limit + 1, self.BLOCK):
            h = hash((h, *tokens[end - self.BLOCK : end]))
            out.append(h)
        return out

    def lookup(self, tokens: list[int]) -> tuple[_PrefixEntry | None, int]:
        """The longest stored prefix of ``tokens`` leaving at least one token to compute.

        Found by whole blocks, then extended token by token along the entry found.
        """
        limit = len(tokens) - 1
        hashes = self._hashes(tokens, limit)
        for i in range(len(hashes) - 1, -1, -1):
            entry = self.index.get(hashes[i])
            n = (i + 1) * self.BLOCK
            if entry is not None and entry.tokens[:n] == tuple(tokens[:n]):
                end = min(limit, len(entry.tokens))
                while n < end and entry.tokens[n] == tokens[n]:
                    n += 1
                self.entries.move_to_end(id(entry))
                self.hits += 1
                self.hit_tokens += n
                return entry, n
        return None, 0

    def store(self, tokens: list[int], cache: _SlotCache, row: int, have: int) -> None:
        """Keep ``tokens`` but the last (in slot ``row``) unless only ``have`` or fewer of them are new."""
        n = len(tokens) - 1
        if n <= have or n < self.BLOCK:
            return
        k = torch.stack([layer[row, :, :n] for layer in cache.k])
        v = torch.stack([layer[row, :, :n] for layer in cache.v])
        entry = _PrefixEntry(tuple(tokens[:n]), k, v)
        if entry.nbytes > self.budget:
            return
        self.entries[id(entry)] = entry
        self.nbytes += entry.nbytes
        for h in self._hashes(tokens, n):
            self.index[h] = entry
        while self.nbytes > self.budget:
            _, old = self.entries.popitem(last=False)
            self.nbytes -= old.nbytes
            for h in self._hashes(list(old.tokens), len(old.tokens)):
                if self.index.get(h) is old:
                    del self.index[h]

    @staticmethod
    def restore(entry: _PrefixEntry, n: int, cache: _SlotCache, row: int) -> None:
        for i, (kc, vc) in enumerate(zip(cache.k, cache.v, strict=True)):
            kc[row, :, :n].copy_(entry.k[i, :, :n])
            vc[row, :, :n].copy_(entry.v[i, :, :n])


def _eager_attention(q, k, v, scale, softcap, mask):
    """Attention with logit soft-capping (``q [1, h, tq, d]``); ``mask [tq, tk]``, None = causal."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        t = q.shape[2]
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), -1).to(v.dtype), v).transpose(1, 2)


def _slot_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: attend through the batch set up by the engine thread."""
    batch = getattr(_local, "batch", None)
    if batch is None:  # the model used outside the engine (e.g. a test calling it directly)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = batch.attend(module.layer_idx, query, key, value, scale, kwargs.get("softcap"))
    return out.contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(SLOT_ATTENTION, _slot_attention)


# --------------------------------------------------------------------------------------------
# CPU weights
# --------------------------------------------------------------------------------------------


class _PackedLinear(nn.Module):
    """A linear layer for the CPU: float32 in and out, the weight packed once for the GEMM libraries.

    Decode: fbgemm's GEMM over a float16 copy of the weight, which streams half
    the bytes of float32 and accumulates in float32; it is single-threaded. A
    prompt's prefill of ``big_min_rows`` rows or more runs on a second copy, set
    at load by ``big``:

    * ``"bf16"``: a oneDNN-packed bfloat16 weight, on CPUs with native bf16 dot
      products (AVX512-BF16, AMX), which do twice the multiply-adds per cycle of
      float32 FMAs. Measured on one Zen 4 core, the 135M model's GEMMs take
      510 ms for 512 rows (fbgemm: 1036).
    * ``"fp32"``: a float32 weight for MKL, which runs multi-threaded; the row
      count from which it wins is measured at start-up (:func:`_calibrate_dense_rows`).

    A row's result depends on which path its GEMM took (each path alone gives a row
    the same result whatever the other rows), and bfloat16 rounds activations: so
    the path is chosen by what is computed, never by the batch. Every prompt prefill
    takes the big copy (a prompt whose prefix was cached prefills a few rows and
    must get the numbers of a whole prefill); every decode step, and the recompute
    of a resumed stream's delivered tokens, takes fbgemm. Greedy output then does not
    depend on the batch, and a resumed stream continues as the original would have.
    ``EXACT_DECODE=false`` gives that up for speed: decode GEMMs of
    ``decode_big_min_rows`` rows or more take the big copy too.
    """

    big_min_rows = 1 << 30
    decode_big_min_rows = 1 << 30

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, big: str = ""):
        super().__init__()
        weight = weight.detach().float().contiguous()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.aten.fbgemm_pack_gemm_matrix_fp16(weight)
        self.bias_ = bias.detach().float() if bias is not None else torch.zeros(self.out_features)
        self.bias = bias.detach().float() if bias is not None else None
        self.bf16 = torch.ops.mkldnn._reorder_linear_weight(weight.bfloat16(), 1) if big == "bf16" else None
        self.dense = weight if big == "fp32" else None

    def forward(self, x: torch.Tensor, prefill: bool = False) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] < (self.big_min_rows if prefill else self.decode_big_min_rows):
            out = torch.ops.aten.fbgemm_linear_fp16_weight(x2, self.packed, self.bias_)
        elif self.bf16 is not None:
            out = torch.ops.mkldnn._linear_pointwise(x2.bfloat16(), self.bf16, None, "none", [], "").float()
            if self.bias is not None:
                out += self.bias
        else:
            assert self.dense is not None, "big_min_rows is set only together with a big copy"
            out = F.linear(x2, self.dense, self.bias)
        return out.view(*shape[:-1], self.out_features)


_BF16_MIN_ROWS = 1  # a prompt prefill of any size: its numbers must not depend on how it was split
_BF16_DECODE_MIN_ROWS = 5  # EXACT_DECODE=false: measured, bf16 beats fbgemm fp16 from 5 rows on (Zen 4)


def _mkldnn_bf16_available() -> bool:
    """oneDNN bf16 GEMMs with pre-packed weights, on a CPU that does bf16 natively."""
    if not (cpu_has_native_bf16() and torch.backends.mkldnn.is_available()):
        return False
    try:
        w = torch.randn(8, 16)
        x = torch.randn(2, 16)
        packed = torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), 1)
        out = torch.ops.mkldnn._linear_pointwise(x.bfloat16(), packed, None, "none", [], "").float()
        return bool(torch.allclose(out, x @ w.t(), rtol=3e-2, atol=3e-2))
    except Exception:
        return False


class _DenseLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight, self.bias = weight.detach().contiguous(), None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor, prefill: bool = False) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _calibrate_dense_rows(out_features: int, in_features: int) -> int:
    """The smallest batch from which float32 MKL GEMMs (all threads) beat fbgemm's fp16 one (one thread)."""
    weight = torch.randn(out_features, in_features) * 0.02
    packed = torch.ops.aten.fbgemm_pack_gemm_matrix_fp16(weight)
    bias = torch.zeros(out_features)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    rows = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    dense_wins = []
    with torch.inference_mode():
        for m in rows:
            x = torch.randn(m, in_features)
            fbgemm = best(lambda x=x: torch.ops.aten.fbgemm_linear_fp16_weight(x, packed, bias))
            dense = best(lambda x=x: F.linear(x, weight))
            dense_wins.append(dense < 0.9 * fbgemm)
    for i, m in enumerate(rows):
        if all(dense_wins[i:]):
            return m
    return 1 << 30


def _fbgemm_fp16_available() -> bool:
    try:
        w = torch.randn(8, 16)
        packed = torch.ops.aten.fbgemm_pack_gemm_matrix_fp16(w)
        x = torch.ones(2, 16)
        out = torch.ops.aten.fbgemm_linear_fp16_weight(x, packed, torch.zeros(8))
        return bool(torch.allclose(out, x @ w.t(), rtol=1e-2, atol=1e-2))
    except Exception:
        return False


def _pack_linears(model: nn.Module, pack: Callable[[nn.Linear], nn.Module]) -> int:
    import warnings

    count = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "fbgemm_pack_gemm_matrix_fp16 is deprecated"
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, pack(child))
                    count += 1
    return count


# --------------------------------------------------------------------------------------------
# A lean forward for Llama-style decoders
# --------------------------------------------------------------------------------------------


@dataclass
class _FastLayer:
    ln1: torch.Tensor
    qkv: nn.Module
    o: nn.Module
    ln2: torch.Tensor
    gate_up: nn.Module
    down: nn.Module


class _FastDecoder:
    """The decoder stack of a Llama-style model, run on flat ``[tokens, hidden]`` tensors with fused GEMMs.

    transformers' forward costs about as much CPU as the GEMMs themselves at
    small batch sizes (module calls, mask and output plumbing, unfused RMSNorm
    and rotary). This path does the same math in ~20 ops per layer, with q/k/v
    and gate/up fused into one GEMM each. It is used only for architectures whose
    layers are exactly Llama's, and only after its logits were checked against
    transformers' own forward at start-up; otherwise the engine runs the
    transformers model (with the slot attention).
    """

    ARCHITECTURES = ("llama", "mistral", "qwen2")

    def __init__(self, model, make_linear: Callable[[torch.Tensor, torch.Tensor | None], nn.Module]):
        config = model.config
        inner = model.model
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = self.head_dim**-0.5
        self.hidden = config.hidden_size
        self.eps = float(config.rms_norm_eps)
        self.inter = config.intermediate_size
        self.embed = inner.embed_tokens.weight
        self.rotary = inner.rotary_emb
        self.norm = inner.norm.weight
        head = model.lm_head
        self.lm_head = make_linear(head.weight, getattr(head, "bias", None))
        half = self.head_dim // 2
        self.sign = torch.cat([-torch.ones(half), torch.ones(self.head_dim - half)]).to(self.embed)
        self.layers: list[_FastLayer] = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            qkv_b = None
            if a.q_proj.bias is not None:
                qkv_b = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
            self.layers.append(
                _FastLayer(
                    ln1=layer.input_layernorm.weight,
                    qkv=make_linear(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), qkv_b),
                    o=make_linear(a.o_proj.weight, a.o_proj.bias),
                    ln2=layer.post_attention_layernorm.weight,
                    gate_up=make_linear(torch.cat([m.gate_proj.weight, m.up_proj.weight]), _cat_bias(m)),
                    down=make_linear(m.down_proj.weight, m.down_proj.bias),
                )
            )
        self.script = self._script_inputs()

    def _script_inputs(self) -> dict[str, Any] | None:
        """The weights as flat lists for :func:`hf_script.decode_layers`, when every GEMM is a _PackedLinear."""
        linears = [lin for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        if not all(isinstance(lin, _PackedLinear) for lin in linears) or self.embed.device.type != "cpu":
            return None
        first = linears[0]
        big = hf_script.BIG_BF16 if first.bf16 is not None else hf_script.BIG_FP32 if first.dense is not None else 0
        return {
            "norms": [w for layer in self.layers for w in (layer.ln1, layer.ln2)],
            "fp16": [lin.packed for lin in linears],
            "big_w": [lin.bf16 if lin.bf16 is not None else lin.dense if lin.dense is not None else lin.bias_
                      for lin in linears],
            "biases": [lin.bias_ for lin in linears],
            "has_bias": any(lin.bias is not None for lin in linears),
            "big": big,
            "dims": [self.heads, self.kv_heads, self.head_dim, self.inter, self.hidden],
            "eps": self.eps,
            "scale": self.scale,
            "fn": hf_script.scripted_decode_layers(),
        }

    @classmethod
    def supports(cls, model) -> bool:
        config = model.config
        if getattr(config, "model_type", None) not in cls.ARCHITECTURES:
            return False
        if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "pretraining_tp", 1) != 1:
            return False
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "rotary_emb"):
            return False
        if not isinstance(getattr(model, "lm_head", None), nn.Linear):
            return False
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            linears = [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
            if not all(type(x) is nn.Linear for x in linears):
                return False
            if hasattr(a, "q_norm") or hasattr(a, "k_norm"):
                return False
        return True

    def forward(self, batch, ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Logits ``[len(keep) or tokens, vocab]`` for flat token ``ids`` at ``positions``."""
        n = ids.shape[0]
        hq, kvh, d = self.heads, self.kv_heads, self.head_dim
        x = F.embedding(ids, self.embed)
        cos, sin = self.rotary(x, positions[None])
        cos = cos[0][:, None, :]
        sin = (sin[0] * self.sign)[:, None, :]
        qk_width = (hq + kvh) * d
        shape, eps, inter = (self.hidden,), self.eps, self.inter
        if self.script is not None and isinstance(batch, _Decode):
            x = self._script_layers(batch, x, cos, sin)
            return self.lm_head.forward(torch.rms_norm(x, shape, self.norm, eps))
        # Modules are called through .forward and rms_norm as torch.rms_norm: per-call Python
        # overhead is a good part of a small batch's step, and with two lanes it holds the GIL.
        pre = isinstance(batch, _Prefill) and batch.prompt  # which GEMMs: see _PackedLinear
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv.forward(torch.rms_norm(x, shape, layer.ln1, eps), pre)
            qk = qkv[:, :qk_width].view(n, hq + kvh, d)
            qk = torch.addcmul(qk * cos, torch.roll(qk, d // 2, -1), sin)
            attn = batch.attend_flat(i, qk[:, :hq], qk[:, hq:], qkv[:, qk_width:].view(n, kvh, d), self.scale)
            x.add_(layer.o.forward(attn, pre))
            gu = layer.gate_up.forward(torch.rms_norm(x, shape, layer.ln2, eps), pre)
            x.add_(layer.down.forward(torch.mul(F.silu(gu[:, :inter], inplace=True), gu[:, inter:]), pre))
        if keep is not None:
            x = x[keep]
        return self.lm_head.forward(torch.rms_norm(x, shape, self.norm, eps))

    def _script_layers(self, batch: _Decode, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        s = self.script
        assert s is not None
        big = s["big"] if x.shape[0] >= _PackedLinear.decode_big_min_rows else 0  # see _PackedLinear
        cache = batch.cache
        return s["fn"](x, cos, sin, s["norms"], s["fp16"], s["big_w"], s["biases"], s["has_bias"], big, cache.k,
                       cache.v, batch.rows, batch.pos, batch.first, batch.kv_len, batch.mask3, s["dims"], s["eps"],
                       s["scale"])

    def drop_model_weights(self, model) -> None:
        """The fused copies replace the layers' own linear weights: free those."""
        model.model.layers = nn.ModuleList()


def _cat_bias(mlp) -> torch.Tensor | None:
    if mlp.gate_proj.bias is None:
        return None
    return torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias])


# --------------------------------------------------------------------------------------------
# Per-request state
# --------------------------------------------------------------------------------------------


class _Detokenizer:
    """Incremental detokenization with stop strings, releasing text only at complete token groups.

    A delta covers whole tokens and exactly their text, so a client holding the
    deltas' token ids holds exactly their text: resuming after them neither
    repeats nor loses a character. Tokens ending inside a multi-byte character
    wait for the token that completes it; text that could be the start of a stop
    string waits until it is known not to be one.
    """

    def __init__(self, decode: Callable[[list[int]], str], context: list[int], stop: list[str]):
        self.decode = decode
        self.toks: list[int] = list(context[-_DETOK_CONTEXT:])
        self.prefix = 0
        self.read = len(self.toks)
        self.n = 0  # generated tokens seen
        self.text = ""  # committed text of the generated tokens
        self.commits: collections.deque[tuple[int, int]] = collections.deque()  # (tokens, chars) boundaries
        self.stop = [s for s in stop if s]
        self.max_stop = max((len(s) for s in self.stop), default=0)
        self.search_from = 0
        self.sent_tokens = 0
        self.sent_chars = 0

    def add(self, token: int) -> int | None:
        """Feed one token; return where a stop string starts in ``text`` if one just appeared."""
        self.toks.append(token)
        self.n += 1
        prefix_text = self.decode(self.toks[self.prefix : self.read])
        full = self.decode(self.toks[self.prefix :])
        pending = len(self.toks) - self.read
        if (len(full) > len(prefix_text) and not full.endswith("\ufffd")) or pending >= _MAX_PENDING_TOKENS:
            self._commit(full[len(prefix_text) :])
            if self.stop:
                return self._find_stop()
        return None

    def skip(self, token: int) -> None:
        """A token without text of its own (end of sequence): counted, decoded with the rest at flush."""
        self.toks.append(token)
        self.n += 1

    def _commit(self, new: str) -> None:
        self.text += new
        self.prefix, self.read = self.read, len(self.toks)
        if len(self.toks) > 64:  # keep the list short; offsets stay relative
            drop = self.prefix
            self.toks = self.toks[drop:]
            self.prefix -= drop
            self.read -= drop
        self.commits.append((self.n, len(self.text)))

    def _find_stop(self) -> int | None:
        best = None
        for s in self.stop:
            i = self.text.find(s, self.search_from)
            if i >= 0 and (best is None or i < best):
                best = i
        self.search_from = max(0, len(self.text) - self.max_stop + 1)
        return best

    def flush(self) -> None:
        """End of generation: commit what is pending, dropping an incomplete trailing character."""
        if self.read < len(self.toks):
            prefix_text = self.decode(self.toks[self.prefix : self.read])
            full = self.decode(self.toks[self.prefix :])
            self._commit(full[len(prefix_text) :].rstrip("\ufffd"))

    def mark_all_sent(self) -> None:
        self.sent_tokens, self.sent_chars = self.n, len(self.text)
        self.commits.clear()

    def releasable(self) -> tuple[int, int]:
        """(tokens, chars) that can be sent now: the last commit not inside a possible stop-string start."""
        safe = len(self.text) - self._holdback()
        best = (self.sent_tokens, self.sent_chars)
        while self.commits and self.commits[0][1] <= safe:
            best = self.commits.popleft()
        return best

    def _holdback(self) -> int:
        if not self.stop:
            return 0
        text = self.text
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest


@dataclass(eq=False)
class _Seq:
    request_id: str
    prompt_ids: list[int]
    resume_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    generator: torch.Generator | None
    detok: _Detokenizer
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    cancelled: bool = False
    finished: bool = False
    row: int = -1
    cache_len: int = 0
    last_token: int = 0
    generated: int = 0  # including resume ids
    inputs: list[int] = field(default_factory=list)  # prompt + resume ids: what prefill puts in the cache
    reused: int = 0  # leading input tokens restored from the prefix cache
    ready: bool = False  # prefill done: decoding
    history: list[int] = field(default_factory=list)  # generated ids, resume ids first

    @property
    def greedy(self) -> bool:
        return self.temperature <= _GREEDY_TEMPERATURE


class _EngineDead(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------
# The model thread
# --------------------------------------------------------------------------------------------


class _Runner:
    def __init__(
        self,
        model,
        device: torch.device,
        max_batch: int,
        max_len: int,
        eos_ids: set[int],
        decode,
        flash: bool,
        prefix_cache_bytes: int = 0,
        fast: _FastDecoder | None = None,
        lanes: int = 1,
    ):
        self.model = model
        self.fast = fast
        self.device = device
        self.max_batch = max_batch
        self.max_len = max_len
        self.eos_ids = eos_ids
        self.decode = decode
        self.flash = flash
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        cache_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        if cache_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            cache_dtype = torch.float32
        self.dtype = cache_dtype
        self.cache = _SlotCache(config.num_hidden_layers, max_batch, kv_heads, head_dim, max_len, cache_dtype, device)
        self.cv = threading.Condition()
        self.pending: collections.deque[_Seq] = collections.deque()
        self.active: list[_Seq] = []
        self.stopping = False
        self.fatal: BaseException | None = None
        self.rng = torch.Generator(device="cpu")
        self.rng.manual_seed(random.SystemRandom().randrange(2**63))
        self.steps = 0
        self.prefill_tokens = 0
        self.reused_tokens = 0
        self.prefix: _PrefixCache | None = _PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self._out: dict[asyncio.AbstractEventLoop, list[tuple[_Seq, Any]]] = {}
        # A second thread that runs part of each batch (see _cpu_lanes)
        self.lane = concurrent.futures.ThreadPoolExecutor(1, "hf-lane") if lanes > 1 else None
        self.thread = threading.Thread(target=self._main, name="hf-engine", daemon=True)

    # --- called from the event loop ---------------------------------------------------------

    def submit(self, seq: _Seq) -> None:
        with self.cv:
            if self.fatal is not None or self.stopping:
                raise _EngineDead("the transformers engine is not running") from self.fatal
            self.pending.append(seq)
            self.cv.notify()

    def cancel(self, seq: _Seq) -> None:
        seq.cancelled = True
        with self.cv:
            self.cv.notify()

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()

    def load(self) -> int:
        return len(self.active) + len(self.pending)

    # --- the thread ---------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self.cv:
                        while not self.stopping and not self.pending and not self.active:
                            self.cv.wait()
                        if not self.active:
                            self._gather_burst()
                        if self.stopping:
                            break
                        continuing = sum(len(s.inputs) - s.cache_len for s in self.active if not s.ready)
                        admitted = self._admit(_PREFILL_TOKEN_BUDGET - continuing)
                    try:
                        self._drop_cancelled()
                        work = self._plan_prefill(admitted)
                        if work:
                            self._prefill(work)
                        if any(s.ready for s in self.active):
                            self._decode_step()
                    except Exception as exc:
                        log.exception("transformers engine step failed; failing %d requests", len(self.active))
                        self._fail(self.active, exc)
                        self.active = []
                    self._flush()
        except BaseException as exc:
            log.exception("transformers engine thread died")
            self.fatal = exc
        finally:
            with self.cv:
                self.stopping = True
                leftover = list(self.pending) + self.active
                self.pending.clear()
                self.active = []
            self._fail(leftover, _EngineDead("the transformers engine stopped"))
            self._flush()
            if self.lane is not None:
                self.lane.shutdown(wait=False)

    def _gather_burst(self) -> None:
        """An idle engine waits a moment while requests keep arriving (called with the lock held).

        Taken together, a burst's prompts are prefilled at once, over both lanes (see
        ``BURST_GAP_S``).
        """
        deadline = time.monotonic() + BURST_MAX_S
        while not self.stopping and len(self.pending) < self.max_batch:
            seen = len(self.pending)
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.cv.wait(min(BURST_GAP_S, left))
            if len(self.pending) == seen:
                return

    def _admit(self, budget: int) -> list[_Seq]:
        """Take waiting requests into free slots while prefill budget is left (called with the lock held)."""
        admitted: list[_Seq] = []
        free = self.max_batch - len([s for s in self.active if not s.cancelled])
        while self.pending and len(admitted) < free and budget > 0:
            seq = self.pending.popleft()
            if seq.cancelled:
                self._emit_cancelled(seq)
                continue
            admitted.append(seq)
            budget -= len(seq.inputs)
        return admitted

    def _plan_prefill(self, admitted: list[_Seq]) -> list[tuple[_Seq, int]]:
        """This iteration's prefill: (sequence, tokens up to which it is in the cache afterwards).

        Long prompts are prefilled in chunks over several iterations (``_PREFILL_TOKEN_BUDGET``
        tokens per forward in all), so running streams keep getting tokens in between.
        """
        for seq in admitted:
            seq.row = len(self.active)
            self.active.append(seq)
            self.cache.ensure(len(seq.inputs) + 1)
            # a resumed stream prefills its whole prompt, as its first attempt did: same numbers
            entry, n = self.prefix.lookup(seq.inputs) if self.prefix is not None and not seq.resume_ids else (None, 0)
            if entry is not None:
                _PrefixCache.restore(entry, n, self.cache, seq.row)
            seq.cache_len = seq.reused = n
        budget = _PREFILL_TOKEN_BUDGET
        work = []
        for seq in self.active:
            if seq.ready or budget <= 0:
                continue
            limit = len(seq.inputs)
            if seq.cache_len < len(seq.prompt_ids):
                limit = len(seq.prompt_ids)  # a resumed stream's delivered tokens go in a chunk of their own
            end = min(limit, seq.cache_len + budget)
            work.append((seq, end))
            budget -= end - seq.cache_len
        return work

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.active if s.cancelled]:
            self._remove(seq)
            self._emit_cancelled(seq)

    def _remove(self, seq: _Seq) -> None:
        last = self.active[-1]
        if last is not seq:
            self.cache.move_row(last.row, seq.row, last.cache_len)
            last.row = seq.row
            self.active[seq.row] = last
        self.active.pop()
        seq.row = -1

    def _prefill(self, work: list[tuple[_Seq, int]]) -> None:
        prompts = [(seq, end) for seq, end in work if seq.cache_len < len(seq.prompt_ids)]
        delivered = [(seq, end) for seq, end in work if seq.cache_len >= len(seq.prompt_ids)]
        work = prompts + delivered
        parts = self._prefill_group(prompts, True) + self._prefill_group(delivered, False)
        new = [end - seq.cache_len for seq, end in work]
        for seq, end in work:
            seq.cache_len = end
        finished = [seq for seq, end in work if end == len(seq.inputs)]
        for seq in finished:
            seq.ready = True
            if self.prefix is not None:
                self.prefix.store(seq.inputs, self.cache, seq.row, seq.reused)
        self.prefill_tokens += sum(new)
        self.reused_tokens += sum(seq.reused for seq in finished)
        if finished:
            logits = torch.cat([part for part in parts if part is not None])
            self._accept(finished, self._sample(logits, finished))

    def _prefill_group(self, work: list[tuple[_Seq, int]], prompt: bool) -> list[torch.Tensor | None]:
        """Logits of the sequences in ``work`` whose inputs end here, in order, over both lanes."""
        if not work:
            return []
        if self.lane is not None and len(work) >= 2:  # two groups of prompts, one per core
            ends = list(itertools.accumulate(end - seq.cache_len for seq, end in work))
            cut = min(range(1, len(work)), key=lambda i: abs(2 * ends[i - 1] - ends[-1]))
            other = self.lane.submit(self._prefill_rows, work[cut:], prompt)
            return [self._prefill_rows(work[:cut], prompt), other.result()]
        return [self._prefill_rows(work, prompt)]

    def _prefill_rows(self, work: list[tuple[_Seq, int]], prompt: bool = True) -> torch.Tensor | None:
        """One forward over these inputs' next tokens: logits where the inputs end, if any do."""
        with torch.inference_mode():
            cached = [seq.cache_len for seq, _ in work]
            new = [end - seq.cache_len for seq, end in work]
            dev = self.device
            batch = _Prefill(self.cache, [seq.row for seq, _ in work], cached, new, self.flash, prompt)
            ids = [t for seq, end in work for t in seq.inputs[seq.cache_len : end]]
            done = [i for i, (seq, end) in enumerate(work) if end == len(seq.inputs)]
            ends = list(itertools.accumulate(new))
            # logits only where a prompt ends (at least one row: an all-chunks forward ignores it)
            keep = torch.tensor([ends[i] - 1 for i in done] or [ends[-1] - 1], dtype=torch.long, device=dev)
            logits = self._run_model(batch, torch.tensor(ids, dtype=torch.long, device=dev), batch.q_pos, keep)
            return logits if done else None

    def _decode_step(self) -> None:
        """One token for every decoding sequence.

        Rows still in a chunked prefill ride along with a dummy token at their next
        prefill position (overwritten by their next chunk); their output is ignored.
        """
        seqs = list(self.active)
        self.cache.ensure(max(s.cache_len for s in seqs) + 1)
        if self.lane is not None and len(seqs) >= _LANE_MIN_ROWS:  # two halves of the batch, one per core
            half = (len(seqs) + 1) // 2
            other = self.lane.submit(self._decode_rows, seqs[half:], half)
            logits = torch.cat([self._decode_rows(seqs[:half], 0), other.result()])
        else:
            logits = self._decode_rows(seqs, 0)
        ready = [i for i, s in enumerate(seqs) if s.ready]
        if len(ready) < len(seqs):
            logits = logits[ready]
            seqs = [seqs[i] for i in ready]
        for s in seqs:
            s.cache_len += 1
        self._accept(seqs, self._sample(logits, seqs))
        self.steps += 1

    def _decode_rows(self, seqs: list[_Seq], first: int) -> torch.Tensor:
        """Logits of one decode step for ``seqs``, which sit in the cache rows from ``first`` on."""
        with torch.inference_mode():
            dev = self.device
            pos = torch.tensor([s.cache_len for s in seqs], dtype=torch.long)
            kv_len = int(pos.max()) + 1
            pos = pos.to(dev)
            batch = _Decode(self.cache, pos, kv_len, self.dtype, first)
            input_ids = torch.tensor([s.last_token if s.ready else 0 for s in seqs], dtype=torch.long, device=dev)
            return self._run_model(batch, input_ids, pos, None)

    def _run_model(self, batch, ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Logits ``[rows, vocab]``: one row per decoded sequence, or one per ``keep`` index of a prefill."""
        if self.fast is not None:
            return self.fast.forward(batch, ids, positions, keep)
        _local.batch = batch
        try:
            if keep is None:  # decode: one token per sequence
                out = self.model(
                    input_ids=ids[:, None], position_ids=positions[:, None], use_cache=False, logits_to_keep=1
                )
                return out.logits[:, -1]
            out = self.model(input_ids=ids[None], position_ids=positions[None], use_cache=False, logits_to_keep=keep)
            return out.logits[0]
        finally:
            _local.batch = None

    def _sample(self, logits: torch.Tensor, seqs: Sequence[_Seq]) -> list[int]:
        greedy = [i for i, s in enumerate(seqs) if s.greedy]
        if len(greedy) == len(seqs):
            return logits.argmax(-1).tolist()
        out = [0] * len(seqs)
        if greedy:
            for i, t in zip(greedy, logits[greedy].argmax(-1).tolist(), strict=True):
                out[i] = t
        sampled = [i for i, s in enumerate(seqs) if not s.greedy]
        rows = logits[sampled].float()
        temps = torch.tensor([seqs[i].temperature for i in sampled], device=rows.device)
        probs = torch.softmax(rows / temps[:, None], dim=-1)
        uniforms = torch.cat([torch.rand(1, generator=seqs[i].generator or self.rng) for i in sampled]).to(rows.device)
        top_ps = [seqs[i].top_p for i in sampled]
        plain = [j for j, p in enumerate(top_ps) if p >= 1.0]
        nucleus = [j for j, p in enumerate(top_ps) if p < 1.0]
        if plain:
            cdf = probs[plain].cumsum(-1)
            x = (uniforms[plain] * cdf[:, -1])[:, None]
            picks = torch.searchsorted(cdf, x, right=True).clamp_(max=cdf.shape[-1] - 1)[:, 0].tolist()
            for j, t in zip(plain, picks, strict=True):
                out[sampled[j]] = t
        if nucleus:
            sub = probs[nucleus]
            k = min(_TOP_P_CANDIDATES, sub.shape[-1])
            vals, ids = sub.topk(k, dim=-1)
            tp = torch.tensor([top_ps[j] for j in nucleus], device=sub.device)
            covered = vals.sum(-1) >= tp
            if not bool(covered.all()):
                vals, ids = sub.sort(dim=-1, descending=True)
            before = vals.cumsum(-1) - vals
            vals = vals.masked_fill(before >= tp[:, None], 0.0)
            cdf = vals.cumsum(-1)
            x = (uniforms[nucleus] * cdf[:, -1])[:, None]
            pick = torch.searchsorted(cdf, x, right=True).clamp_(max=cdf.shape[-1] - 1)
            for j, t in zip(nucleus, ids.gather(1, pick)[:, 0].tolist(), strict=True):
                out[sampled[j]] = t
        return out

    def _accept(self, seqs: list[_Seq], tokens: list[int]) -> None:
        done: list[_Seq] = []
        for seq, token in zip(seqs, tokens, strict=True):
            seq.last_token = token
            seq.generated += 1
            seq.history.append(token)
            d = seq.detok
            finish: FinishReason | None = None
            cut: int | None = None
            if token in self.eos_ids:
                d.skip(token)
                finish = "stop"
            else:
                cut = d.add(token)
                if cut is not None:
                    finish = "stop"
                elif seq.generated >= seq.max_tokens or seq.cache_len >= self.max_len:
                    finish = "length"
            if finish is None:
                tok_end, char_end = d.releasable()
                if tok_end > d.sent_tokens:
                    self._emit_text(seq, d, tok_end, char_end, None)
                continue
            if cut is None:
                d.flush()
                char_end = len(d.text)
            else:
                char_end = max(cut, d.sent_chars)
            self._emit_text(seq, d, d.n, char_end, finish)
            seq.finished = True
            done.append(seq)
        for seq in done:
            self._remove(seq)

    def _emit_text(self, seq: _Seq, d: _Detokenizer, tok_end: int, char_end: int, finish: FinishReason | None) -> None:
        delta = Delta(
            text=d.text[d.sent_chars : char_end],
            token_ids=seq.history[d.sent_tokens : tok_end],
            finish_reason=finish,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=tok_end,
        )
        d.sent_tokens, d.sent_chars = tok_end, max(char_end, d.sent_chars)
        self._out.setdefault(seq.loop, []).append((seq, delta))

    def _emit_cancelled(self, seq: _Seq) -> None:
        seq.finished = True
        d = seq.detok
        delta = Delta(
            text="",
            token_ids=[],
            finish_reason="cancelled",
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=d.sent_tokens,
        )
        self._out.setdefault(seq.loop, []).append((seq, delta))

    def _fail(self, seqs: Sequence[_Seq], exc: BaseException) -> None:
        for seq in seqs:
            if not seq.finished:
                seq.finished = True
                self._out.setdefault(seq.loop, []).append((seq, exc))

    def _flush(self) -> None:
        out, self._out = self._out, {}
        for loop, items in out.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass


def _deliver(items: list[tuple[_Seq, Any]]) -> None:
    for seq, item in items:
        seq.queue.put_nowait(item)


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


@dataclass
class _Loaded:
    model: Any
    tokenizer: Any
    device: torch.device
    path: Path
    summary: str
    flash: bool
    max_len: int
    eos_ids: set[int]
    fast: _FastDecoder | None = None
    lanes: int = 1


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.model = settings.served_model_name
        self.max_batch_size = settings.max_batch_size
        self.max_model_len = settings.max_model_len
        self._loaded: _Loaded | None = None
        self._runner: _Runner | None = None
        self._decode_fn: Callable[[list[int]], str] | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._runner is not None:
            return
        loaded = await asyncio.to_thread(_load, self.settings)
        self._loaded = loaded
        self.max_model_len = loaded.max_len
        self._decode_fn = _make_decode(loaded.tokenizer)
        runner = _Runner(
            loaded.model,
            loaded.device,
            self.max_batch_size,
            loaded.max_len,
            loaded.eos_ids,
            self._decode_fn,
            loaded.flash,
            _PREFIX_CACHE_BYTES,
            loaded.fast,
            loaded.lanes,
        )
        runner.thread.start()
        self._runner = runner
        started = time.monotonic()
        await self._warmup()
        log.info(
            "transformers engine ready: %s from %s; %s; max_batch_size=%d max_model_len=%d; kv cache %.0f MiB now; "
            "warm-up %.1f s",
            self.model,
            loaded.path,
            loaded.summary,
            self.max_batch_size,
            self.max_model_len,
            runner.cache.nbytes() / 2**20,
            time.monotonic() - started,
        )

    async def _warmup(self) -> None:
        """Run the paths once (prefill, decode, packed prefill); caches the chat template's preamble."""
        from worker.engines.base import SamplingParams

        params = SamplingParams(max_tokens=4, temperature=0.0)
        requests = [GenerationRequest(id="warmup-completion", params=params, prompt="The capital of France is")]
        if getattr(self._loaded.tokenizer, "chat_template", None) if self._loaded else None:
            messages = [{"role": "user", "content": "Hello!"}]
            requests.append(GenerationRequest(id="warmup-chat", params=params, messages=messages))

        async def run(request: GenerationRequest) -> None:
            async for _ in self.generate(request):
                pass

        await asyncio.gather(*(run(r) for r in requests))

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.stop()
            await asyncio.to_thread(runner.thread.join, 30)

    async def check_health(self) -> None:
        runner = self._runner
        if runner is None:
            raise RuntimeError("the transformers engine is not started")
        if not runner.thread.is_alive() or runner.fatal is not None:
            raise RuntimeError(f"the transformers engine thread died: {runner.fatal!r}")

    def num_running(self) -> int:
        """Requests inside the engine: running in the batch plus waiting for a slot."""
        return self._runner.load() if self._runner is not None else 0

    # --- requests -----------------------------------------------------------------------------

    def _tokenize(self, request: GenerationRequest) -> tuple[list[int], str]:
        assert self._loaded is not None
        tok = self._loaded.tokenizer
        if request.messages is not None:
            messages = [_normalize_message(m) for m in request.messages]
            try:
                text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as exc:
                raise EngineRequestError(f"cannot apply the chat template: {exc}", param="messages") from exc
            ids = list(tok(text, add_special_tokens=False)["input_ids"])
            return ids, "messages"
        prompt = request.prompt
        if prompt is None:
            raise EngineRequestError("either messages or prompt is required", param="prompt")
        if isinstance(prompt, str):
            ids = list(tok(prompt, add_special_tokens=True)["input_ids"]) if prompt else []
        else:
            ids = self._check_ids(list(prompt), "prompt")
        if not ids:
            bos = tok.bos_token_id
            if bos is None:
                raise EngineRequestError("the prompt is empty", param="prompt", code="invalid_prompt")
            ids = [bos]
        return ids, "prompt"

    def _check_ids(self, ids: list[Any], param: str) -> list[int]:
        assert self._loaded is not None
        vocab = self._vocab_size()
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise EngineRequestError(
                    f"token id {t!r} is out of range for this model's vocabulary [0, {vocab})",
                    param=param,
                    code="invalid_token_id",
                )
        return ids

    def _vocab_size(self) -> int:
        assert self._loaded is not None
        emb = self._loaded.model.get_input_embeddings()
        return int(emb.num_embeddings if hasattr(emb, "num_embeddings") else emb.weight.shape[0])

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        runner = self._runner
        if runner is None or self._loaded is None or self._decode_fn is None:
            raise RuntimeError("the transformers engine is not started")
        params = request.params
        prompt_ids, param = self._tokenize(request)
        resume = self._check_ids(list(request.resume_token_ids), "resume_token_ids")
        max_tokens = int(params.max_tokens)
        if max_tokens < 0:
            raise EngineRequestError("max_tokens must be >= 0", param="max_tokens", code="invalid_value")
        if len(prompt_ids) + max_tokens > self.max_model_len:
            raise EngineRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the {param}, {max_tokens} for the "
                f"completion). Please reduce the length of the {param} or max_tokens.",
                param=param,
                code="context_length_exceeded",
            )
        if not 0.0 < float(params.top_p) <= 1.0:
            raise EngineRequestError("top_p must be in (0, 1]", param="top_p", code="invalid_value")
        if float(params.temperature) < 0 or not math.isfinite(float(params.temperature)):
            raise EngineRequestError("temperature must be >= 0", param="temperature", code="invalid_value")

        temperature = float(params.temperature)
        generator = None
        if params.seed is not None and temperature > _GREEDY_TEMPERATURE:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(int(params.seed) % (2**63))
            for _ in resume:  # one uniform per sampled token: continue the seeded stream where it was
                torch.rand(1, generator=generator)
        detok = _Detokenizer(self._decode_fn, prompt_ids, list(params.stop or []))
        loop = asyncio.get_running_loop()
        seq = _Seq(
            request_id=request.id,
            prompt_ids=prompt_ids,
            resume_ids=resume,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=float(params.top_p),
            generator=generator,
            detok=detok,
            loop=loop,
            queue=asyncio.Queue(),
        )
        seq.history = list(resume)
        seq.generated = len(resume)
        seq.inputs = prompt_ids + resume
        # Replay the resumed tokens through the detokenizer: their text counts for stop strings, is not re-sent.
        cut = None
        for t in resume:
            if t in self._loaded.eos_ids:
                cut = -1
                break
            cut = detok.add(t)
            if cut is not None:
                break
        detok.mark_all_sent()
        if cut is not None or (resume and resume[-1] in self._loaded.eos_ids) or len(resume) >= max_tokens:
            reason: FinishReason = "stop" if cut is not None else "length"
            yield Delta(
                text="",
                token_ids=[],
                finish_reason=reason,
                prompt_tokens=len(prompt_ids),
                completion_tokens=len(resume),
            )
            return

        try:
            runner.submit(seq)
        except _EngineDead as exc:
            raise RuntimeError(str(exc)) from exc
        try:
            while True:
                item = await seq.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not seq.finished:
                runner.cancel(seq)


def _normalize_message(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        text = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text")
        message = {**message, "content": text}
    elif content is None:
        message = {**message, "content": ""}
    return message


def _make_decode(tokenizer) -> Callable[[list[int]], str]:
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "decode"):

        def decode(ids: list[int]) -> str:
            return backend.decode(ids, skip_special_tokens=True)

        return decode

    def slow_decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    return slow_decode


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a container's
    CPU limit, which neither affinity nor OpenMP sees)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def _cpu_threads() -> int:
    """Intra-op threads for the model: all cores but one.

    The spare core runs the event loop (Redis I/O, detokenization) and, on small
    hosts, the API and Redis. Measured on a 2-core host: OpenMP with 2 threads on
    2 busy cores is 2-10x slower (spinning barriers stall whenever the API or
    Redis takes a core). Set OMP_NUM_THREADS to override.
    """
    return max(1, _cores() - 1)


def _cpu_lanes(settings: Settings) -> int:
    """Threads that each run part of a batch: prefill splits the waiting prompts in two, decode
    the batch from ``_LANE_MIN_ROWS`` sequences on. Auto (``CPU_LANES=0``): 2 when the model
    runs one intra-op thread on a host with more cores, i.e. on 2-core hosts, where the second
    core then works without OpenMP barriers (a lane that loses its core for a moment delays
    only itself). Measured there, 8 streams: 180 output tok/s with 2 lanes, 152 with 1.
    """
    if settings.cpu_lanes:
        return settings.cpu_lanes
    return 2 if torch.get_num_threads() == 1 and _cores() >= 2 else 1


def _load(settings: Settings) -> _Loaded:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    path = materialize(settings.model, settings.model_cache_dir)
    device_name = settings.device
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    if not cuda and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(_cpu_threads())
    lanes = 1 if cuda else _cpu_lanes(settings)

    requested = settings.dtype
    notes: list[str] = []
    packed = False  # CPU GEMMs with float32 activations over packed weights (_PackedLinear)
    if cuda:
        if requested == "auto":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = getattr(torch, requested)
    else:
        if requested in ("auto", "float16"):
            dtype = torch.float32
            packed = not settings.load_in_8bit and _fbgemm_fp16_available()
            if requested == "float16" and not packed:
                notes.append("float16 requested on CPU: fbgemm unavailable, using float32")
        elif requested == "bfloat16":
            dtype = torch.bfloat16
            if not cpu_has_native_bf16():
                notes.append("bfloat16 on a CPU without native bf16 support is slower than float32")
        else:
            dtype = getattr(torch, requested)

    attn = "sdpa"
    flash = False
    if settings.use_flash_attention:
        if cuda and importlib.util.find_spec("flash_attn") is not None:
            attn, flash = "flash_attention_2", True
        else:
            notes.append("USE_FLASH_ATTENTION ignored (needs CUDA and the flash-attn package): using sdpa")

    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn}
    quantized8 = False
    if settings.load_in_8bit and cuda:
        if importlib.util.find_spec("bitsandbytes") is not None:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
            kwargs["device_map"] = {"": device}
            quantized8 = True
        else:
            notes.append("LOAD_IN_8BIT ignored: bitsandbytes is not installed")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model: Any = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if not quantized8:
        model.to(device)
    model.eval()
    model.requires_grad_(False)

    weights = str(dtype).removeprefix("torch.")
    big = ""  # the second weight copy of _PackedLinear, for many rows
    _PackedLinear.big_min_rows = 1 << 30  # class-wide: an earlier load in this process must not leak in
    if packed and requested == "auto" and _mkldnn_bf16_available():
        big, _PackedLinear.big_min_rows = "bf16", _BF16_MIN_ROWS
    elif packed and torch.get_num_threads() > 1:  # MKL runs float32 GEMMs multi-threaded; fbgemm does not
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = _calibrate_dense_rows(2 * getattr(model.config, "intermediate_size", 4096), model.config.hidden_size)
        big, _PackedLinear.big_min_rows = ("fp32", rows) if rows < 1 << 30 else ("", rows)
        notes.append(
            f"float32 MKL GEMMs from {rows} rows on (measured faster with {torch.get_num_threads()} threads)"
            if big
            else f"fbgemm float16 GEMMs measured faster than float32 MKL with {torch.get_num_threads()} threads"
        )
    exact = big != "bf16" or settings.exact_decode
    _PackedLinear.decode_big_min_rows = 1 << 30 if exact else _BF16_DECODE_MIN_ROWS
    if big == "bf16":
        packing = "fbgemm-packed float16 weights for decode, oneDNN bfloat16 (native) for prompt prefill"
        if not exact:
            packing += f" and decode GEMMs from {_BF16_DECODE_MIN_ROWS} rows (EXACT_DECODE=false)"
    else:
        packing = "fbgemm-packed float16 weights"
    fast = None
    if not quantized8 and not (settings.load_in_8bit and not cuda) and _FastDecoder.supports(model):
        if packed:

            def make_linear(w: torch.Tensor, b: torch.Tensor | None) -> nn.Module:
                return _PackedLinear(w, b, big)

        else:

            def make_linear(w: torch.Tensor, b: torch.Tensor | None) -> nn.Module:
                return _DenseLinear(w, b)

        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            candidate = _FastDecoder(model, make_linear)
        error = _check_fast_decoder(model, candidate, device)
        if error is None:
            fast = candidate
            fast.drop_model_weights(model)
        else:
            notes.append(f"lean forward rejected ({error}): using the transformers forward")
    if fast is not None:
        weights = "fused q/k/v and gate/up GEMMs with " + (
            f"float32 activations, {packing}" if packed else f"{weights} weights"
        )
    elif not cuda and settings.load_in_8bit:
        from torch.ao.quantization import per_channel_dynamic_qconfig

        qconfig = {nn.Linear: per_channel_dynamic_qconfig}
        model = torch.ao.quantization.quantize_dynamic(model, qconfig, dtype=torch.qint8)
        weights = "float32 activations, dynamic int8 Linear layers (torch.ao, per-channel)"
        notes.append(
            "LOAD_IN_8BIT on CPU: int8 weights take half the memory of the default fbgemm float16 path but were "
            "measured no faster on AVX2 and change outputs; leave it off unless memory is short"
        )
    elif packed:
        n = _pack_linears(model, lambda linear: _PackedLinear(linear.weight, linear.bias, big))
        weights = f"float32 activations, {n} Linear layers with {packing}"
    elif quantized8:
        weights += ", bitsandbytes int8"

    _register_attention()
    model.set_attn_implementation(SLOT_ATTENTION)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    positions = int(getattr(config, "max_position_embeddings", None) or settings.max_model_len)
    max_len = min(settings.max_model_len, positions)
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and int(window) < max_len:
        notes.append(f"context capped at the sliding window ({window})")
        max_len = int(window)

    eos: set[int] = set()
    for source in (getattr(model, "generation_config", None), config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            eos.add(value)
        elif isinstance(value, (list, tuple)):
            eos.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))

    attention = (
        "flash-attn 2 prefill + batched slot-cache decode" if flash else "sdpa prefill + batched slot-cache decode"
    )
    attention += "; forward: " + ("lean fused Llama path (checked against transformers)" if fast else "transformers")
    summary = (
        f"device={device} ({torch.get_num_threads()} threads)" if not cuda else f"device={device}"
    ) + f"; weights: {weights}; attention: {attention}"
    if notes:
        summary += "; " + "; ".join(notes)
    log.info("loaded %s in %.1f s: %s", path, time.monotonic() - started, summary)
    for note in notes:
        log.warning("%s", note)
    return _Loaded(model, tokenizer, device, path, summary, flash, max_len, eos, fast, lanes)


def _check_fast_decoder(model, fast: _FastDecoder, device: torch.device) -> str | None:
    """Compare the lean forward with transformers' on a short prompt (prefill + one decode step)."""
    config = model.config
    ids = torch.tensor([1, 504, 3458, 282, 4649, 314, 7042, 30, 378, 3458, 282, 253, 1345, 28, 314, 2], device=device)
    ids = ids % config.vocab_size
    t = ids.shape[0]
    try:
        with torch.inference_mode():
            ref = model(input_ids=ids[None], use_cache=False).logits[0].float()
            cache = _SlotCache(config.num_hidden_layers, 1, fast.kv_heads, fast.head_dim, 64, fast.embed.dtype, device)
            pos = torch.arange(t, device=device)
            prefill = _Prefill(cache, [0], [0], [t - 1], flash=False)
            got = fast.forward(prefill, ids[:-1], pos[:-1], None).float()
            decode = _Decode(cache, pos[-1:], t, fast.embed.dtype)
            last = fast.forward(decode, ids[-1:], pos[-1:], None).float()
    except Exception as exc:
        return repr(exc)
    got = torch.cat([got, last])
    scale = ref.abs().max().item()
    err = (got - ref).abs().max().item()
    bf16 = fast.embed.dtype != torch.float32 or getattr(fast.layers[0].qkv, "bf16", None) is not None
    tolerance = 6e-2 if bf16 else 2e-2
    if not err <= tolerance * max(1.0, scale):
        return f"max logit difference {err:.3g} (scale {scale:.3g})"
    log.info("lean forward matches transformers: max logit difference %.2g (logit scale %.3g)", err, scale)
    return None
