"""Table and roofline for benchmarks/results/quant_matmul.json (written by benchmarks.quant_matmul).

    python -m benchmarks.plot_quant_matmul benchmarks/results/quant_matmul.json [--merge other.json ...]
        -> quant_matmul.md (tables) and quant_matmul_roofline.png beside the JSON (with --merge,
           the other JSONs' records and runs are appended to the first JSON first)

Roofline: x = arithmetic intensity, FLOP (2 M K N) per byte that must move (codes + scales +
zeros (+ compensator) + x + y); y = TFLOP/s. Ceilings from the same run: the measured copy
bandwidth (TB/s x FLOP/B = TFLOP/s) and the best bf16 jnp.dot TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import math
import os

OURS = "milo"
PEER_COLUMNS = ["torch_bf16", "torch_int4_g64", "torch_int4_g128", "gemlite_w4_g64", "gemlite_w2_g64"]


def _ok(r):
    return "error" not in r and r.get("time_us") and r.get("op") != "check"


def _index(records):
    """{(impl, K, N, m, rank): record} for successful timed records (last one wins)."""
    out = {}
    for r in records:
        if _ok(r):
            out[(r["impl"], r["shape"][0], r["shape"][1], r["m"], r.get("rank", 0))] = r
    return out


def _cells(records):
    """(K, N, m) in first-seen order, for every cell our kernel or bf16 was measured in."""
    seen = []
    for r in records:
        if r.get("op") == "check":
            continue
        key = (r["shape"][0], r["shape"][1], r["m"])
        if key not in seen:
            seen.append(key)
    return seen


def _f(v, p=2):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{p}f}"


def markdown(meta: dict) -> str:
    recs = meta.get("records", [])
    idx = _index(recs)
    ceil = meta.get("ceilings", {})
    lines = [f"# quant_matmul on {meta.get('device')} ({meta.get('date')}, jax {meta.get('jax')})", ""]
    for run in meta.get("runs") or [dict(command=meta.get("command"), ceilings=ceil)]:
        c = run.get("ceilings") or {}
        lines.append(f"- `{run.get('command')}`: copy ceiling {_f(c.get('copy_tbps'))} TB/s "
                     f"(torch {_f(c.get('copy_tbps_torch'))}, jax {_f(c.get('copy_tbps_jax'))})")
    lines += ["", f"bf16 dense peak (best bf16 jnp.dot in these runs): {_f(ceil.get('bf16_tflops'), 1)} TFLOP/s.",
              "Ours (`milo`): 3-bit, group 64, rank 0, api.matmul's default path at the time of the run "
              "(the `path` column: decode kernel, or a dequantize + bf16 dot). TB/s and % copy count the bytes that must move "
              "(codes, scales, zeros, x, y); 'vs X' = X's time / ours (> 1: ours faster).", "",
              "| K x N | M | us | TB/s | % copy | TFLOP/s | vs bf16 | "
              + " | ".join(f"vs {p}" for p in PEER_COLUMNS) + " | path |",
              "|---" * (8 + len(PEER_COLUMNS)) + "|"]
    for k, n, m in _cells(recs):
        ours = idx.get((OURS, k, n, m, 0))
        bf = idx.get(("bf16_jnp_dot", k, n, m, 0))
        if ours is None:
            row = [f"{k}x{n}", str(m), "", "", "", "", ""]
        else:
            us = ours["time_us"]
            row = [f"{k}x{n}", str(m), _f(us, 1), _f(ours["tbps"]), _f(100 * ours["frac_copy"], 0),
                   _f(ours.get("tflops"), 1), _f(bf["time_us"] / us) if bf else ""]
        for p in PEER_COLUMNS:
            pr = idx.get((p, k, n, m, 0))
            row.append(_f(pr["time_us"] / ours["time_us"]) if (pr and ours) else "")
        row.append("" if ours is None else str(ours.get("path", "")))
        lines.append("| " + " | ".join(row) + " |")

    comp = [(key, r) for key, r in idx.items() if key[0] == OURS and key[4]]
    if comp:
        lines += ["", "Compensator overhead (same kernel path, rank r vs rank 0):", "",
                  "| K x N | M | rank | us | rank-0 us | overhead |", "|---|---|---|---|---|---|"]
        for (impl, k, n, m, rank), r in comp:
            base = idx.get((OURS, k, n, m, 0))
            ov = f"{100 * (r['time_us'] / base['time_us'] - 1):+.0f}%" if base else ""
            lines.append(f"| {k}x{n} | {m} | {rank} | {_f(r['time_us'], 1)} | {_f(base['time_us'], 1) if base else ''} | {ov} |")

    lines += ["", "All records:", "",
              "| impl | K x N | M | bits | g | rank | us | TB/s | % copy | TFLOP/s | vs bf16 | relerr | timing / config |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        head = f"| {r['impl']} | {r['shape'][0]}x{r['shape'][1]} | {r['m']} | {r.get('bits')} | {r.get('group_size')} | {r.get('rank')} "
        if r.get("op") == "check":
            lines.append(head + f"| | | | | | {r['relerr']:.1e} | check |")
        elif "error" in r:
            lines.append(head + f"| FAILED: {r['error'][:100].replace('|', '/')} | | | | | | |")
        else:
            extra = " ".join(str(v) for v in (r.get("timing"), r.get("config")) if v)
            lines.append(head + f"| {_f(r['time_us'], 1)} | {_f(r['tbps'])} | {_f(100 * r['frac_copy'], 0)} | "
                         f"{_f(r.get('tflops'), 1)} | {_f(r.get('speedup_vs_bf16'))} | "
                         f"{'' if r.get('relerr') is None else format(r['relerr'], '.1e')} | {extra} |")
    if meta.get("notes"):
        lines += ["", str(meta["notes"])]
    return "\n".join(lines) + "\n"


STYLE = {  # impl: (marker, label)
    OURS: ("*", "milo w3 g64 (ours)"),
    "bf16_jnp_dot": ("o", "bf16 jnp.dot"),
    "torch_bf16": ("s", "torch bf16"),
    "torch_int4_g64": ("^", "torch int4 g64"),
    "torch_int4_g128": ("v", "torch int4 g128"),
    "gemlite_w4_g64": ("D", "gemlite w4 g64"),
    "gemlite_w2_g64": ("d", "gemlite w2 g64"),
}


def roofline(meta: dict, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in meta.get("records", []) if _ok(r) and r.get("rank", 0) == 0 and r.get("bytes")]
    ceil = meta.get("ceilings", {})
    bw, peak = ceil.get("copy_tbps"), ceil.get("bf16_tflops")
    fig, ax = plt.subplots(figsize=(9, 6))
    ais = [2 * r["m"] * r["shape"][0] * r["shape"][1] / r["bytes"] for r in recs]
    if bw and peak and ais:
        lo, hi = min(ais) / 2, max(ais) * 2
        knee = peak / bw
        xs = [lo, knee, max(hi, knee * 2)]
        ax.plot(xs, [min(bw * x, peak) for x in xs], "k-", lw=1.5,
                label=f"ceiling: copy {bw:.2f} TB/s, bf16 jnp.dot {peak:.0f} TFLOP/s")
    ms = sorted({r["m"] for r in recs})
    cmap = plt.get_cmap("viridis")
    color = {m: cmap(i / max(1, len(ms) - 1)) for i, m in enumerate(ms)}
    extra = {r["impl"]: ("P", r["impl"]) for r in recs if r["impl"].startswith("milo_w")}
    for impl, (marker, label) in {**STYLE, **extra}.items():
        pts = [(a, r) for a, r in zip(ais, recs) if r["impl"] == impl]
        if not pts:
            continue
        ax.scatter([a for a, _ in pts], [r["tflops"] for _, r in pts], marker=marker,
                   c=[color[r["m"]] for _, r in pts], s=110 if impl.startswith(OURS) else 40,
                   edgecolors="red" if impl.startswith(OURS) else "none", label=label, alpha=0.9)
    for m in ms:
        ax.scatter([], [], marker="o", color=color[m], label=f"M={m}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per byte that must move)")
    ax.set_ylabel("TFLOP/s")
    shapes = sorted({f"{r['shape'][0]}x{r['shape'][1]}" for r in recs})
    ax.set_title(f"quant_matmul roofline, {meta.get('device')} ({', '.join(shapes)})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def merge(meta: dict, other: dict) -> dict:
    """Records and runs of `other` appended to `meta` (two commands of one benchmark); the top-level
    ceilings keep meta's copy ceiling and take the best bf16 TFLOP/s of both."""
    runs = (meta.get("runs") or [dict(command=meta.get("command"), ceilings=meta.get("ceilings"))]) + \
        (other.get("runs") or [dict(command=other.get("command"), ceilings=other.get("ceilings"))])
    ceil = dict(meta.get("ceilings") or {})
    tf = [c.get("bf16_tflops") for c in (meta.get("ceilings") or {}, other.get("ceilings") or {}) if c.get("bf16_tflops")]
    if tf:
        ceil["bf16_tflops"] = max(tf)
    return dict(meta, ceilings=ceil, runs=runs, command=" ; ".join(str(r.get("command")) for r in runs),
                records=meta.get("records", []) + other.get("records", []))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("json", nargs="?", default="benchmarks/results/quant_matmul.json")
    ap.add_argument("--merge", nargs="*", default=[], help="JSONs of other commands: their records are appended to JSON (rewritten)")
    ap.add_argument("--png", default=None, help="default: <json stem>_roofline.png")
    ap.add_argument("--md", default=None, help="default: <json stem>.md")
    args = ap.parse_args(argv)
    with open(args.json) as fh:
        meta = json.load(fh)
    for path in args.merge:
        with open(path) as fh:
            meta = merge(meta, json.load(fh))
    if args.merge:
        with open(args.json, "w") as fh:
            json.dump(meta, fh, indent=1)
    stem = os.path.splitext(args.json)[0]
    with open(args.md or stem + ".md", "w") as fh:
        fh.write(markdown(meta))
    print(roofline(meta, args.png or stem + "_roofline.png"))


if __name__ == "__main__":
    main()
