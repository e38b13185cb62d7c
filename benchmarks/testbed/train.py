"""Train the milo-jax testbed: a small byte-level Mixtral on Shakespeare and Milton, one GPU run.

    python benchmarks/testbed/prepare_corpus.py            # -> .carry/corpus/{train,valid,heldout}.txt
    python benchmarks/testbed/train.py --out $OUT           # -> $OUT/testbed (HF checkpoint), log, summary

The model is milo_jax.models.MoECausalLM built from a Mixtral config.json dict exactly as
milo_jax.load_hf builds it, so the trained parameters are what milo_jax.export_hf writes. Only the
router is swapped, for training, for `BalancedRouter`: the same softmax top-k computation on the same
parameter (router.gate.kernel) that also records the load-balancing and router z-losses.

Training: AdamW (b1 0.9, b2 0.95, weight decay on matrices), linear warmup then cosine decay, global
gradient-norm clip 1; float32 master parameters, bfloat16 matmuls (the loss casts the parameters to
bf16 and runs the model with bf16 activations; softmax, norms statistics and the loss in float32).
Batches are random windows of the training text drawn on the device from a seeded key (step s uses
fold_in(key, s)); the whole training split lives on the device as uint8 bytes.

Model selection: the validation split (1% of the corpus, not trained on) is scored every
--eval-every steps and the best parameters are exported. The held-out split (the last 3%) is only
used for the final report: perplexity of the exported bf16 checkpoint and of its RTN and HQQ 3-bit
g64 quantizations (milo_jax.eval.perplexity, non-overlapping windows of --seq bytes), plus a
transformers cross-check of the exported checkpoint when transformers and torch are importable.

--time-budget T: wall seconds for the whole script; after compiling, 10 timed steps (on a throwaway
copy of the initial state) decide how many of --steps fit, rounded down to 100, and the schedule is
built for that count (the log prints it: rerun with --steps N --time-budget 0 to reproduce).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

_T0 = time.perf_counter()
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from milo_jax import export_hf  # noqa: E402  (import milo_jax before converters: import order)
from converters.registry import get_arch  # noqa: E402
from milo_jax.models.decoder import MoECausalLM  # noqa: E402
from milo_jax.models.moe import SoftmaxTopKRouter  # noqa: E402

SIZES = {
    # the shipped testbed: 6 layers, 8 experts (top-2), hidden 256 -> 15.5M parameters, 31 MB bf16
    "full": dict(hidden_size=256, intermediate_size=384, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, num_local_experts=8),
    # the smallest shape the testbed allows (4 layers, 8 experts, hidden 256), expert width 128, for
    # training on a CPU when no GPU is available (4.1M parameters)
    "cpu": dict(hidden_size=256, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, num_local_experts=8),
    # CPU smoke test of the whole script
    "tiny": dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, num_local_experts=8),
}


def testbed_hf_config(size: str, seq: int) -> dict:
    """The config.json of the testbed (a transformers MixtralConfig): byte vocabulary of 256
    (token id == UTF-8 byte; milo_jax's ByteTokenizer), no BOS/EOS/PAD (none is ever inserted)."""
    return dict(
        model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=256,
        max_position_embeddings=seq, num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=10000.0,
        sliding_window=None, hidden_act="silu", tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=None, pad_token_id=None, router_aux_loss_coef=0.02, torch_dtype="bfloat16",
        **SIZES[size])


def log(msg: str, fh=None) -> None:
    line = f"[{time.perf_counter() - _T0:7.1f}s] {msg}"
    print(line, flush=True)
    if fh is not None:
        fh.write(line + "\n")
        fh.flush()


# ------------------------------------------------------------------------------- model
# Router statistics of the forward pass being traced: BalancedRouter appends (balance, zloss,
# max_load) per layer and `forward` reads them back inside the same trace (a plain side channel
# rather than Module.sow, whose calling convention differs between flax versions).
_ROUTER_STATS: list = []


class BalancedRouter(nnx.Module):
    """SoftmaxTopKRouter's forward (same parameter, same output) that also records, per call,
    `balance` = E * sum_e f_e * P_e (f_e: share of the token-slots routed to expert e, P_e: mean
    router probability; 1.0 when perfectly balanced, as in Switch / HF Mixtral's aux loss),
    `zloss` = mean logsumexp(router logits)^2, and `max_load` = E * max_e f_e (1.0 = uniform)."""

    def __init__(self, router: SoftmaxTopKRouter, num_experts: int):
        self.top_k, self.norm_topk_prob, self.num_experts = (router.top_k, router.norm_topk_prob,
                                                             num_experts)
        self.gate = router.gate

    def __call__(self, x):
        logits = self.gate(x).astype(jnp.float32)                  # [T, E]
        probs = jax.nn.softmax(logits, axis=-1)
        weights, ids = jax.lax.top_k(probs, self.top_k)
        if self.norm_topk_prob:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        share = jnp.mean(jax.nn.one_hot(ids, self.num_experts, dtype=jnp.float32).sum(1), 0) / self.top_k
        _ROUTER_STATS.append((self.num_experts * jnp.sum(share * jnp.mean(probs, 0)),
                              jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1))),
                              self.num_experts * jnp.max(share)))
        return weights, ids.astype(jnp.int32)


