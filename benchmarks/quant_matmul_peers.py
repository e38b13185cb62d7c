"""Torch-side peers for benchmarks/quant_matmul.py: torch bf16 (cuBLAS), torch int4 tinygemm
(`aten._weight_int4pack_mm`) and gemlite (Triton, HQQ format, 4- and 2-bit), timed on the GPU.

Timing (`time_rotation`): the op runs once over each of R separate weight buffers (R chosen so
the buffers exceed the 50 MB L2), captured in one CUDA graph; CUDA events around `replays`
graph replays, median over trials, divided by R. The graph removes Python/launch overhead that
would otherwise dominate kernels of a few microseconds (JAX's side is CUPTI kernel time); what
is left is the graph's inter-kernel gap (well under a microsecond each), so peers are, if
anything, timed slightly pessimistically at the smallest shapes. If capture fails, plain
events around the eager loop are used and the record says so.

Numerics: every peer's first buffer is checked against x @ W_hat in float32, W_hat being the
dequantized weight in the peer's own convention; the relative error goes into the record.

Bytes that must move (per op): packed codes + scales + zeros at their stored size, x and y.
"""

from __future__ import annotations

import math
import statistics

ROTATE_BYTES = 160e6
MAX_ROTATE = 128


def rotation_count(weight_bytes: float) -> int:
    return max(2, min(MAX_ROTATE, math.ceil(ROTATE_BYTES / weight_bytes)))


def time_rotation(step, reps: int, replays: int = 5, trials: int = 10) -> tuple[float, str]:
    """us per op of `step()` (one call runs the op over all `reps` rotated buffers)."""
    import torch
    step()                                  # warm-up: autotune, module load, handles
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    step()
    e1.record()
    torch.cuda.synchronize()
    if e0.elapsed_time(e1) > 10.0:          # slow peers (tinygemm at M=4096: ~16 ms an op)
        replays, trials = 1, 5
    method = "cuda_graph"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        run = graph.replay
    except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager timing
        torch.cuda.synchronize()
        method = f"events_eager (graph capture failed: {type(e).__name__}: {str(e)[:120]})"
        graph = None
        run = step
    for _ in range(2):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(replays):
            run()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / replays / reps)
    del graph
    return statistics.median(times), method


def _relerr(y, ref) -> float:
    y = y.float()
    return float((y - ref).norm() / ref.norm())


# ------------------------------------------------------------------------------------ bf16
def torch_bf16(k: int, n: int, m: int, reps: int) -> dict:
    """torch.nn.functional.linear on bf16 weights [N, K] (cuBLAS)."""
    import torch
    dev = torch.device("cuda")
    ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(reps)]
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    us, method = time_rotation(lambda: [torch.nn.functional.linear(x, w) for w in ws], reps)
    ws.clear()
    torch.cuda.empty_cache()
    return dict(time_us=us, timing=method, weight_bytes=k * n * 2)


# ------------------------------------------------------------------------- torch int4 tinygemm
def tinygemm_dequant_reference(q, scale_zero, group_size: int):
    """W_hat [K, N] float32 from codes q [N, K] (0..15) and qScaleAndZeros [K/g, N, 2]:
    tinygemm's convention w = (q - 8) * scale + zero."""
    s = scale_zero[..., 0].float().repeat_interleave(group_size, 0)
    z = scale_zero[..., 1].float().repeat_interleave(group_size, 0)
    return (q.t().float() - 8) * s + z


def pack_int4_uint8(q):
    """Codes [N, K] (0..15) -> uint8 [N, K/2], even K index in the high nibble: the input
    `aten._convert_weight_to_int4pack` takes on CUDA since torch 2.5."""
    import torch
    return ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)


