"""Plot and tabulate benchmarks/moe_layer.py results.

    python -m benchmarks.plot_moe_layer benchmarks/results/moe_layer.json
    # -> benchmarks/results/moe_layer.png (time vs tokens per impl, one panel per model, log-log)
    #    benchmarks/results/moe_layer_table.md (one row per model and token count, one column per impl:
    #    time in us and the speedup over jax.lax.ragged_dot bf16 of the same run)

Several JSON files may be given (e.g. one per model); their records are merged, a later file's
record replacing an earlier one of the same (model, impl, tokens). Failed cases are left out of
the plot and shown as "failed (stage)" in the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os

IMPL_STYLE = {   # impl -> (label, color, linestyle, marker)
    "ragged_dot_bf16": ("jax.lax.ragged_dot bf16", "black", "-", "o"),
    "grouped_bf16": ("grouped_matmul auto, bf16", "0.5", "--", "o"),
    "model_bf16": ("StackedExperts bf16", "0.7", ":", "o"),
    "bf16_kernel": ("grouped kernel bf16", "tab:blue", "-", "s"),
    "q3_grouped": ("3-bit, dequantize + ragged_dot", "tab:orange", "--", "^"),
    "q3_model": ("3-bit, StackedExperts (prepared)", "tab:orange", ":", "^"),
    "q3_model_unprepared": ("3-bit, StackedExperts unprepared", "tab:brown", ":", "^"),
    "q3_kernel": ("3-bit grouped kernel", "tab:red", "-", "^"),
    "mixed234_grouped": ("2/3/4-bit, dequantize + ragged_dot", "tab:green", "--", "D"),
    "mixed234_kernel": ("2/3/4-bit grouped kernel", "tab:green", "-", "D"),
    "tokamax_int4": ("tokamax ragged_dot int4", "tab:purple", "-", "v"),
}


def load(paths):
    """-> (meta of the last file, records merged by (model, impl, tokens), in first-seen order)."""
    merged, meta = {}, {}
    for path in paths:
        with open(path) as fh:
            meta = json.load(fh)
        for r in meta.get("records", []):
            if "model" not in r or "impl" not in r or "m" not in r:
                raise ValueError(f"{path}: record without model / impl / m: {r}")
            merged[(r["model"], r["impl"], int(r["m"]))] = r
    return meta, list(merged.values())


def _order(values, preferred):
    known = [v for v in preferred if v in values]
    return known + sorted(v for v in values if v not in preferred)


def plot(records, path, title=""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in records))
    if not models:
        raise ValueError("plot_moe_layer: no records to plot")
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in records if r["model"] == model and r.get("time_us")]
        impls = _order({r["impl"] for r in rows}, list(IMPL_STYLE))
        for impl in impls:
            pts = sorted((r["m"], r["time_us"]) for r in rows if r["impl"] == impl)
            label, color, ls, marker = IMPL_STYLE.get(impl, (impl, None, "-", "x"))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls=ls, marker=marker, color=color, label=label)
        failed = sorted({r["impl"] for r in records if r["model"] == model and "error" in r})
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ticks = sorted({r["m"] for r in rows})
        if ticks:
            ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("tokens")
        ax.set_ylabel("MoE FFN time (us)")
        ax.set_title(model + (f"\nfailed: {', '.join(failed)}" if failed else ""), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        if rows:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(records, meta) -> list:
    """Markdown: one row per (model, tokens), one column per impl: 'us (x vs ragged_dot)'."""
    impls = _order({r["impl"] for r in records}, list(IMPL_STYLE))
    head = (f"MoE FFN time in us (router excluded) on {meta.get('device', '?')}, jax {meta.get('jax', '?')}, "
            f"{meta.get('date', '?')}; in parentheses: speedup over jax.lax.ragged_dot bf16 of the same run.")
    lines = [head, "", "| model | tokens | " + " | ".join(impls) + " |", "|---|---|" + "---|" * len(impls)]
    keys = sorted({(r["model"], int(r["m"])) for r in records},
                  key=lambda mk: ([r["model"] for r in records].index(mk[0]), mk[1]))
    by = {(r["model"], int(r["m"]), r["impl"]): r for r in records}
    for model, m in keys:
        cells = []
        for impl in impls:
            r = by.get((model, m, impl))
            if r is None:
                cells.append("")
            elif "error" in r:
                cells.append(f"failed ({r.get('stage', '?')})")
            else:
                sp = r.get("speedup_vs_ragged_dot")
                cells.append(f"{r['time_us']:.1f}" + ("" if sp is None or impl == "ragged_dot_bf16" or
                                                      not math.isfinite(sp) else f" ({sp:.2f}x)"))
        lines.append(f"| {model} | {m} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("json", nargs="+", help="moe_layer.py output(s)")
    ap.add_argument("--png", default=None, help="default: first JSON with .png")
    ap.add_argument("--md", default=None, help="default: first JSON with _table.md")
    args = ap.parse_args(argv)
    meta, records = load(args.json)
    stem = os.path.splitext(args.json[0])[0]
    png, md = args.png or stem + ".png", args.md or stem + "_table.md"
    plot(records, png, title=f"MoE FFN on {meta.get('device', '?')} (router excluded)")
    lines = table(records, meta)
    with open(md, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {png} and {md}")


if __name__ == "__main__":
    main()
