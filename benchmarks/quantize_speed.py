"""Quantization speed: HQQ and MiLo 3-bit g64 on one Mixtral-8x7B layer's experts, against the hqq package.

A Mixtral layer has 8 experts x {w1, w3: [4096, 14336], w2: [14336, 4096]} (Flax [in, out]).
Ours quantizes each stacked [8, K, N] tensor in one jitted, vmapped call; the hqq package quantizes
the 24 matrices one by one (its Quantizer.quantize, torch Linear layout [out, in], axis=1), on the
same GPU in the same run, on the same (heavy-tailed, bf16) weights. MiLo (milo_jax.quant.lowrank.
quantize_lowrank: rank-32 compensator per expert, bf16 factors, up to 20 alternation rounds with
tolerance 1e-4, then the one refit against the stored factors) runs on the same stacked tensors. Both are timed wall-clock around
whole tensors after a warm-up (seconds-scale work, so host dispatch does not matter), median of
`--repeats`. The projection for the model multiplies by the layer count (32).

    python -m benchmarks.quantize_speed --out benchmarks/results/quantize_speed.json
    python -m benchmarks.quantize_speed --small   # shapes for a CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from milo_jax.quant import quantize_tensor

MIXTRAL = dict(experts=8, hidden=4096, ffn=14336, layers=32)
SMALL = dict(experts=2, hidden=256, ffn=512, layers=32)


def make_weights(cfg, seed=0):
    """Student-t (df=4) weights in bf16, made on the device: heavy tails like trained LLM weights."""
    e, h, f = cfg["experts"], cfg["hidden"], cfg["ffn"]
    keys = jax.random.split(jax.random.key(seed), 3)
    mk = lambda k, shape: (jax.random.t(k, 4.0, shape, jnp.float32) * 0.02).astype(jnp.bfloat16)
    return {"w1": mk(keys[0], (e, h, f)), "w3": mk(keys[1], (e, h, f)), "w2": mk(keys[2], (e, f, h))}


def timed(run, repeats):
    """(median seconds of `repeats` calls after a first one, the first call's seconds (it compiles),
    the last output)."""
    t0 = time.perf_counter()
    out = run()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first, out


def mean_abs_err(weights, quantized):
    return {k: float(jnp.mean(jnp.abs(quantized[k].dequantize(jnp.float32) - w.astype(jnp.float32))))
            for k, w in weights.items()}


def time_ours(weights, bits, group_size, repeats):
    def run():
        out = {k: quantize_tensor(w, bits=bits, group_size=group_size, method="hqq")
               for k, w in weights.items()}
        jax.block_until_ready(out)
        return out

    median, first, out = timed(run, repeats)
    return median, first, mean_abs_err(weights, out), out


def time_milo(weights, bits, group_size, rank, repeats):
    """Seconds per layer for MiLo at `rank` (all 8 experts of each projection in one call)."""
    from milo_jax.quant.lowrank import quantize_lowrank

    def run():
        out = {k: quantize_lowrank(w, rank=rank, bits=bits, group_size=group_size,
                                   compensator_dtype="bfloat16", return_stats=True)
               for k, w in weights.items()}
        jax.block_until_ready(out)
        return out

    median, first, out = timed(run, repeats)
    qts = {k: q for k, (q, _) in out.items()}
    stats = {k: dict(rounds_mean=float(np.mean(st.rounds)),
                     frob_err_vs_hqq=float(np.mean(st.err / st.hqq_err)))
             for k, (_, st) in out.items()}
    return median, first, mean_abs_err(weights, qts), qts, stats


def time_hqq_package(weights, bits, group_size, repeats, device):
    import torch
    from hqq.core.quantize import Quantizer

    mats = {k: [torch.from_numpy(np.asarray(w[e].astype(jnp.float32))).T.contiguous()
                .to(device=device, dtype=torch.bfloat16) for e in range(w.shape[0])]
            for k, w in weights.items()}

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def run():
        out = {k: [Quantizer.quantize(m, nbits=bits, group_size=group_size, axis=1, device=device,
                                      compute_dtype=torch.bfloat16, optimize=True, bitpack=True)
                   for m in ms] for k, ms in mats.items()}
        sync()
        return out

    run()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
    err = {}
    for k, ms in mats.items():
        tot = 0.0
        for m, (w_q, meta) in zip(ms, out[k]):
            meta["compute_dtype"] = torch.float32
            tot += float((Quantizer.dequantize(w_q, meta).float() - m.float()).abs().mean())
        err[k] = tot / len(ms)
    version = __import__("hqq").__version__ if hasattr(__import__("hqq"), "__version__") else "0.2.8"
    return statistics.median(times), err, version


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-peer", action="store_true", help="skip the hqq package")
    ap.add_argument("--milo-rank", type=int, default=32, help="MiLo compensator rank (0: skip MiLo)")
    ap.add_argument("--milo-repeats", type=int, default=1)
    args = ap.parse_args(argv)

    cfg = SMALL if args.small else MIXTRAL
    dev = jax.devices()[0]
    weights = make_weights(cfg)
    jax.block_until_ready(weights)
    n_weights = sum(int(np.prod(w.shape)) for w in weights.values())

    ours_s, ours_first, ours_err, ours_q = time_ours(weights, args.bits, args.group_size, args.repeats)
    bpw = sum(q.nbytes for q in ours_q.values()) * 8 / n_weights
    records = [dict(op="quantize_layer", impl="milo_jax.hqq (jit+vmap)", bits=args.bits,
                    group_size=args.group_size, experts=cfg["experts"], shape=[cfg["hidden"], cfg["ffn"]],
                    seconds_per_layer=ours_s, first_call_seconds=ours_first,
                    projected_model_seconds=ours_s * cfg["layers"], mean_abs_err=ours_err,
                    bits_per_weight=bpw)]
    if args.milo_rank:
        m_s, m_first, m_err, m_q, m_stats = time_milo(weights, args.bits, args.group_size,
                                                     args.milo_rank, args.milo_repeats)
        m_bpw = sum(q.nbytes for q in m_q.values()) * 8 / n_weights
        records.append(dict(op="quantize_layer", impl=f"milo_jax.milo rank {args.milo_rank} (jit+vmap)",
                            bits=args.bits, group_size=args.group_size, rank=args.milo_rank,
                            experts=cfg["experts"], shape=[cfg["hidden"], cfg["ffn"]],
                            seconds_per_layer=m_s, first_call_seconds=m_first,
                            projected_model_seconds=m_s * cfg["layers"], mean_abs_err=m_err,
                            bits_per_weight=m_bpw, milo_stats=m_stats))
        del m_q
    if not args.no_peer:
        try:
            torch_dev = "cuda" if dev.platform == "gpu" else "cpu"
            peer_s, peer_err, peer_ver = time_hqq_package(weights, args.bits, args.group_size,
                                                          args.repeats, torch_dev)
            records.append(dict(op="quantize_layer", impl=f"hqq {peer_ver} Quantizer.quantize (torch)",
                                bits=args.bits, group_size=args.group_size, experts=cfg["experts"],
                                shape=[cfg["hidden"], cfg["ffn"]], seconds_per_layer=peer_s,
                                projected_model_seconds=peer_s * cfg["layers"], mean_abs_err=peer_err))
            records[0]["speedup_vs_hqq"] = peer_s / ours_s
            records[0]["err_ratio_vs_hqq"] = {k: ours_err[k] / peer_err[k] for k in ours_err}
            for r in records[1:-1]:   # MiLo: mean |error| against the hqq package's plain 3-bit
                r["err_ratio_vs_hqq"] = {k: r["mean_abs_err"][k] / peer_err[k] for k in peer_err}
        except ImportError as e:
            print(f"hqq package not available: {e}", file=sys.stderr)

    result = dict(device=dev.device_kind, platform=dev.platform, date=datetime.date.today().isoformat(),
                  jax=jax.__version__, command="python -m benchmarks.quantize_speed " + " ".join(argv or sys.argv[1:]),
                  config=cfg, records=records)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(f"device: {dev.device_kind}  jax {jax.__version__}  layer: {cfg['experts']} experts x "
          f"(w1, w3 [{cfg['hidden']}, {cfg['ffn']}], w2 [{cfg['ffn']}, {cfg['hidden']}])")
    print("| impl | bits/weight | s / layer | x32 layers (s) | mean abs err w1 / w2 / w3 | speedup vs hqq |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in records:
        e = r["mean_abs_err"]
        sp = f"{r['speedup_vs_hqq']:.1f}x" if "speedup_vs_hqq" in r else ""
        bpw = f"{r['bits_per_weight']:.3f}" if "bits_per_weight" in r else ""
        print(f"| {r['impl']} | {bpw} | {r['seconds_per_layer']:.3f} | {r['projected_model_seconds']:.1f} | "
              f"{e['w1']:.3e} / {e['w2']:.3e} / {e['w3']:.3e} | {sp} |")
    return result


if __name__ == "__main__":
    main()
