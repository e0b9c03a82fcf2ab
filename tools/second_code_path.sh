#!/usr/bin/env bash
# Run a command under a second CPU code path, so that numbers which hold only on one processor's kernels show up
# on this one: one ATen vector width below the processor's own (AVX-512 -> AVX2, otherwise the scalar `default`),
# MKL's conditional-reproducibility kernels, and oneDNN held below AVX2.
# On an AVX2-only AMD EPYC each of ATEN_CPU_CAPABILITY=default (elementwise ops, reductions, softmax, norms),
# MKL_CBWR=COMPATIBLE (matmuls) and ONEDNN_MAX_CPU_ISA=SSE41 (convolutions) changes results; MKL_ENABLE_INSTRUCTIONS
# does not (MKL takes its own path on AMD processors).
# Usage: tools/second_code_path.sh PYTHON COMMAND [ARGS...]  (PYTHON: the interpreter whose torch is asked for its
# capability), e.g. tools/second_code_path.sh .venv/bin/python .venv/bin/python -m pytest -m numerics
set -euo pipefail
python=${1:?usage: tools/second_code_path.sh PYTHON COMMAND [ARGS...]}
shift
capability=$("$python" -c "import torch; print(torch.backends.cpu.get_cpu_capability())")
case "$capability" in
    AVX512*) aten=avx2; onednn=AVX2 ;;
    *) aten=default; onednn=SSE41 ;;
esac
echo "second CPU code path: ATEN_CPU_CAPABILITY=$aten MKL_CBWR=COMPATIBLE ONEDNN_MAX_CPU_ISA=$onednn (this processor: $capability)" >&2
ATEN_CPU_CAPABILITY=$aten MKL_CBWR=COMPATIBLE ONEDNN_MAX_CPU_ISA=$onednn exec "$@"
