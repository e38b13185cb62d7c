#!/bin/bash
# GPU runs of one session, batched into few device calls (each under the 600 s command limit):
#   bash benchmarks/device_run.sh kernels     # native kernel tests, unpack variants, quantize speed
#   bash benchmarks/device_run.sh bench       # quant_matmul (Mixtral shapes) + moe_layer (Mixtral)
#   bash benchmarks/device_run.sh native      # every -m gpu test, 4 processes
#   bash benchmarks/device_run.sh qm_rest     # quant_matmul: DeepSeek and 4096^2 shapes (append)
#   bash benchmarks/device_run.sh moe MODEL   # moe_layer, one model per call, every impl (resumable)
#   bash benchmarks/device_run.sh regs        # A-from-registers variants + native variant/grouped tests
#   bash benchmarks/device_run.sh regs2       # the sweep with A in registers + all native tests (-n 4)
#   bash benchmarks/device_run.sh final       # quant_matmul table (4 shapes) + Mixtral model path
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
isolated_cases() {  # isolated_cases PATTERN: each tests/test_magic_fold_native.py -m gpu case matching -k PATTERN in
                    # its own process (6 at once: a CUDA fault kills only its case), rc per case in $OUT/cases_rc.txt
  local t0=$(date +%s)
  XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m pytest tests/test_magic_fold_native.py --collect-only -q -m gpu \
    -k "$1" -p no:cacheprovider 2>/dev/null | grep '::' > "$OUT/cases.txt"
  XLA_PYTHON_CLIENT_PREALLOCATE=false xargs -P 6 -I{} sh -c 'n=$(echo "{}" | tr -c "A-Za-z0-9" _); \
    timeout 200 python3 -m pytest "{}" -q -p no:cacheprovider -x > "$0/case_$n.txt" 2>&1; echo "rc=$? {}"' "$OUT" \
    < "$OUT/cases.txt" | sort > "$OUT/cases_rc.txt"
  echo "=== isolated cases in $(( $(date +%s) - t0 )) s"; cat "$OUT/cases_rc.txt"
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
  regs)   # A-from-registers variants + breakdown, then the native tests of the variants and grouped kernels
    TAIL=40 step variants 300 python3 -m benchmarks.quant_matmul_variants --shapes 4096x14336 --budget-s 230 \
      --variants "magic_bf16,regs,regs f16,regs split1,regs split2,regs split7,regs stages3,regs stages4,regs bn128"
    TAIL=30 step native_tests 240 python3 -m pytest tests/test_quant_matmul_variants.py \
      tests/test_grouped_matmul.py -q -m gpu -rfEs -p no:cacheprovider --durations=10
    ;;
  regs2)  # unpack/config sweep with A in registers, then every native test in 4 processes (xdist wheel)
    TAIL=45 step variants 200 python3 -m benchmarks.quant_matmul_variants --shapes 4096x14336,14336x4096 \
      --budget-s 150
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=30 step native_tests 330 python3 -m pytest tests/test_grouped_matmul.py \
      tests/test_quant_matmul.py tests/test_quant_matmul_variants.py -q -m gpu -rfEs -p no:cacheprovider \
      -n 4 --durations=10
    ;;
  final)  # issue 6's table with A in registers (4 shapes, peers without gemlite), then the model path on Mixtral
    TAIL=30 step quant_matmul 320 python3 -m benchmarks.quant_matmul \
      --shapes 4096x14336,2048x1408,1408x2048,4096x4096 --peers torch_int4_g64,torch_int4_g128 \
      --out "$OUT/quant_matmul_regs.json"
    TAIL=25 step moe_layer 190 python3 -m benchmarks.moe_layer --models mixtral-8x7b \
      --impls ragged_dot_bf16,q3_model,q3_kernel --tokens 1,16,4096 --budget-s 150 --out "$OUT/moe_layer_model.json"
    ;;
  profile)  # issue 6 diagnosis: CUPTI times of decode variants, then Nsight Compute counters of the kernels
    TAIL=12 step time 200 python3 -m benchmarks.profile_decode --time --variants ${2:-default,stream,split8,grouped}
    TAIL=8 step ncu 300 ncu --clock-control none -k regex:mosaic --set detailed -f -o "$OUT/decode" \
      python3 -m benchmarks.profile_decode --variants ${2:-default,stream,split8,grouped}
    ncu --import "$OUT/decode.ncu-rep" --page details > "$OUT/ncu_details.txt" 2>&1
    grep -E "^  [a-z_]+|Duration|DRAM Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit|Stall|Issued Warp|Eligible|L2 Hit|Dynamic Shared|One or More" "$OUT/ncu_details.txt" | head -120
    ;;
  s11a)  # stream probes + x rows unpadded; grouped kernel after the decode-grid fixes; native grouped tests
    TAIL=16 step time 200 python3 -m benchmarks.profile_decode --time --variants \
      "default,default+pad_x_rows=0,stream,stream+pad_x_rows=0,stream+k_splits=8,stream+k_splits=2,stream+k_splits=1+stages=4,split8+pad_x_rows=0,grouped"
    TAIL=12 step moe_layer 150 python3 -m benchmarks.moe_layer --models mixtral-8x7b \
      --impls q3_kernel,q3_model --tokens 1,16 --budget-s 120 --out "$OUT/moe_layer_s11a.json"
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=12 step native_tests 200 python3 -m pytest tests/test_grouped_matmul.py \
      tests/test_quant_matmul.py -q -m gpu -rfEs -p no:cacheprovider -n 4
    ;;
  s11b)  # prefill: dequantize kernel, ragged_dot_mgpu configs, grouped prefill path; moe breakdown; native tests
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=12 step native_tests 200 python3 -m pytest tests/test_grouped_matmul.py \
      tests/test_quant_matmul.py -q -m gpu -rfEs -p no:cacheprovider -n 4 -k "prefill or dequant or routings"
    TAIL=30 step prefill_probe 240 python3 -m benchmarks.prefill_probe --out "$OUT/prefill_probe.json"
    TAIL=14 step moe_layer 200 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls ragged_dot_bf16,q3_kernel --tokens 1,4096 --budget-s 170 --out "$OUT/moe_layer_s11b.json"
    ;;
  s11c)  # split-K / BN probes (dense M=1/16, grouped 1 token); quant_matmul table (prefill crossover); Mixtral FFN table
    TAIL=10 step time 150 python3 -m benchmarks.profile_decode --time --variants \
      "default,split8,stream+block_n=128,grouped,grouped+a_regs=1+k_splits=4,grouped+a_regs=1+k_splits=8"
    TAIL=4 step time16 60 python3 -m benchmarks.profile_decode --time --m 16 --variants "default,split8"
    TAIL=20 step quant_matmul 170 python3 -m benchmarks.quant_matmul --shapes 4096x14336 --ms 1,16,64,128,256,4096 \
      --peers torch_int4_g128 --ranks 0,32 --out "$OUT/quant_matmul_s11c.json"
    TAIL=14 step moe_layer 200 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls ragged_dot_bf16,q3_kernel,q3_model --tokens 1,16,64,512,4096 --budget-s 180 --out "$OUT/moe_layer_s11c.json"
    ;;
  s11d)  # native prefill tests; Mixtral FFN with gate+up fused (q3_model) and per projection (q3_kernel); DeepSeek / Qwen
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=6 step native_tests 120 python3 -m pytest tests/test_grouped_matmul.py \
      -q -m gpu -rfEs -p no:cacheprovider -n 4 -k "prefill"
    TAIL=14 step moe_mixtral 210 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls q3_model,q3_kernel --tokens 1,16,64,512,4096 --budget-s 190 --out "$OUT/moe_layer_s11d_mixtral.json"
    TAIL=14 step moe_small 230 python3 -m benchmarks.moe_layer --models deepseek-v2-lite,qwen1.5-moe-a2.7b \
      --impls ragged_dot_bf16,q3_model --tokens 1,16,4096 --budget-s 210 --out "$OUT/moe_layer_s11d_small.json"
    ;;
  s11e)  # every native test, then DeepSeek at 4096 tokens and Qwen (resumes benchmarks/results/moe_layer_s11d_small.json)
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=8 step native_tests 200 python3 -m pytest tests/test_grouped_matmul.py \
      tests/test_quant_matmul.py tests/test_quant_matmul_variants.py -q -m gpu -rfEs -p no:cacheprovider -n 4
    cp benchmarks/results/moe_layer_s11d_small.json "$OUT/moe_layer_s11e_small.json"
    TAIL=14 step moe_small 380 python3 -m benchmarks.moe_layer --models deepseek-v2-lite,qwen1.5-moe-a2.7b \
      --impls ragged_dot_bf16,q3_model --tokens 1,4096 --budget-s 330 --append --resume --out "$OUT/moe_layer_s11e_small.json"
    ;;
  s11f)  # grouped decode MB from rows per expert: Mixtral FFN at 1 / 16 / 64 tokens
    TAIL=10 step moe_mixtral 200 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls ragged_dot_bf16,q3_model --tokens 1,16,64 --budget-s 180 --out "$OUT/moe_layer_s11f_mixtral.json"
    ;;
  s11g)  # mixed 2/3/4-bit Mixtral FFN with this stop's code; quant_matmul on the other shapes (prefill path from M > 128)
    TAIL=8 step moe_mixed 170 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls mixed234_kernel --tokens 1,16,64 --budget-s 150 --out "$OUT/moe_layer_s11g_mixed.json"
    TAIL=30 step quant_matmul 300 python3 -m benchmarks.quant_matmul --shapes 2048x1408,1408x2048,4096x4096,14336x4096 \
      --ms 1,16,256,4096 --peers torch_int4_g128 --ranks 0 --out "$OUT/quant_matmul_s11g.json"
    ;;
  s11h)  # compensator operands in split 0 only: native tests, then rank 0 / 32 at M = 1 / 16 on Mixtral's shape
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=6 step native_tests 200 python3 -m pytest tests/test_grouped_matmul.py \
      tests/test_quant_matmul.py tests/test_quant_matmul_variants.py -q -m gpu -rfEs -p no:cacheprovider -n 4
    TAIL=12 step quant_matmul 120 python3 -m benchmarks.quant_matmul --shapes 4096x14336 --ms 1,16 --peers "" \
      --ranks 0,32 --out "$OUT/quant_matmul_s11h.json"
    ;;
  s12a)  # stream-K decode kernel: native tests, then CUPTI times against the split-K default (M = 1, 16)
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=8 step native_tests 200 python3 -m pytest \
      tests/test_quant_matmul_stream_k.py -q -m gpu -rfEs -p no:cacheprovider
    TAIL=14 step time_m1 260 python3 -m benchmarks.profile_decode --time --variants \
      default,sk,sk+ctas=132,sk+ctas=396,sk+ctas=528,sk+stages=3,sk+stages=4,sk+chunk_slots=4,skstream,skstream+ctas=132,skstream+stages=4
    TAIL=8 step time_m16 120 python3 -m benchmarks.profile_decode --time --m 16 --variants \
      default,sk,sk+ctas=396,sk+stages=3
    ;;
  s12b)  # stream-K with one TMA box for the planes and 128 B-swizzled x: native check, then times
    TAIL=20 step sk_check 150 python3 -m benchmarks.stream_k_check
    TAIL=14 step time_m1 200 python3 -m benchmarks.profile_decode --time --variants \
      default,sk,skstream,sk+ctas=396,sk+stages=3,sk+stages=4,skstream+stages=4
    TAIL=8 step time_m16 100 python3 -m benchmarks.profile_decode --time --m 16 --variants default,sk,sk+stages=3
    ;;
  s12c)  # stream-K: compensator within one step; tile-major codes; native check, then times
    TAIL=24 step sk_check 170 python3 -m benchmarks.stream_k_check
    TAIL=14 step time_m1 200 python3 -m benchmarks.profile_decode --time --variants \
      default,sk,sktm,sktmstream,sktm+ctas=396,sktm+stages=4,sktm+ctas=132+stages=4
    TAIL=8 step time_m16 100 python3 -m benchmarks.profile_decode --time --m 16 --variants default,sk,sktm
    ;;
  s12d)  # why stream-K's loads are slow: BN 128 (x traffic halved), then ncu of the two load-only probes
    TAIL=14 step time_m1 200 python3 -m benchmarks.profile_decode --time --variants \
      stream,skstream,skstream+block_n=128,sk+block_n=128,sktm+block_n=128,sk+block_n=128+ctas=396
    TAIL=8 step ncu 240 ncu --clock-control none -k regex:mosaic --set detailed -f -o "$OUT/decode" \
      python3 -m benchmarks.profile_decode --variants stream,skstream
    ncu --import "$OUT/decode.ncu-rep" --page details > "$OUT/ncu_details.txt" 2>&1
    grep -E "^  [a-z_]+|Duration|DRAM Throughput|Memory Throughput|L1/TEX Hit|L2 Hit|Achieved Occupancy|Theoretical Occupancy|Block Limit|Issued Warp|Eligible|Dynamic Shared|Waves Per SM|Grid Size" "$OUT/ncu_details.txt" | head -80
    ;;
  s12e)  # stream-K timing stability: the same variants twice in one process, M = 1 then 16
    TAIL=16 step time_m1 240 python3 -m benchmarks.profile_decode --time --variants \
      default,sk+block_n=128,sk,sk+block_n=128+stages=3,sk+block_n=128+ctas=132,default,sk+block_n=128,sk,sk+block_n=128+stages=3
    TAIL=8 step time_m16 100 python3 -m benchmarks.profile_decode --time --m 16 --variants default,sk,sk+block_n=128,sk+block_n=128+stages=3
    ;;
  s12f)  # split-K default vs stream-K (and its loads alone) over shapes and M (probe cache fixed)
    for shape in 4096x14336 14336x4096 2048x1408 4096x4096; do
      for m in 1 4 16 64; do
        TAIL=3 step "time_${shape}_m$m" 60 python3 -m benchmarks.profile_decode --time --shape $shape --m $m \
          --variants default,sk,skstream
      done
    done
    ;;
  s12g)  # stream-K as the default decode schedule: every native test, then issue 6's table
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=8 step native_tests 260 python3 -m pytest tests/test_grouped_matmul.py \
      tests/test_quant_matmul.py tests/test_quant_matmul_variants.py tests/test_quant_matmul_stream_k.py \
      -q -m gpu -rfEs -p no:cacheprovider -n 4
    TAIL=30 step quant_matmul 300 python3 -m benchmarks.quant_matmul --shapes 4096x14336,2048x1408 \
      --ms 1,4,16,64 --peers torch_int4_g128 --ranks 0,32 --out "$OUT/quant_matmul_s12g.json"
    ;;
  s13a)  # is stream-K compute- or load-bound? SASS of the kernel, compute-only / load-only probes, deeper pipelines
    mkdir -p "$OUT/dump"
    MOSAIC_GPU_DUMP_SASS=1 MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_TO="$OUT/dump" \
      TAIL=3 step dump 90 python3 -m benchmarks.profile_decode --variants sk
    TAIL=16 step time_m1 240 python3 -m benchmarks.profile_decode --time --variants \
      sk,skstream,skcompute,sk+ctas=132+stages=4,sk+ctas=132+stages=6,skstream+ctas=132+stages=6,sk+stages=3,skcompute+ctas=132
    TAIL=6 step time_m16 90 python3 -m benchmarks.profile_decode --time --m 16 --variants sk,skstream,skcompute
    TAIL=8 step ncu 200 ncu --clock-control none -k regex:mosaic --set detailed --section InstructionStats \
      --section WarpStateStats -f -o "$OUT/decode" python3 -m benchmarks.profile_decode --variants sk,skcompute
    ncu --import "$OUT/decode.ncu-rep" --page details > "$OUT/ncu_details.txt" 2>&1
    grep -E "^  [a-z_]+|Duration|DRAM Throughput|Issued Ipc|Issue Slots|Executed Instructions|Achieved Occupancy|Registers Per|Stall|Eligible|Warp Cycles" "$OUT/ncu_details.txt" | head -60
    ;;
  s14a)  # 2/4-bit planar_pairs (magic unpack): quant_matmul 2/3/4-bit on Mixtral's shape (relerr checked),
         # the Mixtral FFN uniform 3-bit vs mixed 2/3/4 (kernel and model paths), then every native test
    TAIL=30 step quant_matmul 130 python3 -m benchmarks.quant_matmul --shapes 4096x14336 --ms 1,4,16,64 \
      --ours-bits 2,3,4 --peers torch_int4_g128 --ranks 0,32 --check --out "$OUT/quant_matmul_s14a.json"
    TAIL=16 step moe_mixtral 250 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls ragged_dot_bf16,q3_kernel,mixed234_kernel,q3_model,mixed234_model --tokens 1,16 --budget-s 220 \
      --out "$OUT/moe_layer_s14a_mixtral.json"
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=12 step native_tests 190 python3 -m pytest tests/test_grouped_matmul.py \
      tests/test_quant_matmul.py tests/test_quant_matmul_variants.py tests/test_quant_matmul_stream_k.py \
      -q -m gpu -rfEs -p no:cacheprovider -n 4
    ;;
  s14b)  # mixed 2/3/4 in one launch (multi_class_sm90): native tests of it, then the Mixtral FFN uniform vs mixed
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=8 step native_multi 170 python3 -m pytest tests/test_grouped_matmul.py \
      -q -m gpu -rfEs -p no:cacheprovider -n 4 -k "multi_class or mixed"
    TAIL=16 step moe_mixtral 330 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls q3_model,mixed234_model,q3_kernel,mixed234_kernel --tokens 1,16,64 --budget-s 300 \
      --out "$OUT/moe_layer_s14b_mixtral.json"
    ;;
  s14c)  # final code: 2/4-bit magic vs f32 unpack, quant_matmul 2/3/4-bit on the small shapes, the mixed FFN at
         # 64 tokens (resumes s14b), then every native test
    TAIL=12 step pairs_vs_nmajor 120 python3 -m benchmarks.pairs_vs_nmajor --out "$OUT/pairs_vs_nmajor.json"
    TAIL=8 step quant_matmul 150 python3 -m benchmarks.quant_matmul --shapes 2048x1408,4096x4096 --ms 1,16 \
      --ours-bits 2,3,4 --peers torch_int4_g128 --ranks 0 --out "$OUT/quant_matmul_s14c.json"
    cp benchmarks/results/moe_layer_s14b_mixtral.json "$OUT/moe_layer_s14c_mixtral.json"
    TAIL=6 step moe_mixtral 90 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls q3_model,mixed234_model,q3_kernel,mixed234_kernel --tokens 1,16,64 --budget-s 70 --append --resume \
      --out "$OUT/moe_layer_s14c_mixtral.json"
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=8 step native_tests 200 python3 -m pytest tests/test_grouped_matmul.py \
      tests/test_quant_matmul.py tests/test_quant_matmul_variants.py tests/test_quant_matmul_stream_k.py \
      -q -m gpu -rfEs -p no:cacheprovider -n 4
    ;;
  s15a)  # H200: is stream-K compute- or load-bound? load-only / compute-only / L2-hot probes, deeper pipelines and
         # more CTAs per SM, SASS of the kernel, ncu warp states
    mkdir -p "$OUT/dump"
    MOSAIC_GPU_DUMP_SASS=1 MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_TO="$OUT/dump" \
      TAIL=3 step dump 60 python3 -m benchmarks.profile_decode --variants sk
    TAIL=16 step time_m1 200 python3 -m benchmarks.profile_decode --time --variants \
      sk,skstream,skcompute,skhot,sk+stages=3,sk+stages=4,sk+ctas=396,sk+ctas=528+stages=3,skstream+ctas=528+stages=4,skhot+ctas=528
    TAIL=6 step time_m16 70 python3 -m benchmarks.profile_decode --time --m 16 --variants sk,skstream,skhot
    TAIL=8 step ncu 160 ncu --clock-control none -k regex:mosaic --set detailed --section InstructionStats \
      --section WarpStateStats -f -o "$OUT/decode" python3 -m benchmarks.profile_decode --variants sk,skstream
    ncu --import "$OUT/decode.ncu-rep" --page details > "$OUT/ncu_details.txt" 2>&1
    grep -E "^  [a-z_]+|Duration|DRAM Throughput|Issued Ipc|Issue Slots|Executed Instructions|Achieved Occupancy|Registers Per|Stall|Eligible|Warp Cycles" "$OUT/ncu_details.txt" | head -60
    ;;
  s15b)  # where the compute goes: SASS of the stream-K kernel (opcode histogram), conversion-only and MMA-only probes
    mkdir -p /tmp/dump
    MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_TO=/tmp/dump TAIL=2 step dump 60 python3 -m benchmarks.profile_decode --variants sk
    ptx=$(ls /tmp/dump/*.ptx | head -1); echo "ptx: $ptx"
    ptxas -arch=sm_90a "$ptx" -o /tmp/k.cubin -v > "$OUT/ptxas.txt" 2>&1; tail -3 "$OUT/ptxas.txt"
    cuobjdump --dump-sass /tmp/k.cubin > "$OUT/sass.txt" 2>&1
    grep -oE "^ +/\*[0-9a-f]+\*/ +[A-Z0-9_.]+" "$OUT/sass.txt" | awk '{print $2}' | sed 's/\..*//' | sort | uniq -c | sort -rn | head -30
    TAIL=12 step time_m1 200 python3 -m benchmarks.profile_decode --time --variants sk,sknomma,sknoconv,skhot,sknoconv+chunk_slots=16,sk+chunk_slots=4,sk+chunk_slots=16
    TAIL=4 step time_m16 60 python3 -m benchmarks.profile_decode --time --m 16 --variants sknomma,sknoconv
    ;;
  s15c)  # stall reasons of the stream-K kernel (the s15a report, carried in .probe/), one-op-less and constant-scale
         # probes, and the warp states at 4 CTAs per SM
    ncu --import .probe/decode.ncu-rep --page raw --csv > /tmp/raw.csv 2>&1
    python3 - <<'PY' | tee "$OUT/stalls.txt"