def build_model(hf: dict, seed: int, compute_dtype: str = "bfloat16"):
    """(graphdef, float32 master params, rest) of the training model (activations in
    compute_dtype)."""
    config = get_arch("mixtral").parse_config(hf, "testbed config")
    model = MoECausalLM(config, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    depth_scale = 1.0 / math.sqrt(2 * config.num_hidden_layers)   # residual-branch outputs (GPT-2)
    for layer in model.layers:
        for p in (layer.attn.o_proj.kernel, layer.mlp.experts.down_proj):
            p.set_value(p.get_value() * depth_scale)
        layer.mlp.router = BalancedRouter(layer.mlp.router, config.num_experts)
    model.dtype = compute_dtype       # activations (and the matmuls) in bf16 by default
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return config, graphdef, params, rest


def cast(params, dtype):
    return jax.tree.map(lambda a: a.astype(dtype), params)


def forward(graphdef, params, rest, tokens, dtype):
    """logits float32 [B, S, V] and, over the layers, mean balance, mean zloss, max max_load.
    The float32 master params are cast to the compute dtype (that of the model's activations)."""
    model = nnx.merge(graphdef, cast(params, dtype), rest)
    _ROUTER_STATS.clear()
    logits = model(tokens)
    balance, zloss, max_load = (jnp.stack(v) for v in zip(*_ROUTER_STATS))
    _ROUTER_STATS.clear()
    return logits, jnp.mean(balance), jnp.mean(zloss), jnp.max(max_load)


# ------------------------------------------------------------------------------- data
def read_split(corpus: str, name: str) -> np.ndarray:
    path = os.path.join(corpus, f"{name}.txt")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: missing; run benchmarks/testbed/prepare_corpus.py first")
    with open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8)


def windows_of(data: np.ndarray, seq: int) -> np.ndarray:
    n = len(data) // seq
    return data[: n * seq].reshape(n, seq).astype(np.int32)


# ------------------------------------------------------------------------------- training
def lr_at(step, total, *, peak, warmup, final_frac):
    """Linear warmup to `peak` over `warmup` steps, then cosine to final_frac * peak at `total`."""
    step = step.astype(jnp.float32)
    total = total.astype(jnp.float32)
    warm = peak * (step + 1) / warmup
    frac = jnp.clip((step - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
    cos = peak * (final_frac + (1 - final_frac) * 0.5 * (1 + jnp.cos(jnp.pi * frac)))
    return jnp.where(step < warmup, warm, cos)


def make_steps(args, graphdef, rest):
    decay_mask = lambda p: jax.tree.map(lambda a: a.ndim >= 2, p)
    # AdamW without its learning rate: the step scales the update by -lr(step, total) itself, so
    # the number of steps is a traced argument and the time-fit needs no recompilation
    opt = optax.chain(optax.clip_by_global_norm(args.clip),
                      optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8),
                      optax.add_decayed_weights(args.weight_decay, mask=decay_mask))
    key = jax.random.key(args.seed + 1)
    dtype = jnp.dtype(args.compute_dtype)

    def loss_fn(params, batch):
        logits, balance, zloss, max_load = forward(graphdef, params, rest, batch[:, :-1], dtype)
        ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]))
        loss = ce + args.aux_coef * balance + args.z_coef * zloss
        return loss, dict(ce=ce, balance=balance, zloss=zloss, max_load=max_load)

    @jax.jit
    def train_step(params, opt_state, train, step, total):
        starts = jax.random.randint(jax.random.fold_in(key, step), (args.batch,), 0,
                                    train.shape[0] - args.seq - 1)
        batch = train[starts[:, None] + jnp.arange(args.seq + 1)].astype(jnp.int32)
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        lr = lr_at(step, total, peak=args.lr, warmup=args.warmup, final_frac=args.final_lr_frac)
        params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
        return params, opt_state, dict(metrics, lr=lr, grad_norm=optax.global_norm(grads))

    @jax.jit
    def window_nll(params, windows):
        logits = forward(graphdef, params, rest, windows, dtype)[0]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], windows[:, 1:])
        return jnp.sum(nll, axis=-1)                               # [b]

    return opt, train_step, window_nll