def random_int4_weight(k: int, n: int, group_size: int, device, generator=None):
    import torch
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, device=device, generator=generator)
    scale = torch.rand(k // group_size, n, device=device, generator=generator) * 0.015 + 0.005
    zero = torch.randn(k // group_size, n, device=device, generator=generator) * 0.02
    return q, torch.stack([scale, zero], -1).to(torch.bfloat16).contiguous()


def torch_int4(k: int, n: int, m: int, group_size: int, inner_k_tiles: int = 8) -> dict:
    """aten._weight_int4pack_mm (tinygemm, CUDA): bf16 x, int4 weight, bf16 scale+zero per group."""
    import torch
    dev = torch.device("cuda")
    wbytes = k * n / 2 + (k // group_size) * n * 2 * 2
    reps = rotation_count(wbytes)
    gen = torch.Generator(device=dev).manual_seed(k * 31 + n + group_size)
    packed, szs, first = [], [], None
    for i in range(reps):
        q, sz = random_int4_weight(k, n, group_size, dev, gen)
        packed.append(torch.ops.aten._convert_weight_to_int4pack(pack_int4_uint8(q), inner_k_tiles))
        szs.append(sz)
        if i == 0:
            first = (q, sz)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm(x, packed[0], group_size, szs[0])
    ref = x.float() @ tinygemm_dequant_reference(first[0], first[1], group_size)
    err = _relerr(y, ref)
    del first, ref, y

    def step():
        return [torch.ops.aten._weight_int4pack_mm(x, w, group_size, sz) for w, sz in zip(packed, szs)]

    us, method = time_rotation(step, reps)
    packed.clear()
    szs.clear()
    torch.cuda.empty_cache()
    return dict(time_us=us, timing=method, weight_bytes=wbytes, relerr=err, rotated=reps,
                config=f"innerKTiles={inner_k_tiles}")


# ---------------------------------------------------------------------------------- gemlite
_GEMLITE = {}


def gemlite_module(autotune: str):
    """Import gemlite once (it reads the GPU at import) and set its autotune mode.

    autotune "default": one or two configs per kernel unless gemlite's shipped H100 config cache
    has the (M bucket, N, K, group, bits) key; "fast": gemlite's own fast sweep (~20 configs,
    Triton-compiled each, minutes over the whole grid).
    """
    if "mod" not in _GEMLITE:
        import gemlite
        gemlite.set_autotune(autotune)
        _GEMLITE["mod"] = gemlite
        _GEMLITE["autotune"] = autotune
    return _GEMLITE["mod"]


def gemlite_cached(gemlite, matmul_type: str, m: int, k: int, n: int, group_size: int, bits: int) -> bool:
    """Whether gemlite's loaded config cache (its shipped h100.json) tunes this key."""
    try:
        from gemlite.core import GEMLITE_TRITON_CONFIG_CACHE
        from gemlite.triton_kernels.utils import get_closest_m
        e = 32 // bits
        sig = str((get_closest_m(m), n, k, group_size, e, 100 + bits))  # bf16 shares fp16's key
        return sig in GEMLITE_TRITON_CONFIG_CACHE.get(matmul_type, {})
    except Exception:  # noqa: BLE001 - informational only
        return False


def gemlite_w(k: int, n: int, m: int, bits: int, group_size: int, autotune: str = "default") -> dict:
    """gemlite GemLiteLinear, bf16 in/out, HQQ asymmetric codes (W ~ (Wq - z) * s), 32-bit packing."""
    import torch
    gemlite = gemlite_module(autotune)
    from gemlite.core import get_matmul_type
    dev = torch.device("cuda")
    wbytes = k * n * bits / 8 + 2 * (k // group_size) * n * 2
    reps = rotation_count(wbytes)
    gen = torch.Generator(device=dev).manual_seed(k * 17 + n + bits)
    layers, first = [], None
    for i in range(reps):
        wq = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, device=dev, generator=gen)
        s = (torch.rand(n, k // group_size, device=dev, generator=gen) * 0.015 + 0.005).to(torch.bfloat16)
        z = (torch.rand(n, k // group_size, device=dev, generator=gen) * (2**bits - 1)).to(torch.bfloat16)
        lin = gemlite.GemLiteLinear(bits, group_size=group_size, in_features=k, out_features=n,
                                    input_dtype=gemlite.DType.BF16, output_dtype=gemlite.DType.BF16)
        lin.pack(wq, s, z, bias=None)
        layers.append(lin)
        if i == 0:
            first = (wq, s, z)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    y = layers[0](x)
    wq, s, z = first
    w_hat = ((wq.float() - z.float().repeat_interleave(group_size, 1)) * s.float().repeat_interleave(group_size, 1)).t()
    err = _relerr(y, x.float() @ w_hat)
    del first, w_hat, y
    mtype = get_matmul_type(m, bits)
    us, method = time_rotation(lambda: [lin(x) for lin in layers], reps)
    layers.clear()
    torch.cuda.empty_cache()
    return dict(time_us=us, timing=method, weight_bytes=wbytes, relerr=err, rotated=reps,
                config=f"{mtype} autotune={autotune} h100_cache={gemlite_cached(gemlite, mtype, m, k, n, group_size, bits)}")
