"""The int4 CUDA layout (`int4-gG-cuda`): torch's CUDA int4 kernel tiles, built and read by our own torch
code so that every part but the kernel itself is checked on the CPU; the format names through packed
folders and the engine; the rule for a folder whose layout is not the device's. The kernel runs in the
GPU test at the end and in bench/gpu_check.py."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli

from offload_moe.config import ModelConfig
from offload_moe.engine import Engine
from offload_moe.errors import UserError
from offload_moe.formats.base import ALIGN
from offload_moe.formats.group import dequantize, quantize
from offload_moe.formats.int4 import INT4_CUDA_KERNEL_MAX_TOKENS, Int4Format
from offload_moe.formats.int4_layouts import (
    cuda_inner_k_tiles,
    cuda_int4_kernel_runs,
    cuda_tile_shape,
    int4_converter_bytes,
    int4_layout_for,
    tile_int4,
    untile_int4,
)
from offload_moe.formats.registry import expert_format, parse_format_name
from offload_moe.options import EngineOptions
from offload_moe.plan import expert_format_for
from offload_moe.weights.convert import convert
from offload_moe.weights.packed import INDEX

D, I = 256, 384
CONFIG = ModelConfig(dim=D, n_layers=1, n_heads=4, n_kv_heads=4, head_dim=64, ffn_dim=I, num_experts=2, top_k=1,
                     vocab_size=16)
MIXTRAL = ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336, num_experts=8,
                      top_k=2, vocab_size=32000)
PROMPT = [1, 415, 2936, 9060, 285, 1142, 28705, 28740]


def codes(N: int, K: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 16, (N, K), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)


def expert(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) * 0.02 for k, s in {"w1": (I, D), "w3": (I, D), "w2": (D, I)}.items()}


def packed(fmt, parts: dict[str, torch.Tensor], device: str = "cpu") -> tuple:
    buf = torch.empty(fmt.nbytes, dtype=torch.uint8)
    fmt.pack({k: v.to(device) for k, v in parts.items()}, buf)
    return fmt.views(buf.to(device))


def converter_transcription(data: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """`matrix_to_m16n8k16_Bint4_layout` (aten/src/ATen/native/cuda/int4mm.cu, the kernel behind
    `_convert_weight_to_int4pack` on NVIDIA GPUs) transcribed loop for loop: uint8 [N, K/2] -> int32
    [N/8, K/(16t), 32, t/2]. Slow; small shapes only."""
    N, half_k = data.shape
    k_outer_tiles = 2 * half_k // (inner_k_tiles * 16)
    out = torch.zeros(N // 8, k_outer_tiles, 32, inner_k_tiles // 2, dtype=torch.int64)
    for n_tile in range(N // 8):
        for k_outer in range(k_outer_tiles):
            for t in range(32):
                for inner in range(0, inner_k_tiles, 2):
                    n0 = n_tile * 8 + t // 4
                    k_base0 = (k_outer * inner_k_tiles + inner) * 16 // 2
                    ks = [k_base0 + t % 4, k_base0 + t % 4 + 4, k_base0 + 8 + t % 4, k_base0 + 8 + t % 4 + 4]
                    v = [int(data[n0, k]) for k in ks]
                    pack = ((v[3] & 0xF) << 28 | (v[2] & 0xF) << 24 | (v[1] & 0xF) << 20 | (v[0] & 0xF) << 16
                            | (v[3] & 0xF0) << 8 | (v[2] & 0xF0) << 4 | (v[1] & 0xF0) | (v[0] & 0xF0) >> 4)
                    out[n_tile, k_outer, t, inner // 2] = pack - (1 << 32 if pack >= 1 << 31 else 0)
    return out.to(torch.int32)


def kernel_emulation(x: torch.Tensor, tiles: torch.Tensor, group_size: int, sz: torch.Tensor) -> torch.Tensor:
    """`_weight_int4pack_mm` on the CPU, from the CUDA kernel's checks and its B-tile decode (lane t of
    n-tile n holds row 8n + t//4; word j's nibble i (bits 4i) is input 16 k-tile + 2 (t%4) + 8 (i%2),
    k-tile = 8-tile pair 2j + i//2, and bits 16 + 4i the next input; w = (q - 8) * scale + zero in bf16,
    fp32 accumulation, bf16 out). Written apart from `untile_int4`, so that it checks it."""
    assert x.dtype == torch.bfloat16 and x.is_contiguous() and x.dim() == 2
    assert tiles.dtype == torch.int32 and tiles.is_contiguous() and tiles.dim() == 4 and tiles.shape[2] == 32
    t = tiles.shape[3] * 2
    K, N = x.shape[1], tiles.shape[0] * 8
    assert t in (2, 4, 8) and tiles.shape[1] == K // (16 * t) and group_size in (32, 64, 128, 256)
    assert sz.dim() == 3 and sz.shape == (K // group_size, N, 2) and sz.dtype == torch.bfloat16
    q = torch.zeros(N, K, dtype=torch.int64)
    words = tiles.to(torch.int64) & 0xFFFFFFFF
    for lane in range(32):
        for j in range(t // 2):
            for i in range(4):
                k_tile = torch.arange(tiles.shape[1]) * t + 2 * j + i // 2  # [K/(16t)]
                k = (k_tile * 16 + 2 * (lane % 4) + 8 * (i % 2)).repeat(tiles.shape[0])
                rows = (torch.arange(tiles.shape[0]) * 8 + lane // 4).repeat_interleave(tiles.shape[1])
                w = words[:, :, lane, j].reshape(-1)
                q[rows, k] = (w >> (4 * i)) & 0xF
                q[rows, k + 1] = (w >> (16 + 4 * i)) & 0xF
    s = sz[..., 0].T.repeat_interleave(group_size, dim=1)  # [N, K] bf16
    z = sz[..., 1].T.repeat_interleave(group_size, dim=1)
    w = ((q - 8).to(torch.bfloat16) * s + z).float()  # dequantized in bf16, as the kernel's hfma2
    return (x.float() @ w.T).to(torch.bfloat16)


@pytest.mark.parametrize("inner_k_tiles", [2, 4, 8])
def test_tiles_are_torchs_converter_output(inner_k_tiles):
    q = codes(24, 256, inner_k_tiles)
    tiles = tile_int4(q, inner_k_tiles)
    assert tiles.dtype == torch.int32 and tiles.shape == (3, 256 // (16 * inner_k_tiles), 32, inner_k_tiles // 2)
    assert torch.equal(tiles, converter_transcription(int4_converter_bytes(q), inner_k_tiles))


def test_converter_bytes_are_torchaos_nibble_order():
    """torch >= 2.5's converter takes uint8 [N, K/2]: code 2j in the high nibble, 2j + 1 in the low one."""
    q = codes(8, 64)
    b = int4_converter_bytes(q)
    assert b.dtype == torch.uint8 and b.shape == (8, 32)
    assert torch.equal(b >> 4, q[:, 0::2]) and torch.equal(b & 15, q[:, 1::2])


