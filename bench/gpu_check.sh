#!/usr/bin/env bash
# The engine's CUDA path on a lent GPU machine, in one call (about 5 minutes on an H100):
# greedy and speculative outputs against the CPU references, then `slos-serve profile` of a
# random-weight Llama-2-7B (the shape of the shipped GPU profiles) and its tokens/s.
# Packages the machine lacks come as wheels in .whl (see docs/benchmarks.md); results go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/site
fi
export PYTHONUNBUFFERED=1
CLI="python3 -m slos_serve.cli"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

time timeout 120 python3 -m pytest -q -n 4 -p no:cacheprovider -k cuda -o addopts="" \
  tests/engine/test_model_vs_transformers.py tests/engine/test_speculative.py 2>&1 | tail -15

model=/tmp/llama-2-7b-random
time timeout 120 $CLI model random --out $model --like shared/profiles/h100-sxm_llama-2-7b.json --device cuda || exit 1
time timeout 180 $CLI profile --model $model --device cuda --dtype bfloat16 --kv-cache-mb 52000 \
  --out "$OUT/h100_llama-2-7b_slos-serve.json" --samples "$OUT/h100_llama-2-7b_samples.csv" \
  --plot "$OUT/h100_llama-2-7b_profile.png"
time timeout 120 $CLI bench engine --model $model --no-vllm --dtypes bfloat16 --batch-sizes 1,8,32,64 \
  --prompt-len 512 --decode-steps 32 --device cuda