def mean_nll(window_nll, params, windows: np.ndarray, batch: int) -> float:
    total = 0.0
    for i in range(0, len(windows), batch):
        chunk = windows[i:i + batch]
        real = len(chunk)
        if real < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch - real, 0)])
        total += float(np.asarray(window_nll(params, jnp.asarray(chunk)))[:real].sum())
    return total / (len(windows) * (windows.shape[1] - 1))


# ------------------------------------------------------------------------------- report
def report_quantized(out_dir: str, heldout: np.ndarray, seq: int, batch: int, fh) -> dict:
    """Perplexity of the exported checkpoint (bf16 weights, float32 compute) and of its RTN / HQQ
    3-bit g64 quantizations on the held-out bytes."""
    from milo_jax import load_hf
    from milo_jax.eval import perplexity
    from milo_jax.quant.apply import quantize_model

    model = load_hf(out_dir, dtype=jnp.float32, progress=False)
    rows = {}
    for name, method in (("bf16", None), ("rtn3_g64", "rtn"), ("hqq3_g64", "hqq")):
        t0 = time.perf_counter()
        m, bpw = model, 16.0
        if method is not None:
            m, rep = quantize_model(model, bits=3, group_size=64, method=method)
            bpw = rep.bits_per_weight
        r = perplexity(m, heldout, window=seq, batch_size=batch)
        rows[name] = dict(ppl=r.ppl, nll=r.nll, bits_per_byte=r.nll / math.log(2),
                          bits_per_weight=bpw, num_tokens=r.num_tokens, num_windows=r.num_windows,
                          seconds=time.perf_counter() - t0)
        log(f"held-out {name:9s} ppl {r.ppl:.4f}  bpb {r.nll / math.log(2):.4f}  "
            f"bits/weight {bpw:.3f}  ({r.num_windows} windows of {seq})", fh)
    return rows


