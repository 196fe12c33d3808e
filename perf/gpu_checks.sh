#!/usr/bin/env bash
# What only a CUDA machine shows, in one go:
#   tests    the CUDA tests: every Triton kernel compiled and run on the GPU against its torch
#            reference (tests/kernels/test_kernel_cuda.py); CUDA tensors through the backend
#            on the staged and the CUDA-aware path (tests/backend/test_backend_cuda.py; the
#            CUDA-aware case skips where the MPI library is not CUDA-aware); the compressed
#            allreduces on CUDA tensors (tests/collectives/test_coll_cuda.py); ACCO, ZeRO-1
#            and DPU on CUDA parameters, ACCO on its own stream
#            (tests/methods/test_method_acco_equivalence.py, its _cuda test);
#   kernels  the kernel benchmark's GPU table (n = 1M, 16M, 100M): kernels-<gpu>.json / .md;
#   backend  the backend against raw mpi4py on CUDA tensors, 2 ranks: backend-cuda.md.
# Each step has a time limit, so a hang costs only its own step; each step's output goes to
# OUTDIR/<step>.log and its last lines to the terminal. Exit status 1 if any step failed.
#
#   bash perf/gpu_checks.sh OUTDIR        # the interpreter: $PYTHON, default python3
set -u
out=${1:?usage: bash perf/gpu_checks.sh OUTDIR}
py=${PYTHON:-python3}
mkdir -p "$out"
# Compile the Triton kernels for the GPU (the test suite's default is the interpreter).
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
status=0

step() {  # NAME SECONDS COMMAND...
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    timeout -k 10 "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s (limit $limit s)"
    tail -n 30 "$out/$name.log"
    [ "$rc" -eq 0 ] || status=1
}

step machine 60 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total \
    --format=csv,noheader && echo \"\$(nproc) CPU cores\" && $py -c '
import mpi4py, torch, triton
from commrt.transports import cuda_aware, library_version
print(\"torch\", torch.__version__, \"triton\", triton.__version__, \"mpi4py\", mpi4py.__version__)
print(library_version())
print(\"CUDA-aware MPI:\", cuda_aware())'"
step tests 420 "$py" -m pytest -q -p no:cacheprovider -rs \
    tests/kernels/test_kernel_cuda.py tests/backend/test_backend_cuda.py \
    tests/collectives/test_coll_cuda.py \
    tests/methods/test_method_acco_equivalence.py::test_acco_zero1_dpu_match_references_cuda
step kernels 150 "$py" -m perf.bench.kernels --device cuda --out "$out"
step backend 70 "$py" -m perf.bench.backend --device cuda --ranks 2 --rounds 7 \
    --out "$out/backend-cuda.md"
exit $status
