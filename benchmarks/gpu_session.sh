#!/usr/bin/env bash
# One device call for a session that is lent a GPU (at most about 8 minutes): what the machine is, every test that
# needs CUDA (the graphed paths' replays, the fused instance norm, host-sync checks), then the whole GPU suite.
#
#   bash benchmarks/gpu_session.sh        # on the GPU machine, from the repository root; results under $OUT
#
# With the CIFAR-10 JPEG pack in the git-ignored data/ folder (data/cifar10-jpeg.tar.xz, 18 MB, holding
# cifar10-jpeg/{train,test}/<class>/*.jpg; unpacked it is 236 MB, too big to carry) and `data` carried, the suite's
# end-to-end row runs too (loading and ZCA took 33 s on the 2-core CPU). Nothing needs installing: src/ goes on
# PYTHONPATH. Record the table in benchmarks/RESULTS.md.
set -u
OUT=${OUT:-benchmarks/gpu_session_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git rev-parse HEAD 2>/dev/null || true; date -u; } | tee "$OUT/device.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider -rs tests/test_graphed.py tests/test_captured_training.py \
    tests/test_ratbptt_graphed.py tests/test_augment_branch_free.py tests/test_instancenorm.py \
    tests/test_instancenorm_triton.py tests/test_hostsync.py tests/test_models.py tests/test_preprocess.py 2>&1 | tail -60 | tee "$OUT/cuda_tests.txt"
if [ -f data/cifar10-jpeg.tar.xz ] && [ ! -d data/cifar10-jpeg ]; then
    tar -xJf data/cifar10-jpeg.tar.xz -C data || echo "could not unpack data/cifar10-jpeg.tar.xz" >&2
fi
data=()
[ -d data/cifar10-jpeg ] && data=(--data data)
timeout 360 python3 benchmarks/gpu_suite.py --budget 300 --rows-out "$OUT/rows.md" "${data[@]}" 2>&1 \
    | tee "$OUT/suite.txt"
