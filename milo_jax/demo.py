"""The README's main command: quantize an embedded default and report error and bits per weight.

For now the default is one random heavy-tailed MoE layer (8 experts, Student-t weights, the shape
of a small Mixtral-style FFN); a later issue replaces it with the trained testbed model shipped in
milo_jax/assets.

    python -m milo_jax.demo [--experts 8 --hidden 512 --ffn 1408 --bits 3 --group-size 64]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from milo_jax.quant import quantize_tensor


def moe_layer(experts: int, hidden: int, ffn: int, seed: int = 0) -> dict[str, jax.Array]:
    """Stacked expert weights in Flax layout (y = x @ W): w1, w3 [E, H, F], w2 [E, F, H], bf16."""
    keys = jax.random.split(jax.random.key(seed), 3)
    t = lambda k, shape: (jax.random.t(k, 4.0, shape, jnp.float32) * 0.02).astype(jnp.bfloat16)
    return {"w1": t(keys[0], (experts, hidden, ffn)), "w3": t(keys[1], (experts, hidden, ffn)),
            "w2": t(keys[2], (experts, ffn, hidden))}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1408)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    layer = moe_layer(args.experts, args.hidden, args.ffn, args.seed)
    n = sum(int(np.prod(w.shape)) for w in layer.values())
    bf16_bytes = 2 * n
    print(f"random heavy-tailed MoE layer: {args.experts} experts, w1/w3 [{args.hidden}, {args.ffn}], "
          f"w2 [{args.ffn}, {args.hidden}], {n / 1e6:.1f}M weights, bf16 {bf16_bytes / 2**20:.1f} MiB")
    print(f"{'method':8s} {'bits':>4s} {'group':>5s} {'bits/weight':>11s} {'MiB':>7s} "
          f"{'mean|W-W_hat|':>14s} {'rel. Frobenius err':>18s} {'seconds':>8s}")
    rows = []
    for method in ("rtn", "hqq"):
        t0 = time.perf_counter()
        q = {k: quantize_tensor(w, bits=args.bits, group_size=args.group_size, method=method)
             for k, w in layer.items()}
        jax.block_until_ready(q)
        secs = time.perf_counter() - t0
        abs_err = sq_err = sq_ref = 0.0
        for k, w in layer.items():
            w32 = w.astype(jnp.float32)
            d = q[k].dequantize(jnp.float32) - w32
            abs_err += float(jnp.abs(d).sum())
            sq_err += float(jnp.square(d).sum())
            sq_ref += float(jnp.square(w32).sum())
        nbytes = sum(t.nbytes for t in q.values())
        row = dict(method=method, bits=args.bits, group_size=args.group_size,
                   bits_per_weight=8 * nbytes / n, mib=nbytes / 2**20, mean_abs_err=abs_err / n,
                   rel_fro_err=(sq_err / sq_ref) ** 0.5, seconds=secs)
        rows.append(row)
        print(f"{method:8s} {args.bits:4d} {args.group_size:5d} {row['bits_per_weight']:11.3f} "
              f"{row['mib']:7.2f} {row['mean_abs_err']:14.4e} {row['rel_fro_err']:18.4f} {secs:8.2f}")
    gain = 1 - rows[1]["mean_abs_err"] / rows[0]["mean_abs_err"]
    print(f"HQQ lowers the mean absolute error by {100 * gain:.1f}% against RTN at the same size.")
    return rows


if __name__ == "__main__":
    main()
