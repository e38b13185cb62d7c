"""Native check of the stream-K decode kernel, one case per line (progress is printed before each
case, so a hang names its case): python3 -m benchmarks.stream_k_check"""

from __future__ import annotations

import sys
import time

import milo_jax  # noqa: F401
from pallas_kernels.quant_matmul import layout, stream_k_sm90 as sk
from tests.test_quant_matmul import _rng, make_weight, make_x, ref64, rel_err


def main():
    cases = [(2048, 1408, m, rank, ctas) for ctas in (7, None)
             for rank, ms in ((32, (1, 3, 100)), (0, (1, 16)))
             for m in ms]
    bad = 0
    for k, n, m, rank, ctas in cases:
        print(f"case K={k} N={n} M={m} rank={rank} ctas={ctas} ...", end=" ", flush=True)
        t0 = time.time()
        rng = _rng()
        qt = make_weight(k, n, 3, 64, rank, rng)
        kw = layout.prepare(qt, layout=layout.PAIRS_LAYOUT)
        x = make_x(m, k, rng)
        err = rel_err(sk.matmul_stream_k(x, kw, max_ctas=ctas), ref64(x, qt))
        bad += err >= 1e-2
        print(f"rel err {err:.2e} ({time.time() - t0:.1f} s)", flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
