#!/usr/bin/env bash
# GPU checks in one go (for a machine with an NVIDIA GPU and CuPy): the GPU tests with their
# parity figures, then the speed ratio against the CPU path at two model shapes. Run from the
# repository root with zipmoe_rt and format/ on PYTHONPATH (or the package installed with the
# test and cuda extras).
set -u
export PYTHONUNBUFFERED=1
export USE_HUB_KERNELS=NO     # the parity reference is transformers' eager modules, no Hub kernels
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import cupy; print('cupy', cupy.__version__)"
python3 -m pytest -q -p no:cacheprovider -rs -s tests/test_gpu.py tests/test_gpu_planes.py \
    tests/test_gpu_packed.py tests/test_gpu_huffman.py tests/test_gpu_offload.py 2>&1 \
    | grep -v -e "^$" -e "Writing model shards" -e "Loading weights"
rc=${PIPESTATUS[0]}
python3 tools/gpu_bench.py                                   # Mixtral-8x7B layer shape, 2 layers
python3 tools/gpu_bench.py --layers 4 --hidden 1024 --inter 2048 --prompt 128 --tokens 32
# codec, compressed residency and transformers (pools.npz: tools/gpu_bench_codec.py --save-pools)
if [ -f pools.npz ]; then python3 tools/gpu_bench_codec.py --pools pools.npz; fi
exit $rc
