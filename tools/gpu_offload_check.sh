#!/usr/bin/env bash
# The budgeted GPU path in one go (a machine with an NVIDIA GPU, CuPy, torch, transformers and
# accelerate): its GPU tests for every tiny spec, then the offloading benchmark of
# docs/benchmarks.md §12. Run from the repository root with zipmoe_rt and format/ on
# PYTHONPATH; POOLS (default pools.npz) comes from `python tools/gpu_offload_bench.py pools
# pools.npz` on a machine with the SmolLM2 GGUF. JSON=FILE keeps the benchmark's results.
set -u
export PYTHONUNBUFFERED=1
export USE_HUB_KERNELS=NO     # the parity reference is transformers' eager modules
POOLS=${POOLS:-pools.npz}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -m pytest -q -p no:cacheprovider -rs -s tests/test_gpu.py tests/test_gpu_offload.py \
    -k "reloads_through or cuda_segment" 2>&1 \
    | grep -v -e "^$" -e "Writing model shards" -e "Loading weights"
rc=${PIPESTATUS[0]}
python3 tools/gpu_offload_bench.py run "$POOLS" --work "${WORK:-/tmp/zipmoe-offload-bench}" \
    --layers 2 --tokens 256 --hf-tokens 3 --routing both ${JSON:+--json "$JSON"} 2>&1 \
    | grep -v "Loading weights"
exit $rc
