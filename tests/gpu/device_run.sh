#!/usr/bin/env bash
# One device call: build on the GPU image, then the phases named in $@ (default: all), each under
# `timeout`, logs under $OUT (so a hang still returns them). Usage on the device machine:
#   bash tests/gpu/device_run.sh build selftest facade test bench
set -u
OUT=${OUT:-/tmp/dpg-out}; mkdir -p "$OUT"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
export OMPI_MCA_rmaps_base_oversubscribe=true CUPY_CACHE_DIR=/tmp/cupy-cache
NG=$(nvidia-smi -L | wc -l)
MPI="mpirun --bind-to none -x NCCL_NVLS_ENABLE -x PYTHONUNBUFFERED -x CUPY_CACHE_DIR"
phases=${*:-build selftest facade test bench}
summary=$OUT/summary.txt
note() { echo "$*" | tee -a "$summary"; }
run() {  # run NAME TIMEOUT CMD...
  local name=$1 t=$2; shift 2
  local t0=$(date +%s)
  timeout -k 10 "$t" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  note "[$name] rc=$rc $(( $(date +%s) - t0 ))s :: $(tail -n 1 "$OUT/$name.log" | cut -c1-200)"
}
note "# $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | tr -s ' ') GPUs=$NG"
for p in $phases; do case $p in
build)
  timeout 300 bash -c 'make build VENV=none || (python3 -m pip install --no-build-isolation --no-deps -e . && python3 setup.py -q build_ext --inplace)' > /tmp/build.log 2>&1
  note "[build] rc=$? $(tail -n 1 /tmp/build.log)"
  python3 -c "import dpgather, cupy, cupy.cuda.nccl; print(dpgather.__version__, cupy.__version__, cupy.cuda.nccl.get_version())" >> "$summary" 2>&1 ;;
gputest)
  run gputest ${T_GPUTEST:-400} python3 -m pytest -q -rs tests/test_gpu.py ;;
selftest)
  run cuda_compile 200 python3 -m pytest -q -rs tests/test_cuda_compile.py
  run gpu_selftest 300 python3 tests/gpu/gpu_selftest.py
  run nccl_selftest 400 $MPI -n "$NG" python3 tests/gpu/nccl_selftest.py
  run exit_hazard 120 $MPI -n "$NG" python3 tests/gpu/nccl_selftest.py --exit-hazard ;;
facade)
  for dt in bfloat16 float16 float32; do
    run facade_$dt ${T_FACADE:-400} $MPI -n "$NG" python3 tests/gpu/facade_smoke.py --backend cuda --dtype $dt --graphs --steps ${FACADE_STEPS:-6}
  done ;;
test)
  run make_test 580 make test VENV=none ;;
sanitize)
  run sanitizer ${T_SAN:-300} compute-sanitizer --tool memcheck --error-exitcode 9 python3 tests/gpu/sanitize_replay.py ;;
copy)
  run copy_bench ${T_COPY:-120} python3 bench/copy_bench.py ;;
collective)
  run collective_bench ${T_COLL:-300} $MPI -n "$NG" python3 bench/collective_bench.py ;;
graph)
  run graph_bench ${T_GRAPH:-300} $MPI -n "$NG" python3 bench/graph_bench.py ;;
calibrate)
  run calibrate ${T_CAL:-120} $MPI -n "$NG" python3 -m dpgather.tools.calibrate --out /tmp/cost.json -v ;;
bench)
  run copy_bench 300 python3 bench/copy_bench.py
  run collective_bench 400 $MPI -n "$NG" python3 bench/collective_bench.py
  run graph_bench 400 $MPI -n "$NG" python3 bench/graph_bench.py ;;
*) note "unknown phase $p" ;;
esac; done
cat "$summary"