import csv
rows = list(csv.reader(open("/tmp/raw.csv")))
head = rows[0]
for r in rows[2:]:
    print("kernel", r[head.index("Kernel Name")] if "Kernel Name" in head else "?")
    for h, v in zip(head, r):
        if "issue_stalled" in h and "pct" not in h and v not in ("", "0"):
            try:
                if float(v.replace(",", "")) < 0.05:
                    continue
            except ValueError:
                pass
            print(f"  {h}: {v}")
PY
    TAIL=8 step time_m1 150 python3 -m benchmarks.profile_decode --time --variants sk,sk1fma,sknoscale,skhot+ctas=528
    TAIL=30 step ncu 120 ncu --clock-control none -k regex:mosaic --section Occupancy --section LaunchStats \
      --section WarpStateStats --section ComputeWorkloadAnalysis python3 -m benchmarks.profile_decode --variants sk+ctas=528
    ;;
  s15d)  # scales up front (SCALES_UPFRONT): stream-K A/B against the lazy schedule, registers, the issue table on
         # Mixtral's shape, the Mixtral FFN at 1 and 16 tokens
    mkdir -p /tmp/dump
    MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_TO=/tmp/dump TAIL=1 step dump 60 python3 -m benchmarks.profile_decode --variants sk
    ptxas -arch=sm_90a "$(ls /tmp/dump/*.ptx | head -1)" -o /tmp/k.cubin -v 2>&1 | tail -2
    TAIL=14 step time_m1 150 python3 -m benchmarks.profile_decode --time --variants \
      sk,sklazy,sknoscale,sk+stages=3,sk+ctas=396,sk+ctas=528
    TAIL=4 step time_m16 60 python3 -m benchmarks.profile_decode --time --m 16 --variants sk,sklazy
    TAIL=24 step quant_matmul 120 python3 -m benchmarks.quant_matmul --shapes 4096x14336 --ms 1,4,16 \
      --ours-bits 2,3,4 --peers torch_int4_g128 --ranks 0,32 --check --out "$OUT/quant_matmul_s15d.json"
    TAIL=10 step moe_mixtral 150 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls q3_model --tokens 1,16 --budget-s 130 --out "$OUT/moe_layer_s15d_mixtral.json"
    ;;
  s15e)  # scale path: packed conversions + bfloat16 scales in planar_pairs vs before; pipe use of the s15a kernel
    ncu --import .probe/decode.ncu-rep --page raw --csv > /tmp/raw.csv 2>&1
    python3 - <<'PY' | tee "$OUT/pipes.txt"
