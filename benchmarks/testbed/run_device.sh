#!/bin/bash
# The one GPU run that trains the shipped testbed (run from the repository root; writes to $OUT):
#   bash benchmarks/testbed/run_device.sh [extra train.py arguments]
# Needs .carry/corpus (prepare_corpus.py) and, as a fallback, .carry/testbed_whl/flax-0.12.8 wheel:
# a tiny smoke run first checks that the machine's own flax runs milo_jax.models; if not, the
# carried flax (the version milo-jax is tested with) is installed to /tmp/site and used.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-.carry/testbed_run}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
if ! timeout 120 python3 benchmarks/testbed/train.py --size tiny --steps 2 --batch 2 --seq 64 \
    --eval-every 2 --log-every 1 --warmup 1 --valid-windows 2 --eval-batch 2 --no-report \
    --out /tmp/smoke > /tmp/smoke.log 2>&1; then
  tail -20 /tmp/smoke.log
  echo "the machine's flax failed the smoke run; using the carried flax 0.12.8"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .carry/testbed_whl/*.whl && export PYTHONPATH=/tmp/site
  python3 -c "import flax; print('flax', flax.__version__)"
else
  echo "smoke run passed with the machine's flax"
fi
python3 benchmarks/testbed/train.py --out "$OUT" "$@"
