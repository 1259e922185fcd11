"""The CPU's GEMM choice for several tokens (formats/gemm.py): either of torch's two gives F.linear's products."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from offload_moe.formats import gemm


@pytest.mark.parametrize("T", [1, 2, 37])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_gives_f_linear(T, bias):
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, 3 * 96, generator=g)[:, ::3]  # a strided view
    w = torch.randn(200, 96, generator=g)
    b = torch.randn(200, generator=g) if bias else None
    ref = F.linear(x, w, b)
    y = gemm.linear(x, w, b)
    assert y.shape == ref.shape and torch.allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_the_choice_is_one_of_torchs_two_and_is_kept():
    assert gemm.faster_gemm() in ("onednn", "mkl")
    assert gemm.faster_gemm() == gemm.faster_gemm()


def test_other_dtypes_take_f_linear():
    x, w = torch.randn(4, 64, dtype=torch.bfloat16), torch.randn(32, 64, dtype=torch.bfloat16)
    assert torch.equal(gemm.linear(x, w), F.linear(x, w))
