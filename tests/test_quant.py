"""Group quantization (quant.py): the per-group error bound, each format's kernel and dequantizing paths
against the dense forward on the same dequantized weights, the error against fp32, layout and errors."""

from __future__ import annotations

import pytest
import torch

from offload_moe.config import ModelConfig
from offload_moe.errors import UserError
from offload_moe.formats import cpu_kernels
from offload_moe.formats.base import ALIGN, DenseFormat
from offload_moe.formats.group import dequantize, quantize
from offload_moe.formats.int4 import INT4_KERNEL_MAX_TOKENS, Int4Format
from offload_moe.formats.int8 import INT8_BMM_MAX_TOKENS, Int8Format
from offload_moe.formats.int8_linear import Int8Linear, int8_parts
from offload_moe.formats.registry import bytes_per_expert, expert_format

D, I = 256, 384  # multiples of every group size and of the int4 kernel's row block (64)
CONFIG = ModelConfig(dim=D, n_layers=1, n_heads=4, n_kv_heads=4, head_dim=64, ffn_dim=I, num_experts=2, top_k=1,
                     vocab_size=16)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def expert(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights at the scale of Mixtral's init (std 0.02)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"w1": (I, D), "w3": (I, D), "w2": (D, I)}
    return {k: (torch.randn(*s, generator=g) * 0.02).to(dtype) for k, s in shapes.items()}


def packed(fmt, parts: dict[str, torch.Tensor]) -> tuple:
    buf = torch.empty(fmt.nbytes, dtype=torch.uint8)
    fmt.pack(parts, buf)
    return fmt.views(buf)


def dense_forward(parts: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    fmt = DenseFormat(CONFIG, torch.float32)
    return fmt.forward(x, packed(fmt, {k: v.float() for k, v in parts.items()}))


def dequantized(parts: dict[str, torch.Tensor], bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """The weights a quantized format stands for (w1 and w3 quantized fused, as the formats do)."""
    w13 = dequantize(*quantize(torch.cat((parts["w1"], parts["w3"])), bits, group_size), bits, group_size)
    w2 = dequantize(*quantize(parts["w2"], bits, group_size), bits, group_size)
    return {"w1": w13[:I], "w3": w13[I:], "w2": w2}


def max_rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


def awkward_rows(cols: int) -> torch.Tensor:
    """Rows whose groups are Gaussian, constant, all zero, far from 0, tiny, huge and one-outlier."""
    g = torch.Generator().manual_seed(1)
    rows = [torch.randn(cols, generator=g) * 0.02, torch.full((cols,), 0.37), torch.zeros(cols),
            1 + torch.rand(cols, generator=g) * 0.01, torch.randn(cols, generator=g) * 1e-6,
            torch.randn(cols, generator=g) * 1e3]
    spike = torch.randn(cols, generator=g) * 0.01
    spike[::17] = 0.5
    return torch.stack(rows + [spike])  # [7, cols]


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_error_is_at_most_half_a_step_per_group(bits, group_size, scale_dtype):
    w = torch.cat([awkward_rows(512), torch.randn(64, 512) * 0.02])
    q, scales, zeros = quantize(w, bits, group_size, scale_dtype)
    assert q.dtype == torch.uint8 and q.shape == w.shape and int(q.max()) < 2**bits
    assert scales.dtype == zeros.dtype == scale_dtype and scales.shape == (w.shape[0], 512 // group_size)
    err = (dequantize(q, scales, zeros, bits, group_size) - w).abs()  # [rows, cols]
    bound = scales.float().repeat_interleave(group_size, dim=1) / 2  # [rows, cols]
    assert (err <= bound * (1 + 1e-5) + 1e-7 * w.abs().amax(dim=1, keepdim=True)).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_stored_scale_is_the_ideal_step_up_to_bf16_rounding(bits):
    w = torch.randn(256, 512) * 0.02
    _, scales, _ = quantize(w, bits, 64)
    wg = w.view(256, 8, 64)  # [rows, G, gs]
    ideal = (wg.amax(-1) - wg.amin(-1)) / (2**bits - 1)
    ratio = scales.float() / ideal
    assert ratio.min() >= 1 and ratio.max() < 1.012  # zero's rounding (<0.4%) + the scale's own (<0.8%)


@pytest.mark.parametrize("T", [1, 3, 16])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("fmt_cls", [Int8Format, Int4Format])
def test_forward_equals_dense_forward_on_dequantized_weights(fmt_cls, group_size, dtype, T):
    """Both paths (the kernel where one applies, and dequantize + matmul) compute the expert whose weights
    are `dequantize(quantize(w))`. Measured max error relative to the output's largest element (5 seeds):
    fp32 dequantizing path 0 (the same fp32 matmul); fp16 8.5e-4; any path through bf16 (bf16 compute,
    and the int4 CPU kernel, which casts to bf16 whatever the compute dtype) 6.6e-3. A wrong layout,
    zero or scale shows as O(1). One token on the CPU runs the C kernel where it is built (cpu_kernels.py),
    on quantized activations: int8 weights x int16 activations measured 7.6e-5 in fp32 (bf16 and fp16 as
    above), int4 x int8 activations (llama.cpp's q4_0 x q8_0) 6.6e-2, far below int4's own error."""
    fmt = fmt_cls(CONFIG, dtype, group_size)
    parts = expert(seed=T)
    views = packed(fmt, parts)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(2))
    ref = dense_forward(dequantized(parts, fmt.bits, group_size), x)
    through_bf16 = dtype == torch.bfloat16 or fmt_cls is Int4Format
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
    kernel = {Int8Format: max(2e-4, tol[dtype]), Int4Format: 0.1}[fmt_cls] if fmt.kernel.runs(x) else None
    y, y_dequant = fmt.forward(x.to(dtype), views), fmt.forward_dequant(x.to(dtype), views)
    assert y.dtype == y_dequant.dtype == dtype and y.shape == (T, D)
    assert max_rel(y, ref) < (kernel or (1e-2 if through_bf16 else tol[dtype]))
    assert max_rel(y_dequant, ref) < tol[dtype]


@pytest.mark.parametrize("T", [1, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_linear_computes_with_its_dequantized_weights(dtype, T):
    """Attention's int8 projection: the int8 expert's matrix layout and kernels, in a module. Same
    tolerances as the experts' (T=1 runs the C kernel where it is built: 2e-4)."""
    w = torch.randn(192, D, generator=torch.Generator().manual_seed(1)) * 0.02  # [N, K]
    lin = Int8Linear(D, 192, 64)
    lin.load_state_dict(int8_parts(w, 64))
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(2))
    ref = x @ dequantize(*quantize(w, 8, 64), 8, 64).T  # [T, N]
    y = lin(x.to(dtype))
    assert y.dtype == dtype and y.shape == (T, 192)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert max_rel(y, ref) < (max(tol, 2e-4) if T == 1 and cpu_kernels.library() is not None else tol)


def largest_allocation(fn) -> int:
    """Bytes of the largest single allocation that `fn()` makes (torch's profiler, CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.self_cpu_memory_usage for e in prof.events()), default=0)


@pytest.mark.parametrize("T", [1, 20])  # the CPU's batched int8 kernel, and dequantizing (as off the CPU)
def test_int8_linear_allocates_nothing_of_a_weights_size(T):
    """Int8Linear widens or rebuilds its matrix in the scratch buffer, allocated once: a call's largest
    allocation is smaller than even the int8 codes (without the buffer: the fp32 matrix, 4x the codes)."""
    from offload_moe.formats.int8 import int8_linear

    N = 512
    lin = Int8Linear(D, N, 64)
    lin.load_state_dict(int8_parts(torch.randn(N, D) * 0.02, 64))
    x = torch.randn(T, D)
    lin(x)  # the first call allocates the scratch buffer
    buf = lin.scratch.get(x.device, torch.float32)
    assert largest_allocation(lambda: lin(x)) < N * D
    assert lin.scratch.get(x.device, torch.float32).data_ptr() == buf.data_ptr() and len(lin.scratch.buffers) == 1
    unbuffered = largest_allocation(lambda: int8_linear(x, lin.codes, lin.scales, lin.zeros, True))
    if T == 1 and cpu_kernels.library() is not None:  # the C kernel reads the codes in place
        assert unbuffered < N * D
    else:
        assert unbuffered >= 4 * N * D


def test_int8_attention_shares_one_scratch_sized_to_the_largest_projection():
    from offload_moe.formats.int8_linear import int8_attention
    from offload_moe.modeling.transformer import Transformer

    config = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=128, num_experts=2,
                         top_k=1, vocab_size=16)  # wq [256, 128], wk wv [128, 128], wo [128, 256]
    with torch.device("meta"):
        model = Transformer(config)
    int8_attention(model, 64)
    linears = [getattr(blk.attention, n) for blk in model.layers for n in ("wq", "wk", "wv", "wo")]
    assert all(isinstance(lin, Int8Linear) for lin in linears)
    assert len({id(lin.scratch) for lin in linears}) == 1 and linears[0].scratch.numel == 256 * 128
    assert not linears[0].scratch.buffers  # nothing allocated before the first call


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt_cls", [Int8Format, Int4Format])
def test_device_path_as_cuda_runs_it(fmt_cls, dtype):
    """A buffer off the CPU dequantizes in the compute dtype and calls F.linear: run that very code here
    (views flagged off-CPU), and check it on the meta device for shapes and dtypes."""
    fmt = fmt_cls(CONFIG, dtype, 64)
    parts = expert()
    w13, w2, _ = packed(fmt, parts)
    x = torch.randn(5, D)
    ref = dense_forward(dequantized(parts, fmt.bits, 64), x)
    assert max_rel(fmt.forward(x.to(dtype), (w13, w2, False)), ref) < (2e-3 if dtype == torch.float16 else 1e-2)
    meta = fmt.views(torch.empty(fmt.nbytes, dtype=torch.uint8, device="meta"))
    y = fmt.forward(torch.empty(5, D, dtype=dtype, device="meta"), meta)
    assert meta[2] is False and y.shape == (5, D) and y.dtype == dtype


@pytest.mark.parametrize("fmt_cls", [Int8Format, Int4Format])
def test_dequantizing_reuses_one_scratch_buffer(fmt_cls):
    """The hot path allocates no weight-sized memory: every dequantizing call of a (device, dtype)
    rebuilds its matrix in the same buffer, allocated at the first call."""
    fmt = fmt_cls(CONFIG, torch.float16, 64)
    w13, w2, _ = packed(fmt, expert())
    x = torch.randn(20, D, dtype=torch.float16)  # more tokens than the CPU fast paths take
    first = fmt.forward(x, (w13, w2, False))
    buf = fmt.scratch(torch.device("cpu"), torch.float16)
    ptr = buf.data_ptr()
    second = fmt.forward(x, (w13, w2, False))
    assert torch.equal(first, second) and fmt.scratch(torch.device("cpu"), torch.float16).data_ptr() == ptr
    assert list(fmt._scratch) == [(torch.device("cpu"), torch.float16)] and buf.numel() == 2 * I * D


def test_the_int4_kernel_runs_on_avx512():
    """Without this the kernel paths above could silently be the dequantizing one. Elsewhere (AVX2
    orders the codes in blocks of 32, ARM otherwise) the kernel is off."""
    on = torch.backends.cpu.get_cpu_capability() == "AVX512"
    assert Int4Format(CONFIG, torch.float32).cpu_kernel == on
    assert INT8_BMM_MAX_TOKENS >= 1 and INT4_KERNEL_MAX_TOKENS >= 16  # decode-shaped calls take the fast paths


def test_int4_code_layout_is_fixed():
    """The bytes are a file format (packed.py stores them), the same on every machine: rows in blocks of
    64, each block k-major, byte j of each k holding rows j (low nibble) and j + 32 (high nibble)."""
    fmt = Int4Format(CONFIG, torch.float32, 64)
    parts = expert()
    (codes, _), _, _ = packed(fmt, parts)
    q = quantize(torch.cat((parts["w1"], parts["w3"])), 4, 64)[0]  # [2I, D]
    blocks = q.view(2 * I // 64, 64, D)  # [N/64, 64, D]
    expected = (blocks[:, :32] | (blocks[:, 32:] << 4)).transpose(1, 2)  # [N/64, 32, D] -> [N/64, D, 32]
    assert torch.equal(codes.view(2 * I // 64, D, 32), expected)  # [2I, D/2] -> [N/64, D, 32]
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert torch.equal(codes, torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1))


@pytest.mark.parametrize("fmt_cls", [Int8Format, Int4Format])
def test_dim_an_odd_multiple_of_32(fmt_cls):
    """D = 96: w2's int4 codes come in row blocks of 32 and the int4 kernel is off; both still exact."""
    config = ModelConfig(dim=96, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=96, ffn_dim=128, num_experts=2,
                         top_k=1, vocab_size=16)
    fmt = fmt_cls(config, torch.float32, 32)
    g = torch.Generator().manual_seed(4)
    shapes = {"w1": (128, 96), "w3": (128, 96), "w2": (96, 128)}
    parts = {k: torch.randn(*s, generator=g) * 0.02 for k, s in shapes.items()}
    w13 = dequantize(*quantize(torch.cat((parts["w1"], parts["w3"])), fmt.bits, 32), fmt.bits, 32)
    w2 = dequantize(*quantize(parts["w2"], fmt.bits, 32), fmt.bits, 32)
    dense = DenseFormat(config, torch.float32)
    x = torch.randn(3, 96, generator=g)
    ref = dense.forward(x, packed(dense, {"w1": w13[:128], "w3": w13[128:], "w2": w2}))
    assert getattr(fmt, "cpu_kernel", False) is False
    assert max_rel(fmt.forward(x, packed(fmt, parts)), ref) < 1e-5


@pytest.mark.parametrize("name, bound", [("int8", 0.02), ("int4", 0.25)])
def test_forward_error_against_fp32_weights(name, bound):
    """Relative error (norm) against the fp32 expert on random std-0.02 weights, T = 16, worst of 5 seeds
    and every compute dtype, as measured: int8 g32 0.0085, g64 0.0110, g128 0.0122; int4 g32 0.137,
    g64 0.164, g128 0.190. The bounds leave ~1.3x to 2x margin."""
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(3))
    for group_size in (32, 64, 128):
        for dtype in (torch.float32, torch.bfloat16):  # fp16 measured between the two
            parts = expert(seed=group_size)
            fmt = expert_format(name, CONFIG, dtype, group_size)
            assert rel(fmt.forward(x.to(dtype), packed(fmt, parts)), dense_forward(parts, x)) < bound


def test_pack_takes_bf16_checkpoint_weights():
    parts = expert(dtype=torch.bfloat16)
    x = torch.randn(2, D)
    for name in ("int8", "int4"):
        fmt = expert_format(name, CONFIG, torch.float32, 64)
        y = fmt.forward_dequant(x, packed(fmt, parts))
        assert max_rel(y, dense_forward(dequantized(parts, fmt.bits, 64), x)) < 1e-5


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("name", ["int8", "int4"])
def test_buffer_layout_is_aligned_and_sized(name, group_size):
    fmt = expert_format(name, CONFIG, torch.float16, group_size)
    assert fmt.name == f"{name}-g{group_size}"
    assert fmt.nbytes % ALIGN == 0 and bytes_per_expert(CONFIG, name, group_size) == fmt.nbytes
    buf = torch.empty(fmt.nbytes, dtype=torch.uint8)
    w13, w2, on_cpu = fmt.views(buf)
    assert on_cpu
    for view in w13 + w2:
        assert (view.data_ptr() - buf.data_ptr()) % ALIGN == 0
        assert view.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()  # views, not copies
    codes = 3 * D * I * fmt.bits // 8
    scales_zeros = 2 * 2 * (2 * I * D + D * I) // group_size  # bf16 scale and zero per group
    assert codes + scales_zeros <= fmt.nbytes < codes + scales_zeros + 6 * ALIGN


def test_mixtral_sizes():
    mixtral = ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336,
                          num_experts=8, top_k=2, vocab_size=32000)
    assert bytes_per_expert(mixtral, "none", 64, torch.float16) == 352_321_536
    assert bytes_per_expert(mixtral, "int8", 64) == 187_170_816
    assert bytes_per_expert(mixtral, "int4", 64) == 99_090_432
    assert bytes_per_expert(mixtral, "int4", 128) == 93_585_408


def test_none_is_the_dense_format():
    fmt = expert_format("none", CONFIG, torch.bfloat16, 64)
    assert isinstance(fmt, DenseFormat) and fmt.name == "bf16"


@pytest.mark.parametrize("call, message", [
    (lambda: expert_format("int3", CONFIG, torch.float32, 64), "unknown expert quantization 'int3'"),
    (lambda: expert_format("int4", CONFIG, torch.float32, 48), "group size must be one of (32, 64, 128)"),
    (lambda: expert_format("int8", CONFIG, torch.float32, 256), "group size must be one of (32, 64, 128)"),
    (lambda: Int4Format(ModelConfig(dim=96, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=96, ffn_dim=128,
                                    num_experts=2, top_k=1, vocab_size=16), torch.float32, 64),
     "model dim 96 is not a multiple of the quantization group size 64"),
    (lambda: Int8Format(ModelConfig(dim=128, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=128, ffn_dim=80,
                                    num_experts=2, top_k=1, vocab_size=16), torch.float32, 32),
     "expert ffn dim 80 is not a multiple of the quantization group size 32"),
    (lambda: quantize(torch.zeros(4, 64), 3, 32), "bits must be 4 or 8"),
])
def test_bad_settings_raise_user_error(call, message):
    with pytest.raises(UserError) as info:
        call()
    assert message in str(info.value) and "\n" not in str(info.value)