def transformers_check(out_dir: str, heldout: np.ndarray, seq: int, fh) -> dict | None:
    """Mean NLL of transformers' MixtralForCausalLM (float32) on the first 64 held-out windows."""
    try:
        import torch
        from transformers import MixtralForCausalLM
    except Exception as e:  # pragma: no cover - environment dependent
        log(f"transformers check skipped: {e}", fh)
        return None
    try:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        hf = MixtralForCausalLM.from_pretrained(out_dir, dtype=torch.float32).to(dev).eval()
        wins = windows_of(heldout, seq)[:64]
        total = 0.0
        with torch.no_grad():
            for i in range(0, len(wins), 16):
                ids = torch.tensor(wins[i:i + 16], dtype=torch.long, device=dev)
                logits = hf(ids).logits.float()
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                    reduction="sum")
                total += float(nll)
    except Exception as e:  # the checkpoint is already written; report and go on
        log(f"transformers check failed: {type(e).__name__}: {e}", fh)
        return None
    return dict(nll=total / (len(wins) * (seq - 1)), num_windows=len(wins), device=dev)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=".carry/corpus")
    ap.add_argument("--out", default=os.environ.get("OUT", ".carry/testbed_run"),
                    help="folder for testbed/ (the HF checkpoint), train_log.txt, summary.json")
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--steps", type=int, default=2200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--final-lr-frac", type=float, default=0.05)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--aux-coef", type=float, default=0.02)
    ap.add_argument("--z-coef", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--valid-windows", type=int, default=0, help="score only N (0: all)")
    ap.add_argument("--eval-batch", type=int, default=32)
    ap.add_argument("--time-budget", type=float, default=0.0,
                    help="wall seconds for the whole script (0: run --steps as given)")
    ap.add_argument("--slowdown", type=float, default=2.0,
                    help="planning margin on the timed step time under --time-budget")
    ap.add_argument("--reserve", type=float, default=100.0,
                    help="seconds kept for export and the final report within --time-budget")
    ap.add_argument("--shard-mib", type=int, default=14, help="max safetensors shard size (MiB)")
    ap.add_argument("--compute-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="activations and matmuls (float32 on CPUs, where bf16 is slow)")
    ap.add_argument("--export-dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    ap.add_argument("--no-report", action="store_true", help="skip the held-out report")
    args = ap.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    fh = open(os.path.join(args.out, "train_log.txt"), "w")
    log(f"args {json.dumps(vars(args))}", fh)
    log(f"jax {jax.__version__} devices {jax.devices()}", fh)
    train_np, valid_np, heldout_np = (read_split(args.corpus, s) for s in ("train", "valid", "heldout"))
    log(f"corpus bytes: train {len(train_np):,} valid {len(valid_np):,} heldout {len(heldout_np):,}", fh)

    hf = testbed_hf_config(args.size, args.seq)
    config, graphdef, params, rest = build_model(hf, args.seed, args.compute_dtype)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    log(f"model: {n_params / 1e6:.2f}M parameters, config {json.dumps(SIZES[args.size])}", fh)

    opt, train_step, window_nll = make_steps(args, graphdef, rest)
    opt_state = opt.init(params)
    train = jnp.asarray(train_np)
    valid_w = windows_of(valid_np, args.seq)[: args.valid_windows or None]

    # compile, then time 10 steps on a throwaway copy of the initial state
    copy = lambda t: jax.tree.map(jnp.copy, t)
    tp, to = copy(params), copy(opt_state)
    t0 = time.perf_counter()
    tp, to, m = train_step(tp, to, train, jnp.int32(0), jnp.int32(args.steps))
    jax.block_until_ready(m)
    log(f"compiled train step in {time.perf_counter() - t0:.1f}s", fh)
    t0 = time.perf_counter()
    for s in range(1, 11):
        tp, to, m = train_step(tp, to, train, jnp.int32(s), jnp.int32(args.steps))
    jax.block_until_ready(m)
    step_s = (time.perf_counter() - t0) / 10
    del tp, to
    mean_nll(window_nll, params, valid_w[: args.eval_batch], args.eval_batch)   # compile eval
    steps = args.steps
    if args.time_budget > 0:
        left = args.time_budget - (time.perf_counter() - _T0) - args.reserve
        evals = steps // args.eval_every + 1
        eval_s = step_s * len(valid_w) * args.seq / (3 * args.batch * args.seq)  # fwd ~ 1/3 step
        # the first GPU run slowed from 53 ms/step (timed) to 110 ms/step over 7 minutes:
        # plan with a margin, and stop at the deadline regardless (below)
        fit = int(max(left - evals * eval_s, 0) / (args.slowdown * step_s)) // 100 * 100
        if fit < steps:
            log(f"time budget: {fit} of {steps} steps fit ({step_s * 1e3:.1f} ms/step, "
                f"{left:.0f}s left); reproduce with --steps {fit} --time-budget 0", fh)
            steps = max(fit, 100)
    tok_per_step = args.batch * args.seq
    log(f"training {steps} steps x {tok_per_step} tokens = {steps * tok_per_step / 1e6:.1f}M tokens "
        f"({steps * tok_per_step / len(train_np):.2f} epochs); {step_s * 1e3:.1f} ms/step, "
        f"{tok_per_step / step_s / 1e6:.2f}M tok/s", fh)

    deadline = _T0 + args.time_budget - args.reserve if args.time_budget > 0 else float("inf")
    best = (float("inf"), -1, None)
    history = []
    t_train = time.perf_counter()
    total = jnp.int32(steps)
    for step in range(steps):
        params, opt_state, m = train_step(params, opt_state, train, jnp.int32(step), total)
        late = (step + 1) % args.log_every == 0 and time.perf_counter() > deadline
        if late:
            log(f"time budget: stopping after step {step + 1} of {steps} (deadline reached); "
                "exporting the best parameters so far", fh)
        last = step == steps - 1 or late
        if (step + 1) % args.log_every == 0 or last:
            m = {k: float(v) for k, v in m.items()}
            log(f"step {step + 1:5d}  ce {m['ce']:.4f}  bpb {m['ce'] / math.log(2):.4f}  "
                f"balance {m['balance']:.3f}  max_load {m['max_load']:.2f}  z {m['zloss']:.2f}  "
                f"gnorm {m['grad_norm']:.3f}  lr {m['lr']:.2e}", fh)
            history.append(dict(step=step + 1, **m))
        if (step + 1) % args.eval_every == 0 or last:
            val = mean_nll(window_nll, params, valid_w, args.eval_batch)
            flag = ""
            if val < best[0]:
                best = (val, step + 1, copy(params))
                flag = " (best)"
            log(f"step {step + 1:5d}  valid nll {val:.4f}  bpb {val / math.log(2):.4f}{flag}", fh)
            history[-1]["valid_nll"] = val
        if late:
            break
    train_s = time.perf_counter() - t_train
    steps = step + 1
    log(f"trained {steps} steps in {train_s:.1f}s; best valid nll {best[0]:.4f} at step {best[1]}", fh)

    # export the best parameters: the bf16 values the model was trained with, stored as float16
    # by default (exact for every bf16 value of magnitude 2^-14 .. 65504; milo_jax.load_hf does
    # not read bf16 safetensors yet)
    export_dtype = jnp.dtype(args.export_dtype)
    stored = cast(cast(best[2], jnp.bfloat16), export_dtype)
    worst = max(float(jnp.max(jnp.abs(s.astype(jnp.float32) - b.astype(jnp.bfloat16).astype(jnp.float32))))
                for s, b in zip(jax.tree.leaves(stored), jax.tree.leaves(best[2])))
    if not all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(stored)):
        raise ValueError(f"export: a parameter overflows {export_dtype.name}")
    log(f"export dtype {export_dtype.name}: max |stored - bf16| = {worst:.2e}", fh)
    export_model = MoECausalLM(config, dtype=export_dtype)
    nnx.update(export_model, stored)
    ckpt = os.path.join(args.out, "testbed")
    export_hf(export_model, ckpt, max_shard_size=args.shard_mib * 2**20)
    size = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt))
    log(f"exported {ckpt} ({size / 2**20:.1f} MiB: {sorted(os.listdir(ckpt))})", fh)

    summary = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   command="python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])),
                   params=n_params, steps=steps, batch=args.batch, seq=args.seq,
                   tokens=steps * tok_per_step, epochs=steps * tok_per_step / len(train_np),
                   step_ms=step_s * 1e3, train_seconds=train_s, final_train_ce=history[-1]["ce"],
                   best_step=best[1], best_valid_nll=best[0], history=history)
    def write_summary():
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)

    write_summary()   # already once here: the report below may fail on a strange machine
    if not args.no_report:
        summary["heldout"] = report_quantized(ckpt, heldout_np, args.seq, args.eval_batch, fh)
        tf = transformers_check(ckpt, heldout_np, args.seq, fh)
        if tf is not None:
            from milo_jax import load_hf
            from milo_jax.eval import perplexity
            ours = perplexity(load_hf(ckpt, dtype=jnp.float32, progress=False),
                              heldout_np[: tf["num_windows"] * args.seq], window=args.seq,
                              batch_size=args.eval_batch)
            tf["milo_nll"] = ours.nll
            tf["rel_diff"] = abs(ours.nll - tf["nll"]) / tf["nll"]
            log(f"transformers check: nll {tf['nll']:.6f} vs milo-jax {ours.nll:.6f} "
                f"(rel diff {tf['rel_diff']:.2e}, {tf['num_windows']} windows)", fh)
            summary["transformers_check"] = tf
    summary["total_seconds"] = time.perf_counter() - _T0
    write_summary()
    short = {k: v for k, v in summary.items() if k != "history"}
    log("SUMMARY " + json.dumps(short), fh)
    fh.close()
    return summary


if __name__ == "__main__":
    main()
