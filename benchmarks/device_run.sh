#!/bin/bash
# GPU runs of one session, batched into few device calls (each under the 600 s command limit):
#   bash benchmarks/device_run.sh kernels     # native kernel tests, unpack variants, quantize speed
#   bash benchmarks/device_run.sh bench       # quant_matmul (Mixtral shapes) + moe_layer (Mixtral)
#   bash benchmarks/device_run.sh native      # every -m gpu test, 4 processes
#   bash benchmarks/device_run.sh qm_rest     # quant_matmul: DeepSeek and 4096^2 shapes (append)
#   bash benchmarks/device_run.sh moe MODEL   # moe_layer, one model per call, every impl (resumable)
#   bash benchmarks/device_run.sh profile [VARIANTS]   # CUPTI times of decode probes + Nsight Compute counters
#   bash benchmarks/device_run.sh s30c        # this stop's run (the modes of stops 11-29, which the NOTES cite by
#                                             # name, are in git history: `git show 85c245b:benchmarks/device_run.sh`)
# Needs .whl (carry): pytest-xdist + execnet for the native tests, hqq (+ termcolor) for the quantize-speed peer, gemlite for quant_matmul's
# peers, tokamax + qwix (+ deps) for moe_layer's int4 peer. Everything lands in $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl > /dev/null 2>&1; then   # carried wheels (the H200 image already has pytest-xdist)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl > "$OUT/pip.txt" 2>&1 || { tail "$OUT/pip.txt"; exit 1; }
fi
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
step() {  # step NAME TIMEOUT CMD...: run, keep the log, show its tail
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "=== $name: rc $rc in $(( $(date +%s) - t0 )) s"
  tail -n "${TAIL:-25}" "$OUT/$name.txt"
  return $rc
}
pack() {  # move what $OUT holds into $OUT/results.tar (the device returns at most 8 files)
  (cd "$OUT" && ls | grep -v '^results.tar$' | xargs -r tar -rf results.tar --remove-files)
}
case "$1" in
  kernels)
    TAIL=30 step native_tests 230 python3 -m pytest tests/test_grouped_matmul.py \
      tests/test_quant_matmul.py tests/test_quant_matmul_variants.py -q -m gpu -rfEs -p no:cacheprovider
    TAIL=60 step variants 210 python3 -m benchmarks.quant_matmul_variants --budget-s 140
    cp -f "$OUT"/quant_matmul_variants.json /tmp/ 2>/dev/null
    step quantize_speed 140 python3 -m benchmarks.quantize_speed --repeats 2 \
      --out "$OUT/quantize_speed.json"
    ;;
  bench)
    TAIL=40 step quant_matmul 300 python3 -m benchmarks.quant_matmul --shapes 4096x14336,14336x4096 \
      --out "$OUT/quant_matmul.json"
    TAIL=40 step moe_layer 240 python3 -m benchmarks.moe_layer --models mixtral-8x7b \
      --impls ragged_dot_bf16,q3_kernel,q3_model,bf16_kernel,q3_grouped --budget-s 200 \
      --out "$OUT/moe_layer.json"
    ;;
  native)   # all 25 passed in 134 s with -n 4 (2026-11-23; pytest-xdist + execnet carried in .whl)
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=40 step native_tests 400 python3 -m pytest tests/test_grouped_matmul.py \
      tests/test_quant_matmul.py tests/test_quant_matmul_variants.py -q -m gpu -rfEs -p no:cacheprovider \
      -n 4 --durations=20
    ;;
  qm_rest)
    TAIL=40 step quant_matmul 560 python3 -m benchmarks.quant_matmul --shapes 2048x1408,1408x2048,4096x4096 \
      --out "$OUT/quant_matmul_b.json"
    ;;
  moe)
    TAIL=40 step moe_layer 560 python3 -m benchmarks.moe_layer --models "${2:-mixtral-8x7b}" --budget-s 500 \
      --out "$OUT/moe_layer_${2:-mixtral-8x7b}.json"
    ;;
  profile)  # issue 6 diagnosis: CUPTI times of decode variants, then Nsight Compute counters of the kernels
    TAIL=12 step time 200 python3 -m benchmarks.profile_decode --time --variants ${2:-default,stream,split8,grouped}
    TAIL=8 step ncu 300 ncu --clock-control none -k regex:mosaic --set detailed -f -o "$OUT/decode" \
      python3 -m benchmarks.profile_decode --variants ${2:-default,stream,split8,grouped}
    ncu --import "$OUT/decode.ncu-rep" --page details > "$OUT/ncu_details.txt" 2>&1
    grep -E "^  [a-z_]+|Duration|DRAM Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit|Stall|Issued Warp|Eligible|L2 Hit|Dynamic Shared|One or More" "$OUT/ncu_details.txt" | head -120
    ;;
  s30c)  # two compute warpgroups per CTA (stream_k_sm90.WS_COMPUTE_WGS = 2, BN 128): native tests, then the default
          # against it at 3 / 4 stages; where it wins at M = 1, issue 6's table with it on (same call)
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=6 step native_ws 150 python3 -m pytest tests/test_quant_matmul_stream_k.py \
      -q -m gpu -k warp_specialized -rfEs -p no:cacheprovider -n 3
    ws_rc=$?
    pack
    SK=pallas_kernels.quant_matmul.stream_k_sm90
    variants=("0 --ms 1,4,16" "1 --ms 1,4,16" "1 --set $SK.WS_STAGES=3 --ms 1,4,16")   # 5+ stages: over SMEM at M = 16
    [ $ws_rc = 124 ] && variants=("0 --ms 1,4,16")   # a hang: time the default only
    for v in "${variants[@]}"; do
      name=$(echo "$v" | sed 's/ --ms.*//' | tr -c 'A-Za-z0-9' _)
      TAIL=4 step qm_ws2_$name 80 python3 -m benchmarks.quant_matmul --shapes 4096x14336 --ours-bits 3 \
        --peers '' --ranks 0 --breakdown --no-torch --set $SK.WARP_SPECIALIZED=$v --out "$OUT/quant_matmul_s30c_ws2_$name.json"
      grep -h KERNELS "$OUT/qm_ws2_$name.txt" | cut -c1-160
      pack
    done
    mkdir -p /tmp/s30c && (cd /tmp/s30c && tar xf "$OUT/results.tar" --wildcards '*.json')
    if [ $ws_rc = 0 ] && python3 - /tmp/s30c <<'PY'