import csv
rows = list(csv.reader(open("/tmp/raw.csv")))
head = rows[0]
r = rows[2]
for h, v in zip(head, r):
    if ("pipe" in h or "inst_executed" in h) and v not in ("", "0", "0.00"):
        print(f"  {h}: {v}")
PY
    mkdir -p /tmp/dump
    MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_TO=/tmp/dump TAIL=1 step dump 60 python3 -m benchmarks.profile_decode --variants sk
    ptxas -arch=sm_90a "$(ls /tmp/dump/*.ptx | head -1)" -o /tmp/k.cubin -v 2>&1 | tail -2
    cuobjdump --dump-sass /tmp/k.cubin | grep -oE "^ +/\*[0-9a-f]+\*/ +[A-Z0-9_.]+" | awk '{print $2}' | sed 's/\..*//' \
      | sort | uniq -c | sort -rn > "$OUT/sass_opcodes.txt"; head -14 "$OUT/sass_opcodes.txt" | tr '\n' ' '; echo
    TAIL=12 step time_m1 150 python3 -m benchmarks.profile_decode --time --variants sk,sklazy,sknoscale
    TAIL=24 step quant_matmul 120 python3 -m benchmarks.quant_matmul --shapes 4096x14336 --ms 1,4,16 \
      --ours-bits 2,3,4 --peers torch_int4_g128 --ranks 0,32 --check --out "$OUT/quant_matmul_s15e.json"
    TAIL=10 step moe_mixtral 150 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls q3_model --tokens 1,16 --budget-s 130 --out "$OUT/moe_layer_s15e_mixtral.json"
    ;;
  s15g)  # final code of stop 15: native tests, the issue-6 table (Mixtral shape, then the small shapes), the Mixtral FFN
         # with the grouped split-K target as it is (1848 CTAs) and halved (924)
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=4 step native_tests 200 python3 -m pytest tests/test_grouped_matmul.py \
      tests/test_quant_matmul.py tests/test_quant_matmul_variants.py tests/test_quant_matmul_stream_k.py \
      -q -m gpu -rfEs -p no:cacheprovider -n 4
    pack
    TAIL=22 step quant_matmul 100 python3 -m benchmarks.quant_matmul --shapes 4096x14336 --ms 1,4,16,64 \
      --ours-bits 2,3,4 --peers torch_int4_g128 --ranks 0,32 --check --out "$OUT/quant_matmul_s15g.json"
    pack
    TAIL=10 step quant_matmul_small 60 python3 -m benchmarks.quant_matmul --shapes 2048x1408,4096x4096 --ms 1,16 \
      --ours-bits 3,4 --peers torch_int4_g128 --ranks 0 --out "$OUT/quant_matmul_s15g_small.json"
    pack
    TAIL=10 step moe_mixtral 110 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls ragged_dot_bf16,q3_model,mixed234_model --tokens 1,16 --budget-s 100 --out "$OUT/moe_layer_s15g_mixtral.json"
    pack
    TAIL=10 step moe_target924 80 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls q3_model,mixed234_model --tokens 1,16 --budget-s 70 --grouped-cta-target 924 \
      --out "$OUT/moe_layer_s15g_target924.json"
    pack
    ;;
  s16a)  # stop 16: routed_ffn (padded row domain) native tests; Mixtral FFN routed vs sorted with per-kernel
         # times; scale pairs up front in the grouped launches by row count
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=6 step native_tests 170 python3 -m pytest tests/test_routed_ffn.py \
      tests/test_grouped_matmul.py -q -m gpu -rfEs -p no:cacheprovider -n 4
    pack
    TAIL=16 step moe_mixtral 230 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown --no-check \
      --impls q3_model,q3_model_sorted,mixed234_model --tokens 1,4,16,64 --budget-s 210 \
      --out "$OUT/moe_layer_s16a_mixtral.json"
    pack
    TAIL=8 step moe_upfront0 70 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown --no-check \
      --impls q3_model --tokens 1,4 --budget-s 60 --grouped-upfront-rows 0 --out "$OUT/moe_layer_s16a_upfront0.json"
    pack
    TAIL=8 step moe_upfront8 70 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown --no-check \
      --impls q3_model --tokens 4,16 --budget-s 60 --grouped-upfront-rows 32 --out "$OUT/moe_layer_s16a_upfront32.json"
    pack
    ;;
  s16b)  # stop 16 final: native tests; Mixtral FFN table (ragged_dot bf16 in the same run); the combine as a reduction
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=6 step native_tests 170 python3 -m pytest tests/test_routed_ffn.py \
      tests/test_grouped_matmul.py tests/test_quant_matmul_stream_k.py -q -m gpu -rfEs -p no:cacheprovider -n 4
    pack
    TAIL=16 step moe_mixtral 250 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls ragged_dot_bf16,q3_model,mixed234_model,q3_model_sorted --tokens 1,16,64 --budget-s 230 \
      --out "$OUT/moe_layer_s16b_mixtral.json"
    pack
    TAIL=8 step moe_reduce 60 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown --no-check \
      --impls q3_model --tokens 1,16 --budget-s 50 --routed-combine reduce --out "$OUT/moe_layer_s16b_reduce.json"
    pack
    ;;
  s17a)  # stop 17: magic_fold (unscaled A, scale/zero folded in f32) native tests and kernel times against magic_bf16
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=12 step native_fold 200 python3 -m pytest tests/test_quant_matmul_stream_k.py \
      -q -m gpu -rfEs -p no:cacheprovider -n 4
    pack
    for M in 1 16 64; do
      TAIL=6 step time_m$M 100 python3 -m benchmarks.profile_decode --time --m $M \
        --variants sk,sk+unpack=magic_fold,sk,sk+unpack=magic_fold
      pack
    done
    ;;
  s17b)  # magic_fold: fold blocks per accumulator scope (FOLD_SPAN) and the cost of the ones-wgmma (FOLD_SUMS=0 probe)
    F=sk+unpack=magic_fold
    TAIL=9 step time_m1 150 python3 -m benchmarks.profile_decode --time --m 1 \
      --variants sk,$F+FOLD_SPAN=1,$F+FOLD_SPAN=2,$F+FOLD_SPAN=4,$F+FOLD_SPAN=8,$F+FOLD_SPAN=8+FOLD_SUMS=0,$F+FOLD_SPAN=1+FOLD_SUMS=0,sk
    pack
    TAIL=6 step time_m16 100 python3 -m benchmarks.profile_decode --time --m 16 \
      --variants sk,$F+FOLD_SPAN=4,$F+FOLD_SPAN=8,$F+FOLD_SPAN=8+FOLD_SUMS=0
    pack
    ;;
  s17c)  # magic_fold with the group sums from XLA (no ones-wgmma): native tests, span sweep, M = 1 / 16 / 64
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=5 step native_fold 200 python3 -m pytest tests/test_quant_matmul_stream_k.py \
      -q -m gpu -rfEs -p no:cacheprovider -n 4
    pack
    F=sk+unpack=magic_fold
    TAIL=7 step time_m1 150 python3 -m benchmarks.profile_decode --time --m 1 \
      --variants sk,$F,$F+FOLD_SPAN=4,$F+FOLD_SPAN=2,$F+FOLD_SPAN=1,sk,$F
    pack
    TAIL=6 step time_m16 100 python3 -m benchmarks.profile_decode --time --m 16 \
      --variants sk,$F,$F+FOLD_SPAN=2,$F+FOLD_ACC_COLS=128
    pack
    TAIL=4 step time_m64 100 python3 -m benchmarks.profile_decode --time --m 64 --variants sk,$F,$F+FOLD_ACC_COLS=128
    pack
    ;;
  s17d)  # magic_fold defaults: every native kernel test; Mixtral FFN (ragged_dot bf16 in the same run) at 1 / 16 tokens
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=8 step native_tests 230 python3 -m pytest tests/test_routed_ffn.py \
      tests/test_grouped_matmul.py tests/test_quant_matmul_stream_k.py tests/test_quant_matmul.py \
      tests/test_quant_matmul_variants.py -q -m gpu -rfEs -p no:cacheprovider -n 4
    pack
    TAIL=16 step moe_mixtral 230 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls ragged_dot_bf16,q3_model,mixed234_model --tokens 1,16 --budget-s 210 \
      --out "$OUT/moe_layer_s17d_mixtral.json"
    pack
    ;;
  s17e)  # issue 6's table with magic_fold (M <= 16; the s15g plan: Mixtral shape, then the small shapes); fold probes
    TAIL=22 step quant_matmul 110 python3 -m benchmarks.quant_matmul --shapes 4096x14336 --ms 1,4,16,64 \
      --ours-bits 2,3,4 --peers torch_int4_g128 --ranks 0,32 --check --out "$OUT/quant_matmul_s17e.json"
    pack
    TAIL=10 step quant_matmul_small 70 python3 -m benchmarks.quant_matmul --shapes 2048x1408,4096x4096 --ms 1,16 \
      --ours-bits 3,4 --peers torch_int4_g128 --ranks 0 --out "$OUT/quant_matmul_s17e_small.json"
    pack
    for SP in 8 4; do   # the grouped launches with magic_fold (x swizzled 128 B now), fold span 8 / 4
      TAIL=4 step moe_fold_span$SP 45 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown --no-check \
        --impls q3_model --tokens 1 --budget-s 40 --grouped-fold-mb 16 --fold-span $SP \
        --out "$OUT/moe_layer_s17e_fold_span$SP.json"
      pack
    done
    ;;
  fold_verify)  # before flipping the grouped magic_fold defaults (grouped NOTES stop 17): the native tests at span 4,
               # then the Mixtral FFN with relerr checked (uniform and mixed) at 1 / 16 tokens
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=8 step native_fold_span4 240 python3 -m pytest tests/test_magic_fold_native.py \
      -q -m gpu -rfEs -p no:cacheprovider -n 4
    pack
    TAIL=10 step moe_fold_span4 200 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls q3_model,mixed234_model --tokens 1,16 --budget-s 180 --grouped-fold-mb 16 --fold-span 4 \
      --out "$OUT/moe_layer_fold_verify.json"
    pack
    ;;
  s18a)  # stop 18: the span-4 native checks (fold_verify's tests), then the Mixtral FFN table with the grouped fold
          # (span 4) and relerr checked: ragged_dot bf16, uniform 3-bit, mixed 2/3/4 at 1 / 16 / 64 tokens
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=8 step native_fold_span4 200 python3 -m pytest tests/test_magic_fold_native.py \
      -q -m gpu -rfEs -p no:cacheprovider -n 4
    pack
    TAIL=16 step moe_fold_span4 270 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls ragged_dot_bf16,q3_model,mixed234_model --tokens 1,16,64 --budget-s 240 --grouped-fold-mb 16 \
      --fold-span 4 --out "$OUT/moe_layer_s18a_mixtral.json"
    pack
    ;;
  s18b)  # stop 18: which fold configuration misaligns (s18a: the mixed g64/g128/per-channel layer did): each
          # isolating case of tests/test_magic_fold_native.py in its own process; then rank 0 / 32 per-kernel times
    isolated_cases "fold_case"
    pack
    TAIL=12 step qm_rank_breakdown 120 python3 -m benchmarks.quant_matmul --shapes 4096x14336 --ms 1,16 --ours-bits 3 \
      --peers '' --ranks 0,32 --breakdown --no-torch --out "$OUT/quant_matmul_s18b_breakdown.json"
    grep KERNELS "$OUT/qm_rank_breakdown.txt"
    pack
    ;;
  s18c)  # stop 18 defaults (grouped magic_fold up to MB 16, FOLD_SPAN 4; multi-class layers with a g128 class on
          # magic_bf16): every native kernel test, then issue 6's table (one x per rotated weight now) with per-kernel times
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=10 step native_tests 330 python3 -m pytest tests/test_routed_ffn.py \
      tests/test_grouped_matmul.py tests/test_quant_matmul_stream_k.py tests/test_quant_matmul.py \
      tests/test_quant_matmul_variants.py tests/test_magic_fold_native.py -q -m gpu -rfEs -p no:cacheprovider -n 6
    pack
    TAIL=24 step quant_matmul 130 python3 -m benchmarks.quant_matmul --shapes 4096x14336 --ms 1,4,16,64 \
      --ours-bits 2,3,4 --peers torch_int4_g128 --ranks 0,32 --check --breakdown --out "$OUT/quant_matmul_s18c.json"
    pack
    ;;
  s18d)  # stop 18: the Mixtral FFN with the new defaults (no overrides), ragged_dot bf16 in the same run
    TAIL=16 step moe_mixtral 230 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls ragged_dot_bf16,q3_model,mixed234_model --tokens 1,16,64 --budget-s 200 \
      --out "$OUT/moe_layer_s18d_mixtral.json"
    pack
    TAIL=10 step quant_matmul_small 80 python3 -m benchmarks.quant_matmul --shapes 2048x1408,4096x4096 --ms 1,16 \
      --ours-bits 3,4 --peers torch_int4_g128 --ranks 0 --out "$OUT/quant_matmul_s18d_small.json"
    pack
    ;;
  s18e)  # next: x @ u as one XLA reduction (set mgpu_sm90.XU_REDUCE_MAX_ROWS = 16 first; not run, no device time left): native dense-kernel tests, then rank 0 / 32 times
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=6 step native_dense 110 python3 -m pytest tests/test_quant_matmul_stream_k.py \
      tests/test_quant_matmul.py -q -m gpu -rfEs -p no:cacheprovider -n 6
    pack
    TAIL=12 step qm_rank 75 python3 -m benchmarks.quant_matmul --shapes 4096x14336 --ms 1,16 --ours-bits 3 \
      --peers '' --ranks 0,32 --breakdown --no-torch --out "$OUT/quant_matmul_s18e_rank.json"
    grep KERNELS "$OUT/qm_rank.txt"
    pack
    ;;
  s18f)  # next session: the padded x-sum boxes natively (the small-box / several-steps cases and the g128 mixed layers
          # with the fold forced on), each case in its own process; then every native kernel test
    isolated_cases "small_boxes or with_g128"
    pack
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=10 step native_tests 330 python3 -m pytest tests/test_routed_ffn.py \
      tests/test_grouped_matmul.py tests/test_quant_matmul_stream_k.py tests/test_quant_matmul.py \
      tests/test_quant_matmul_variants.py tests/test_magic_fold_native.py -q -m gpu -rfEs -p no:cacheprovider -n 6 \
      -k "not with_g128"
    pack
    ;;
  s20a)  # stop 20: the padded x-sum boxes natively (small boxes / several steps, g128 mixed layers with the fold forced
          # on), each case in its own process; dense tests with x @ u as multiply + reduce (XU_REDUCE_MAX_ROWS 16);
          # rank 0 / 32 times with 16 and with 0 in the same session
    isolated_cases "small_boxes or with_g128"
    pack
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=6 step native_dense 120 python3 -m pytest tests/test_quant_matmul_stream_k.py \
      tests/test_quant_matmul.py -q -m gpu -rfEs -p no:cacheprovider -n 6
    pack
    # (then rank 0 / 32 times with XU_REDUCE_MAX_ROWS 16 and 0 through --set: run once, 2026-12-03; the switch is gone)
    pack
    ;;
  s20b)  # stop 20: v_t / x @ u at Rp 32 for rank <= 32 and one xu for all K splits; mixed layers with a g128 class on
          # magic_fold: every native kernel test, rank 0 / 32 times, then the Mixtral FFN (each rotated layer its own x)
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=10 step native_tests 300 python3 -m pytest tests/test_routed_ffn.py \
      tests/test_grouped_matmul.py tests/test_quant_matmul_stream_k.py tests/test_quant_matmul.py \
      tests/test_quant_matmul_variants.py tests/test_magic_fold_native.py -q -m gpu -rfEs -p no:cacheprovider -n 6
    pack
    TAIL=4 step qm_rank 60 python3 -m benchmarks.quant_matmul --shapes 4096x14336 --ms 1,16 --ours-bits 3 \
      --peers '' --ranks 0,32 --breakdown --no-torch --out "$OUT/quant_matmul_s20b_rank.json"
    grep -E "KERNELS" "$OUT/qm_rank.txt"
    pack
    TAIL=16 step moe_mixtral 200 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls ragged_dot_bf16,q3_model,mixed234_model --tokens 1,16,64 --budget-s 180 \
      --out "$OUT/moe_layer_s20b_mixtral.json"
    pack
    ;;
  # s20c (2026-12-04): a probe of x @ u from the unpadded x (mgpu_sm90.XU_FROM_X, reverted); logs h200_2026-12-04_s20c_*
  s20d)  # rank 0 / 32 times with v^T at Rp 32 (s20b's benchmark weights still had Rp 64: the bench built its own)
    TAIL=4 step qm_rank 60 python3 -m benchmarks.quant_matmul --shapes 4096x14336 --ms 1,16 --ours-bits 3 \
      --peers '' --ranks 0,32 --breakdown --no-torch --out "$OUT/quant_matmul_s20d_rank.json"
    grep -E "KERNELS" "$OUT/qm_rank.txt"
    pack
    ;;
  s21a)  # stop 21: routed_ffn's glue at decode (row gather / unrolled bookkeeping vs the stop-20 scatter and
          # cumsums, the down split-sum before the combine), one x per layer; native routed tests; HLO at 1 token;
          # the transposed-epilogue probe (ROW_GATHER, the old form's switch, is gone since: moe_old no longer runs)
    RF=pallas_kernels.grouped_matmul.routed_ffn
    TAIL=4 step moe_old 170 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown --no-check \
      --impls q3_model,mixed234_model --tokens 1,16,64 --budget-s 150 --set $RF.ROW_GATHER=0 --set $RF.UNROLL_PAIRS=0 \
      --out "$OUT/moe_layer_s21a_old.json"
    grep -E "KERNELS|RESULT" "$OUT/moe_old.txt" | cut -c1-400
    pack
    TAIL=4 step moe_new 200 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls q3_model,mixed234_model --tokens 1,16,64 --budget-s 180 --hlo-dir "$OUT/hlo" \
      --out "$OUT/moe_layer_s21a_new.json"
    grep -E "KERNELS|RESULT" "$OUT/moe_new.txt" | cut -c1-400
    pack
    TAIL=4 step moe_sumfirst 90 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown --no-check \
      --impls q3_model,mixed234_model --tokens 1 --budget-s 80 --set $RF.SUM_SPLITS_FIRST=1 \
      --out "$OUT/moe_layer_s21a_sumfirst.json"
    grep -E "KERNELS|RESULT" "$OUT/moe_sumfirst.txt" | cut -c1-400
    pack
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=6 step native_routed 150 python3 -m pytest tests/test_routed_ffn.py \
      tests/test_grouped_matmul.py -q -m gpu -rfEs -p no:cacheprovider -n 6
    TAIL=12 step probe_T 60 python3 -m benchmarks.transpose_store_probe
    pack
    ;;
  s21b)  # stop 21: row gather + unrolled bookkeeping + one routing vector (defaults now), the mixed re-pad from a
          # materialized h; the Mixtral table with ragged_dot in the same run; down splits floored at 2048 K rows
    RF=pallas_kernels.grouped_matmul.routed_ffn
    TAIL=4 step moe_mixtral 230 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls ragged_dot_bf16,q3_model,mixed234_model --tokens 1,16,64 --budget-s 210 \
      --out "$OUT/moe_layer_s21b_mixtral.json"
    grep -E "KERNELS|RESULT" "$OUT/moe_mixtral.txt" | cut -c1-600
    pack
    TAIL=4 step moe_split2048 100 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown --no-check \
      --impls q3_model,mixed234_model --tokens 1,16 --budget-s 90 \
      --set pallas_kernels.grouped_matmul.mgpu_sm90.MIN_SPLIT_ROWS=2048 --out "$OUT/moe_layer_s21b_split2048.json"
    grep -E "KERNELS|RESULT" "$OUT/moe_split2048.txt" | cut -c1-600
    pack
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=6 step native_routed 150 python3 -m pytest tests/test_routed_ffn.py \
      tests/test_grouped_matmul.py -q -m gpu -rfEs -p no:cacheprovider -n 6
    pack
    TAIL=4 step moe_4096 150 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown --no-check \
      --impls ragged_dot_bf16,q3_model,mixed234_model --tokens 4096 --budget-s 120 --out "$OUT/moe_layer_s21b_4096.json"
    grep -E "RESULT" "$OUT/moe_4096.txt" | cut -c1-400
    pack
    ;;
  s21c)  # stop 21, last minutes: native prefill (the mixed layer's new path) and routed tests, Mixtral at 4096 tokens
          # (uniform vs mixed) and at 1 token with the final defaults
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=6 step native_prefill_routed 110 python3 -m pytest tests/test_routed_ffn.py \
      tests/test_grouped_matmul.py -q -m gpu -rfEs -p no:cacheprovider -n 6 -k "prefill or routed"
    pack
    TAIL=4 step moe_4096 80 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown --no-check \
      --impls q3_model,mixed234_model --tokens 4096 --budget-s 70 --out "$OUT/moe_layer_s21c_4096.json"
    grep -E "RESULT" "$OUT/moe_4096.txt" | cut -c1-300
    pack
    TAIL=4 step moe_1 60 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown --no-check \
      --impls q3_model,mixed234_model --tokens 1 --budget-s 50 --out "$OUT/moe_layer_s21c_1.json"
    grep -E "RESULT" "$OUT/moe_1.txt" | cut -c1-300
    pack
    ;;
  s22a)  # next session: the mixed layer at 4096 tokens with experts sorted by position (milo_jax.models.moe
          # POSITION_SORTED_PREFILL, off until this is timed) against the default, uniform in the same run
    TAIL=4 step moe_4096_pos 200 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls q3_model,mixed234_model --tokens 4096 --budget-s 90 --out "$OUT/moe_layer_s22a_4096.json"
    TAIL=4 step moe_4096_pos1 120 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls mixed234_model --tokens 4096 --budget-s 90 --set milo_jax.models.moe.POSITION_SORTED_PREFILL=1 \
      --out "$OUT/moe_layer_s22a_4096_pos.json"
    grep -E "RESULT" "$OUT"/moe_4096_pos*.txt | cut -c1-300
    pack
    ;;
  s23a)  # where the stream-K magic_fold kernel stalls (ncu SASS-level samples), its ptxas report and PTX; then s22a
    mkdir -p /tmp/dump "$OUT/sk"
    MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_TO=/tmp/dump TAIL=2 step dump 90 python3 -m benchmarks.profile_decode --variants sk
    ptx=$(ls -S /tmp/dump/*.ptx | head -1); echo "ptx: $ptx"; cp "$ptx" "$OUT/sk/kernel.ptx"
    ptxas -arch=sm_90a "$ptx" -o /tmp/k.cubin -v --warn-on-spills > "$OUT/sk/ptxas.txt" 2>&1; tail -5 "$OUT/sk/ptxas.txt"
    cuobjdump --dump-sass /tmp/k.cubin > "$OUT/sk/sass.txt" 2>&1
    TAIL=6 step ncu 240 ncu --clock-control none -k regex:mosaic -c 1 --set full -f -o /tmp/sk \
      python3 -m benchmarks.profile_decode --variants sk
    ncu --import /tmp/sk.ncu-rep --page source --csv --print-source sass > "$OUT/sk/source.csv" 2> "$OUT/sk/source_err.txt"
    ncu --import /tmp/sk.ncu-rep --page details > "$OUT/sk/details.txt" 2>&1
    grep -E "Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Issue Slots|Issued Warp|Eligible|No Eligible|Executed Ipc" "$OUT/sk/details.txt" | head -20
    wc -c "$OUT/sk/source.csv"; head -c 600 "$OUT/sk/source_err.txt"
    (cd "$OUT" && tar -czf sk.tgz sk && rm -r sk)
    TAIL=4 step moe_4096_pos 200 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls q3_model,mixed234_model --tokens 4096 --budget-s 90 --out "$OUT/moe_layer_s23a_4096.json"
    TAIL=4 step moe_4096_pos1 130 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls mixed234_model --tokens 4096 --budget-s 90 --set milo_jax.models.moe.POSITION_SORTED_PREFILL=1 \
      --out "$OUT/moe_layer_s23a_4096_pos.json"
    grep -E "RESULT" "$OUT"/moe_4096_pos*.txt | cut -c1-300
    pack
    ;;
  s23b)  # the mixed prefill path's one dequantize launch (no concatenation): every native kernel test, the Mixtral
          # FFN at 4096 tokens (uniform, mixed, mixed + POSITION_SORTED_PREFILL); stream-K occupancy / depth probes
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=10 step native_tests 250 python3 -m pytest tests/test_routed_ffn.py \
      tests/test_grouped_matmul.py tests/test_quant_matmul_stream_k.py tests/test_quant_matmul.py \
      tests/test_quant_matmul_variants.py tests/test_magic_fold_native.py -q -m gpu -rfEs -p no:cacheprovider -n 6
    pack
    TAIL=3 step moe_4096 110 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls q3_model,mixed234_model --tokens 4096 --budget-s 80 --out "$OUT/moe_layer_s23b_4096.json"
    TAIL=3 step moe_4096_pos 70 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls mixed234_model --tokens 4096 --budget-s 50 --set milo_jax.models.moe.POSITION_SORTED_PREFILL=1 \
      --out "$OUT/moe_layer_s23b_4096_pos.json"
    grep -E "RESULT" "$OUT"/moe_4096*.txt | cut -c1-200
    pack
    TAIL=5 step time_m1 120 python3 -m benchmarks.profile_decode --time --variants sk,sk+ctas=396,sk+stages=3
    pack
    ;;
  s23c)  # the issues' tables on the issue's device (H100) with the final code: quant_matmul (issue 6) and the Mixtral FFN
          # at decode sizes (issue 7), ragged_dot bf16 and torch int4 in the same runs
    TAIL=24 step quant_matmul 150 python3 -m benchmarks.quant_matmul --shapes 4096x14336 --ms 1,4,16,64 \
      --ours-bits 2,3,4 --peers torch_int4_g128 --ranks 0,32 --breakdown --out "$OUT/quant_matmul_s23c.json"
    pack
    TAIL=14 step moe_mixtral 200 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls ragged_dot_bf16,q3_model,mixed234_model --tokens 1,16,64 --budget-s 170 \
      --out "$OUT/moe_layer_s23c_mixtral.json"
    pack
    ;;
  s23d)  # s23b cut to what the budget left allows: the native tests of the dequantize / prefill paths, then the
          # Mixtral FFN at 4096 tokens (uniform and mixed, POSITION_SORTED_PREFILL off and on)
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=8 step native_tests 150 python3 -m pytest tests/test_routed_ffn.py \
      tests/test_grouped_matmul.py tests/test_quant_matmul.py -q -m gpu -rfEs -p no:cacheprovider -n 6 \
      -k "prefill or dequant"
    pack
    TAIL=3 step moe_4096 90 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls q3_model,mixed234_model --tokens 4096 --budget-s 60 --out "$OUT/moe_layer_s23d_4096.json"
    pack
    TAIL=3 step moe_4096_pos 55 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls mixed234_model --tokens 4096 --budget-s 45 --set milo_jax.models.moe.POSITION_SORTED_PREFILL=1 \
      --out "$OUT/moe_layer_s23d_4096_pos.json"
    pack
    tar -xOf "$OUT/results.tar" moe_4096.txt moe_4096_pos.txt 2>/dev/null | grep -E "RESULT" | cut -c1-200
    ;;
  s23e)  # the last minutes of stop 23: the native mixed prefill test, then the 4096-token FFN (uniform, mixed)
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=4 step native_mixed 70 python3 -m pytest tests/test_grouped_matmul.py \
      -q -m gpu -rfEs -p no:cacheprovider -k "native_prefill_path and mixed"
    TAIL=3 step moe_4096 75 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls q3_model,mixed234_model --tokens 4096 --budget-s 50 --out "$OUT/moe_layer_s23e_4096.json"
    ;;
  s25a)  # stop 25: the stream-K pre-pass natively (its tests, stream-K's native tests), rank 0 / 32 with the pre-pass
          # and without it (same session), the Mixtral FFN at 1 token beside ragged_dot bf16 and at 4096 tokens
          # (uniform vs mixed), then the native prefill / dequantize tests
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=10 step native_prepass 130 python3 -m pytest \
      tests/test_quant_matmul_prepass.py tests/test_quant_matmul_stream_k.py -q -m gpu -rfEs -p no:cacheprovider -n 6
    pack
    TAIL=6 step qm_rank 70 python3 -m benchmarks.quant_matmul --shapes 4096x14336 --ms 1,16 --ours-bits 3 \
      --peers '' --ranks 0,32 --breakdown --no-torch --out "$OUT/quant_matmul_s25a_rank.json"
    grep -E "KERNELS" "$OUT/qm_rank.txt"
    TAIL=6 step qm_rank_xla 60 python3 -m benchmarks.quant_matmul --shapes 4096x14336 --ms 1,16 --ours-bits 3 \
      --peers '' --ranks 0,32 --breakdown --no-torch --set pallas_kernels.quant_matmul.stream_k_sm90.PREPASS=0 \
      --out "$OUT/quant_matmul_s25a_rank_xla.json"
    grep -E "KERNELS" "$OUT/qm_rank_xla.txt"
    TAIL=4 step qm_rank0_pp 50 python3 -m benchmarks.quant_matmul --shapes 4096x14336 --ms 1,16 --ours-bits 3 \
      --peers '' --ranks 0 --breakdown --no-torch --set pallas_kernels.quant_matmul.stream_k_sm90.PREPASS_RANK0=1 \
      --out "$OUT/quant_matmul_s25a_rank0_pp.json"
    grep -E "KERNELS" "$OUT/qm_rank0_pp.txt"
    pack
    TAIL=6 step moe_1 100 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls q3_model,mixed234_model,ragged_dot_bf16 --tokens 1 --budget-s 80 --out "$OUT/moe_layer_s25a_1.json"
    pack
    TAIL=3 step moe_4096 75 python3 -m benchmarks.moe_layer --models mixtral-8x7b --breakdown \
      --impls q3_model,mixed234_model --tokens 4096 --budget-s 50 --out "$OUT/moe_layer_s25a_4096.json"
    pack
    tar -xOf "$OUT/results.tar" moe_4096.txt moe_1.txt 2>/dev/null | grep -E "RESULT" | cut -c1-200
    ;;
  s25e)  # the last minutes: pre-pass native tests, rank 0 / 32 (3-bit), the CTA / stage probes
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=6 step native_prepass 80 python3 -m pytest \
      tests/test_quant_matmul_prepass.py -q -m gpu -rfEs -p no:cacheprovider -n 6
    pack
    TAIL=8 step qm 50 python3 -m benchmarks.quant_matmul --shapes 4096x14336 --ms 1,16 --ours-bits 3 \
      --peers '' --ranks 0,32 --breakdown --no-torch --out "$OUT/quant_matmul_s25e.json"
    grep -E "KERNELS" "$OUT/qm.txt"
    pack
    TAIL=5 step time_m1 100 python3 -m benchmarks.profile_decode --time --variants sk,sk+ctas=396,sk+stages=3,sk+ctas=396+stages=3
    pack
    ;;
  s30a)  # next stop: the warp-specialized stream-K decode kernel (stream_k_sm90.WARP_SPECIALIZED, prepared in stop 29, never
          # run natively): its native tests, then 4096 x 14336 3-bit at M = 1 / 4 / 16 against the default, same call
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=6 step native_ws 150 python3 -m pytest tests/test_quant_matmul_stream_k.py \
      -q -m gpu -k warp_specialized -rfEs -p no:cacheprovider -n 3
    ws_rc=$?
    pack
    SK=pallas_kernels.quant_matmul.stream_k_sm90
    variants=("0" "1" "1 --set $SK.WS_STAGES=6" "1 --set $SK.WS_CTAS_PER_SM=2" "1 --set $SK.WS_STAGES=2 --set $SK.WS_CTAS_PER_SM=2")
    [ $ws_rc = 124 ] && variants=("0")   # a hang: time the default only
    for v in "${variants[@]}"; do
      name=$(echo "$v" | tr -c 'A-Za-z0-9' _)
      TAIL=10 step qm_ws_$name 80 python3 -m benchmarks.quant_matmul --shapes 4096x14336 --ms 1,4,16 --ours-bits 3 \
        --peers '' --ranks 0 --breakdown --no-torch --set $SK.WARP_SPECIALIZED=$v --out "$OUT/quant_matmul_s30a_ws_$name.json"
      pack
    done
    ;;
  *) echo "usage: $0 kernels|bench|native|qm_rest|moe [MODEL]"; exit 2 ;;
esac
