"""Command line: `milo-jax <command> ...` (also `python -m milo_jax`).

Commands are registered in COMMANDS as (help, add_arguments, run); `run(args)` returns the exit
status. generate, eval and quantize exist now; convert and bench plug in the same way.
--model accepts a HF checkpoint directory or a milo-jax checkpoint (milo_jax.save, or the output
directory of `milo-jax quantize`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, NamedTuple

DTYPES = ("float32", "bfloat16", "float16")


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def is_milo_checkpoint(model_dir: str) -> bool:
    """True for a directory written by milo_jax.save or `milo-jax quantize`."""
    import os

    from milo_jax.checkpoint import META_FILE
    from milo_jax.quant.layerwise import MANIFEST

    return any(os.path.isfile(os.path.join(model_dir, f)) for f in (META_FILE, MANIFEST))


def load_model(model_dir: str, dtype: str):
    """The checkpoint in `model_dir` as a milo_jax model: a HF checkpoint (milo_jax.load_hf, params
    in `dtype`) or a milo-jax checkpoint (milo_jax.load; parameters keep their stored dtypes). On a
    Hopper GPU the quantized dense weights are repacked once into the decode kernel's layout
    (milo_jax.prepare_for_kernels), not inside every jitted call; elsewhere nothing changes."""
    import jax.numpy as jnp

    from milo_jax import load_hf

    if is_milo_checkpoint(model_dir):
        from milo_jax.checkpoint import load
        from milo_jax.models.kernel_weights import prepare_for_kernels_on_gpu

        return prepare_for_kernels_on_gpu(load(model_dir))
    return load_hf(model_dir, dtype=getattr(jnp, dtype))


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="HF checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="parameter dtype (default float32)")


# ---- generate ---------------------------------------------------------------------------------

def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, action="append", metavar="TEXT",
                        help="prompt text; repeat for a batch of prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus mass in (0, 1]")
    parser.add_argument("--seed", type=int, default=0, metavar="S")
    parser.add_argument("--max-len", type=int, default=None, metavar="N", help="KV-cache length (prompt + generated)")
    parser.add_argument("--json", action="store_true", help="print one JSON line per prompt instead of text")


def _run_generate(args: argparse.Namespace) -> int:
    from milo_jax.serve import generate, load_tokenizer

    model = load_model(args.model, args.dtype)
    tokenizer = load_tokenizer(args.model, model.config.vocab_size)
    result = generate(
        model, list(args.prompt), max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, seed=args.seed, tokenizer=tokenizer, max_len=args.max_len,
    )
    for i, prompt in enumerate(args.prompt):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": result.text[i], "tokens": result.tokens[i],
                              "finish_reason": result.finish_reasons[i]}))
        else:
            print(result.text[i] if len(args.prompt) == 1 else f"[{i}] {result.text[i]}")
    return 0


# ---- eval -------------------------------------------------------------------------------------

def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    parser.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file, tokenized as one stream")
    parser.add_argument("--window", type=int, default=2048, metavar="N", help="tokens per window (default 2048)")
    parser.add_argument("--batch-size", type=int, default=1, metavar="B", help="windows per forward pass")
    parser.add_argument("--max-windows", type=int, default=None, metavar="N", help="score only the first N windows")


def _run_eval(args: argparse.Namespace) -> int:
    from milo_jax.eval import perplexity
    from milo_jax.serve import load_tokenizer

    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    if args.max_windows is not None and args.max_windows < 1:
        raise ValueError(f"--max-windows must be >= 1, got {args.max_windows}")
    model = load_model(args.model, args.dtype)
    tokens = load_tokenizer(args.model, model.config.vocab_size).encode(text)
    if args.max_windows is not None:
        tokens = tokens[: args.max_windows * args.window]
    result = perplexity(model, tokens, window=args.window, batch_size=args.batch_size)
    print(f"perplexity {result.ppl:.4f} (nll {result.nll:.6f} nats over {result.num_tokens} tokens, "
          f"{result.num_windows} windows of {result.window}, {result.dropped_tokens} trailing tokens dropped)")
    print(json.dumps({"model": args.model, "text": args.text, "dtype": args.dtype, **result.to_dict()}))
    return 0


# ---- quantize ---------------------------------------------------------------------------------

def _quantize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="HF checkpoint directory")
    parser.add_argument("--preset", required=True, metavar="NAME",
                        help="rtn-3bit, hqq-3bit, milo-3bit-s1, milo-3bit-s2 or milo-<X>bpw (e.g. milo-3.75bpw)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory (one checkpoint per layer; rerun to resume)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES,
                        help="dtype the weights are read in and untouched parameters kept in (default bfloat16)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--calib-batch", type=int, default=None, metavar="B",
                        help="random-token sequences for routing counts (frequency ranks)")
    parser.add_argument("--calib-seq-len", type=int, default=None, metavar="S")


def _run_quantize(args: argparse.Namespace) -> int:
    from milo_jax.quant.config import preset
    from milo_jax.quant.layerwise import quantize_checkpoint

    config = preset(args.preset)            # unknown names fail before any work
    calibration = {k: v for k, v in (("batch", args.calib_batch), ("seq_len", args.calib_seq_len))
                   if v is not None}
    report = quantize_checkpoint(args.model, args.out, config, dtype=args.dtype,
                                 progress=not args.no_progress, calibration=calibration)
    print(report.summary())
    print(json.dumps({"out": args.out, "preset": args.preset,
                      "bits_per_weight": report.bits_per_weight,
                      "quantized_bits_per_weight": report.quantized_bits_per_weight,
                      "total_nbytes": report.total_nbytes, "mean_abs_err": report.mean_abs_err}))
    return 0


COMMANDS: dict[str, Command] = {
    "generate": Command("generate text from prompts", _generate_arguments, _run_generate),
    "eval": Command("perplexity of a text file (non-overlapping windows)", _eval_arguments, _run_eval),
    "quantize": Command("quantize a HF checkpoint layer by layer (resumable)", _quantize_arguments,
                        _run_quantize),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="milo-jax", description="3-bit Mixture-of-Experts models in JAX")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `milo-jax` console script; returns the exit status.

    Bad input (ValueError from the library, a missing file) is reported on stderr with status 2,
    no traceback.
    """
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except (ValueError, OSError) as err:
        print(f"milo-jax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