import glob, json, sys
t = {f: {r["m"]: r["time_us"] for r in json.load(open(f))["records"] if r.get("impl") == "milo"}
     for f in glob.glob(sys.argv[1] + "/quant_matmul_s30c_ws2_*.json")}
base = [v for f, v in t.items() if f.endswith("ws2_0_.json")][0][1]
best = min(v[1] for f, v in t.items() if not f.endswith("ws2_0_.json"))
print("M=1 default", base, "best WS", best)
sys.exit(0 if best < base else 1)
PY
    then
      TAIL=3 step qm_table 150 python3 -m benchmarks.quant_matmul --shapes 4096x14336 --ms 1,4,16,64 --ours-bits 2,3,4 \
        --peers torch_int4_g128 --ranks 0,32 --breakdown --set $SK.WARP_SPECIALIZED=1 --out "$OUT/quant_matmul_s30c.json"
      grep -E "KERNELS" "$OUT/qm_table.txt" | cut -c1-300
    fi
    pack
    ;;
  s30b)  # after s30c, once WARP_SPECIALIZED is on by default: the dense decode suites natively, then issue 6's table
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=6 step native_stream_k 200 python3 -m pytest tests/test_quant_matmul_stream_k.py \
      tests/test_quant_matmul_prepass.py tests/test_quant_matmul.py -q -m gpu -rfEs -p no:cacheprovider -n 6
    pack
    TAIL=3 step qm 120 python3 -m benchmarks.quant_matmul --shapes 4096x14336 --ms 1,4,16,64 --ours-bits 2,3,4 \
      --peers torch_int4_g128 --ranks 0,32 --breakdown --out "$OUT/quant_matmul_s30b.json"
    grep -E "KERNELS" "$OUT/qm.txt" | cut -c1-300
    pack
    ;;
  *) echo "usage: $0 kernels|bench|native|qm_rest|moe [MODEL]|profile [VARIANTS]|s30b|s30c"; exit 2 ;;
esac
