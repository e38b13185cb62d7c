"""The README's main command: quantize the shipped testbed MoE and report perplexity and bits/weight.

    python -m milo_jax.demo [--windows N --presets hqq-3bit,milo-4bpw]

The testbed (milo_jax/assets/testbed; its README.md has the architecture, recipe and numbers) is
a small byte-level Mixtral (8 experts, top-2, hidden 256) trained on Shakespeare and Milton. The
demo loads it offline from the installed package, scores the start of its held-out text
(milo_jax.eval.perplexity: non-overlapping windows of the model's context, at most 512 bytes;
float32 arithmetic), quantizes it with each preset (milo_jax.quantize: the attention projections
and the experts; router, embeddings, lm_head and norms untouched): plain HQQ 3-bit g64 and MiLo
(milo-4bpw by default: 3/4-bit HQQ bases and low-rank compensators chosen by the budget allocator so
that the WHOLE model, embeddings and lm_head included, stays within 4 bits per weight), and scores
again. Bits per weight
are over the quantized tensors (codes, 16-bit scales and zeros, compensator factors) and over the
whole model (every parameter as stored, untouched ones at 16 bits). By default the first 16,384 bytes of the
379,634 held out are scored (32 windows of 512 bytes, or 64 of 256), which keeps the run to a few
minutes on a 2-core CPU; --windows 0 scores the whole held-out text.
"""

from __future__ import annotations

import argparse
import math
import os
import time

ASSET = "testbed"
DEFAULT_SLICE = 16384   # bytes of held-out text scored by default (the first ones)
DEFAULT_PRESETS = "hqq-3bit,milo-4bpw"


def testbed_dir() -> str:
    """Directory of the shipped testbed checkpoint (config.json, safetensors, heldout.txt)."""
    from importlib import resources

    path = os.fspath(resources.files("milo_jax") / "assets" / ASSET)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path}: the testbed checkpoint is missing from the installed package "
                         "(pyproject's package-data must include milo_jax/assets/**)")
    return path


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, metavar="DIR", help="checkpoint (default: the testbed)")
    ap.add_argument("--text", default=None, metavar="FILE", help="UTF-8 text (default: its heldout.txt)")
    ap.add_argument("--windows", type=int, default=None,
                    help="windows scored (default: 16,384 bytes' worth; 0: the whole text)")
    ap.add_argument("--window", type=int, default=None,
                    help="tokens per window (default: the model's context, at most 512)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--presets", default=DEFAULT_PRESETS,
                    help="comma-separated milo_jax presets (rtn-3bit, hqq-3bit, milo-3bit-s1, "
                         "milo-3bit-s2, milo-<X>bpw)")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from milo_jax import load_hf, quantize
    from milo_jax.eval import perplexity
    from milo_jax.quant.config import preset
    from milo_jax.serve import load_tokenizer

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    for name in presets:
        preset(name)                  # unknown names fail here, before anything is loaded

    model_dir = args.model or testbed_dir()
    text_path = args.text or os.path.join(model_dir, "heldout.txt")
    t0 = time.perf_counter()
    model = load_hf(model_dir, dtype=jnp.float32, progress=False)
    cfg = model.config
    if args.window is None:
        args.window = min(512, int(cfg.max_position_embeddings))
    with open(text_path, encoding="utf-8") as f:
        tokens = load_tokenizer(model_dir).encode(f.read())
    if args.windows is None:
        args.windows = DEFAULT_SLICE // args.window
    if args.windows:
        tokens = tokens[: args.windows * args.window]
    print(f"model: {model_dir}\n  {cfg.model_type}, {cfg.num_hidden_layers} layers, {cfg.num_experts} "
          f"experts (top-{cfg.num_experts_per_tok}), hidden {cfg.hidden_size}, vocab {cfg.vocab_size} "
          f"(loaded in {time.perf_counter() - t0:.1f}s)")
    print(f"text: {text_path}\n  {len(tokens):,} tokens scored as {len(tokens) // args.window} "
          f"non-overlapping windows of {args.window}")
    print(f"{'weights':14s} {'bits/weight':>11s} {'whole model':>11s} {'MiB':>7s} {'mean|W-W_hat|':>13s} "
          f"{'perplexity':>10s} {'bits/byte':>9s} {'d ppl':>7s} {'seconds':>8s}")

    rows = []

    def score(name, m, bpw, whole, mib, err, t_start):
        r = perplexity(m, tokens, window=args.window, batch_size=args.batch_size)
        base = rows[0]["ppl"] if rows else r.ppl
        row = dict(weights=name, bits_per_weight=bpw, whole_model_bits_per_weight=whole, mib=mib,
                   mean_abs_err=err, ppl=r.ppl, nll=r.nll, bits_per_byte=r.nll / math.log(2),
                   num_tokens=r.num_tokens, delta_ppl=r.ppl / base - 1,
                   seconds=time.perf_counter() - t_start)
        rows.append(row)
        err_s = "-" if err is None else f"{err:.3e}"
        print(f"{name:14s} {bpw:11.3f} {whole:11.3f} {mib:7.2f} {err_s:>13s} {r.ppl:10.4f} "
              f"{row['bits_per_byte']:9.4f} {100 * row['delta_ppl']:+6.2f}% {row['seconds']:8.1f}",
              flush=True)

    t0 = time.perf_counter()
    n_params = sum(int(v.size) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    score("bf16", model, 16.0, 16.0, 2 * n_params / 2**20, None, t0)
    for name in presets:
        t0 = time.perf_counter()
        qmodel, report = quantize(model, name)
        # untouched parameters count as the checkpoint stores them (16 bits), not as loaded here
        whole_bytes = report.quantized_nbytes + 2 * (report.total_weights - report.quantized_weights)
        score(name, qmodel, report.quantized_bits_per_weight, 8.0 * whole_bytes / report.total_weights,
              whole_bytes / 2**20, report.mean_abs_err, t0)
    print("bf16: the checkpoint's weights. bits/weight and mean|W-W_hat|: over the quantized tensors "
          "(attention projections and experts, every scale, zero and compensator factor counted); "
          "whole model and MiB: every parameter, untouched ones (embeddings, lm_head, router, norms) "
          "at 16 bits; seconds include quantization.")
    return rows


if __name__ == "__main__":
    main()