@pytest.mark.parametrize("N, K", [(8, 32), (24, 96), (64, 256), (192, 64), (64, 96)])
def test_untile_inverts_tile(N, K):
    q = codes(N, K, N + K)
    t = cuda_inner_k_tiles(K)
    out = torch.full((N * K + 5,), -1.0)  # a scratch buffer larger than the matrix
    assert torch.equal(untile_int4(tile_int4(q, t), out), q.float()) and (out[N * K:] == -1).all()


def test_inner_k_tiles_and_tile_shapes():
    assert [cuda_inner_k_tiles(k) for k in (32, 64, 96, 128, 4096, 14336)] == [2, 4, 2, 8, 8, 8]
    assert cuda_tile_shape(28672, 4096) == (3584, 32, 32, 4)  # Mixtral's w13
    assert cuda_tile_shape(4096, 14336) == (512, 112, 32, 4)  # and w2
    with pytest.raises(UserError, match="multiple of 8"):
        cuda_tile_shape(12, 64)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_cuda_layout_buffer_plan(group_size):
    """Same size as the CPU layout, every part 64-byte aligned (the kernel loads 16 bytes at a time),
    contiguous (it checks), and views of the one buffer, so that a miss stays one copy."""
    cpu, cuda = (Int4Format(CONFIG, torch.float16, group_size, layout) for layout in ("cpu", "cuda"))
    assert (cpu.name, cuda.name) == (f"int4-g{group_size}", f"int4-g{group_size}-cuda")
    assert cuda.nbytes == cpu.nbytes and cuda.nbytes % ALIGN == 0
    buf = torch.empty(cuda.nbytes, dtype=torch.uint8)
    (c13, sz13), (c2, sz2), on_cpu = cuda.views(buf)
    assert on_cpu
    assert c13.dtype == c2.dtype == torch.int32 and sz13.dtype == sz2.dtype == torch.bfloat16
    assert c13.shape == cuda_tile_shape(2 * I, D) and c2.shape == cuda_tile_shape(D, I)
    assert sz13.shape == (D // group_size, 2 * I, 2) and sz2.shape == (I // group_size, D, 2)
    for view in (c13, sz13, c2, sz2):
        assert view.is_contiguous() and (view.data_ptr() - buf.data_ptr()) % ALIGN == 0
        assert view.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    assert Int4Format(MIXTRAL, torch.float16, 64, "cuda").nbytes == 99_090_432  # the profiles' memory math holds


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_layout_dequantizes_to_the_cpu_layouts_weights(dtype):
    """Off the kernel (the CPU, the CPU-miss path, a GPU without it) the CUDA layout dequantizes to the
    very weights of the CPU layout: same outputs, bit for bit, on the CPU path and the device path."""
    cpu, cuda = (Int4Format(CONFIG, dtype, 64, layout) for layout in ("cpu", "cuda"))
    parts = expert()
    v_cpu, v_cuda = packed(cpu, parts), packed(cuda, parts)
    assert cuda.cpu_kernel is False
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert torch.equal(cuda.forward(x, v_cuda), cpu.forward_dequant(x, v_cpu))
    device_path = (v_cuda[0], v_cuda[1], False), (v_cpu[0], v_cpu[1], False)  # as on a GPU without the kernel
    assert torch.equal(cuda.forward(x, device_path[0]), cpu.forward(x, device_path[1]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_path_wiring_with_an_emulated_kernel(monkeypatch, dtype):
    """The kernel call itself on the CPU: torch's op replaced by an emulation written from the CUDA
    kernel's checks and decode, the format told that the kernel runs. Checks the arguments (bf16
    activations, contiguous tiles, scales and zeros [G, N, 2]), the decode and the casts; above
    INT4_CUDA_KERNEL_MAX_TOKENS the dequantizing path runs instead."""
    calls = []

    def fake(x, tiles, group_size, sz):
        calls.append(x.shape[0])
        return kernel_emulation(x, tiles, group_size, sz)

    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm", fake)
    cpu, cuda = (Int4Format(CONFIG, dtype, 32, layout) for layout in ("cpu", "cuda"))
    cuda._cuda_kernel[torch.device("cpu")] = True
    parts = expert(2)
    w13, w2, _ = packed(cuda, parts)
    ref_views = packed(cpu, parts)
    for T in (1, 5, INT4_CUDA_KERNEL_MAX_TOKENS + 1):
        x = torch.randn(T, D, generator=torch.Generator().manual_seed(T)).to(dtype)
        y = cuda.forward(x, (w13, w2, False))
        ref = cpu.forward_dequant(x.float(), ref_views)  # fp32 on the same weights
        assert y.dtype == dtype and y.shape == (T, D)
        assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < 2e-2  # bf16 weights, activations, output
    assert calls == [1, 1, 5, 5]  # w13 and w2 of the two small calls; none for the large one


def test_format_names_round_trip():
    for quant, layout in (("int8", "cpu"), ("int4", "cpu"), ("int4", "cuda")):
        for group in (32, 64, 128):
            fmt = expert_format(quant, CONFIG, torch.float16, group, layout)
            assert parse_format_name(fmt.name) == (quant, group, layout)
            assert expert_format(*parse_format_name(fmt.name)[:1], CONFIG, torch.float16, group,
                                 parse_format_name(fmt.name)[2]).name == fmt.name
    assert parse_format_name("fp16") is None and parse_format_name("bf16") is None
    for bad in ("int4-g64-rocm", "int8-g64-cuda", "int5-g64", "int4-64"):
        with pytest.raises(UserError, match="unknown expert format"):
            parse_format_name(bad)
    with pytest.raises(UserError, match="unknown int4 layout"):
        Int4Format(CONFIG, torch.float16, 64, "tpu")


def test_layout_follows_the_device(ckpts, monkeypatch):
    """No CUDA here: every device gets the CPU layout. Where the kernel runs (faked), int4 on CUDA
    takes the CUDA layout; int8 and dense have one layout."""
    assert int4_layout_for(torch.device("cpu")) == "cpu" and not cuda_int4_kernel_runs(torch.device("cpu"))
    if not torch.cuda.is_available():
        assert int4_layout_for(torch.device("cuda")) == "cpu"
    from offload_moe.weights.checkpoint import Checkpoint

    ckpt = Checkpoint(ckpts["base"])
    int4, int8 = EngineOptions(expert_quant="int4", group_size=32), EngineOptions(expert_quant="int8", group_size=32)
    assert expert_format_for(ckpt, int4, torch.float16, torch.device("cpu")).name == "int4-g32"
    monkeypatch.setattr("offload_moe.formats.registry.int4_layout_for", lambda d: "cuda" if d.type == "cuda" else "cpu")
    assert expert_format_for(ckpt, int4, torch.float16, torch.device("cuda")).name == "int4-g32-cuda"
    assert expert_format_for(ckpt, int4, torch.float16, torch.device("cpu")).name == "int4-g32"
    assert expert_format_for(ckpt, int8, torch.float16, torch.device("cuda")).name == "int8-g32"


def test_a_folder_in_the_other_layout_runs_dequantizing_with_a_note(ckpts, tmp_path, capsys):
    """The mismatch rule: a packed folder keeps its layout; on a device whose kernel reads the other one
    its experts dequantize (same logits as the CPU layout's dequantizing path) and stderr says how to
    convert. A CPU-only machine writes the CUDA layout when asked (`convert --layout cuda`)."""
    cuda_dir, cpu_dir = tmp_path / "cuda", tmp_path / "cpu"
    code, out, err = run_cli(capsys, "convert", "--model", str(ckpts["base"]), "--out", str(cuda_dir), "--experts",
                             "int4", "--group-size", "32", "--dtype", "float32", "--layout", "cuda")
    assert code == 0, err
    assert "int4-g32-cuda" in out and json.loads((cuda_dir / INDEX).read_text())["format"] == "int4-g32-cuda"
    config = Engine.load(ckpts["base"]).config
    convert(ckpts["base"], cpu_dir, expert_format("int4", config, torch.float32, 32), torch.float32, progress=False)
    assert json.loads((cpu_dir / INDEX).read_text())["format"] == "int4-g32"  # `auto` on this machine: cpu
    capsys.readouterr()

    other = Engine.load(cuda_dir, EngineOptions(cache_experts=2))
    err = capsys.readouterr().err
    assert other.cache.fmt.name == "int4-g32-cuda" and "note:" in err and "--layout cpu" in err
    native = Engine.load(cpu_dir, EngineOptions(cache_experts=2))
    assert native.cache.fmt.name == "int4-g32" and "note:" not in capsys.readouterr().err
    native.cache.fmt.cpu_kernel = False  # the CPU layout's own dequantizing path, for an exact comparison
    native.cache.fmt.kernel = None  # (and not the C kernel's one-token steps: cpu_kernels.py)
    assert torch.equal(other.score(PROMPT), native.score(PROMPT))
    assert other.generate(PROMPT, 4).stats["expert_format"] == "int4-g32-cuda"


def test_tiered_store_packs_the_cuda_layout_from_a_checkpoint(ckpts, monkeypatch):
    """A RAM budget below the experts' size packs each expert on the CPU as it is read: the CUDA layout
    too (pure torch), with the logits of the all-in-RAM store."""
    monkeypatch.setattr("offload_moe.formats.registry.int4_layout_for", lambda d: "cuda")
    full = Engine.load(ckpts["base"], EngineOptions(cache_experts=2, expert_quant="int4", group_size=32))
    small = Engine.load(ckpts["base"], EngineOptions(cache_experts=2, expert_quant="int4", group_size=32,
                                                     ram_budget=4 * full.cache.fmt.nbytes))
    assert full.cache.fmt.name == small.cache.fmt.name == "int4-g32-cuda"
    assert full.cache.store.in_ram and not small.cache.store.in_ram
    assert torch.equal(full.score(PROMPT), small.score(PROMPT))


cuda_only = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                               reason="torch's CUDA int4 kernel and converter need a CUDA device of capability 8.0+")


@cuda_only
@pytest.mark.parametrize("inner_k_tiles", [2, 4, 8])
def test_gpu_tiles_equal_torchs_converter(inner_k_tiles):
    q = codes(64, 512, inner_k_tiles)
    theirs = torch.ops.aten._convert_weight_to_int4pack(int4_converter_bytes(q).cuda(), inner_k_tiles)
    assert torch.equal(tile_int4(q.cuda(), inner_k_tiles), theirs)
    assert torch.equal(tile_int4(q, inner_k_tiles).cuda(), theirs)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_gpu_kernel_matches_the_dequantizing_reference(dtype, group_size):
    """torch's CUDA int4 kernel against `forward_dequant` (same weights, dequantized) within int4's bf16
    tolerance, packed on the GPU as the engine does; and against the CPU layout's weights."""
    device = torch.device("cuda")
    assert cuda_int4_kernel_runs(device) and int4_layout_for(device) == "cuda"
    cuda, cpu = (Int4Format(CONFIG, dtype, group_size, layout) for layout in ("cuda", "cpu"))
    parts = expert(group_size)
    views, ref_views = packed(cuda, parts, "cuda"), packed(cpu, parts, "cuda")
    for T in (1, 7, INT4_CUDA_KERNEL_MAX_TOKENS):
        x = torch.randn(T, D, generator=torch.Generator().manual_seed(T)).to(device, dtype)
        y = cuda.forward(x, views)
        for ref in (cuda.forward_dequant(x, views), cpu.forward_dequant(x, ref_views)):
            assert y.dtype == dtype and ((y.float() - ref.float()).abs().max() / ref.float().abs().max()) < 2e-2
    w = dequantize(*quantize(parts["w2"], 4, group_size), 4, group_size)  # one matrix, by the kernel alone
    x = torch.randn(3, I, generator=torch.Generator().manual_seed(9))
    y = cuda._linear(x.to(device, dtype), views[1], False).float().cpu()
    assert ((y - x @ w.T).abs().max() / (x @ w.T).abs().max()) < 2e-2
