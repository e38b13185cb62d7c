"""The README's main command: quantize the shipped testbed MoE and report perplexity and bits/weight.

    python -m milo_jax.demo [--windows N --bits 3 --group-size 64 --methods rtn,hqq]

The testbed (milo_jax/assets/testbed; its README.md has the architecture, recipe and numbers) is
a small byte-level Mixtral (8 experts, top-2, hidden 256) trained on Shakespeare and Milton. The
demo loads it offline from the installed package, scores the start of its held-out text
(milo_jax.eval.perplexity: non-overlapping windows of the model's context, at most 512 bytes;
float32 arithmetic), quantizes the attention projections and the experts (router, embeddings,
lm_head and norms untouched) with each method, and scores again. Bits per weight are over the
quantized tensors (codes + 16-bit scales and zeros). By default the first 16,384 bytes of the
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
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--methods", default="rtn,hqq", help="comma-separated: rtn, hqq")
    args = ap.parse_args(argv)

    import jax.numpy as jnp

    from milo_jax import load_hf
    from milo_jax.eval import perplexity
    from milo_jax.quant.apply import quantize_model
    from milo_jax.serve import load_tokenizer

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
    print(f"{'weights':10s} {'bits/weight':>11s} {'quantized MiB':>13s} {'mean|W-W_hat|':>13s} "
          f"{'perplexity':>10s} {'bits/byte':>9s} {'d ppl':>7s} {'seconds':>8s}")

    rows = []

    def score(name, m, bpw, mib, err, t_start):
        r = perplexity(m, tokens, window=args.window, batch_size=args.batch_size)
        base = rows[0]["ppl"] if rows else r.ppl
        row = dict(weights=name, bits_per_weight=bpw, quantized_mib=mib, mean_abs_err=err, ppl=r.ppl,
                   nll=r.nll, bits_per_byte=r.nll / math.log(2), num_tokens=r.num_tokens,
                   delta_ppl=r.ppl / base - 1, seconds=time.perf_counter() - t_start)
        rows.append(row)
        mib_s = "-" if mib is None else f"{mib:.2f}"
        err_s = "-" if err is None else f"{err:.3e}"
        print(f"{name:10s} {bpw:11.3f} {mib_s:>13s} {err_s:>13s} {r.ppl:10.4f} {row['bits_per_byte']:9.4f} "
              f"{100 * row['delta_ppl']:+6.2f}% {row['seconds']:8.1f}", flush=True)

    t0 = time.perf_counter()
    score("bf16", model, 16.0, None, None, t0)
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        t0 = time.perf_counter()
        qmodel, report = quantize_model(model, bits=args.bits, group_size=args.group_size, method=method)
        score(f"{method}{args.bits}-g{args.group_size}", qmodel, report.bits_per_weight,
              report.nbytes / 2**20, report.mean_abs_err, t0)
    print("bf16: the checkpoint's weights (bf16 values); bits/weight and mean|W-W_hat| are over the "
          "quantized tensors (attention projections and experts); seconds include quantization.")
    return rows


if __name__ == "__main__":
    main()
