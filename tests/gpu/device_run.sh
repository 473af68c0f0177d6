#!/usr/bin/env bash
# One call on a GPU node. With no argument it runs exactly the README's test command, `make test`
# (the node's Python and packages through .venv-node, the node's own MPI: NODE=1 is auto-detected),
# and writes its log and a one-line verdict under $OUT. The other phases run `python3` from
# .venv-node too (made by the `test` or `build` phase). Phases, each under `timeout`:
#   bash tests/gpu/device_run.sh [test] [build] [gputest] [p2p] [eager] [sanitize] [copy] [collective]
#                                [graph] [graphnccl] [calibrate] [overlap] [overlapbench] [sanitize2]
#                                [p2pparts] [p2player] [pack] [loopback] [fp8]
# Nothing is exported for the tests: every setting Open MPI needs (running as root, oversubscription)
# comes from dpgather's own launcher settings, as it would for a user.
set -u
OUT=${OUT:-/tmp/dpg-out}; mkdir -p "$OUT"
NODE_PATH=$PATH  # make runs with the node's own PATH: its python3 builds .venv-node over the node's packages
export PATH="$PWD/.venv-node/bin:$PATH"  # the other phases' python3: the venv `make` installs dpgather into
NG=$(nvidia-smi -L | wc -l)
phases=${*:-test}
summary=$OUT/summary.txt
note() { echo "$*" | tee -a "$summary"; }
run() {  # run NAME TIMEOUT CMD...
  local name=$1 t=$2; shift 2
  local t0=$(date +%s)
  timeout -k 10 "$t" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  note "[$name] rc=$rc $(( $(date +%s) - t0 ))s :: $(tail -n 1 "$OUT/$name.log" | cut -c1-200)"
}
note "# $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | tr -s ' ') GPUs=$NG $(git rev-parse --short HEAD 2>/dev/null) $(mpirun --version 2>/dev/null | head -1)"
for p in $phases; do case $p in
build)
  run build 300 env PATH="$NODE_PATH" make build ;;
p2p)
  run p2p_selftest ${T_P2P:-300} python3 -m dpgather.tools.launch -n "$NG" --timeout 280 tests/gpu/p2p_selftest.py --out "$OUT/p2p.json" ;;
loopback)  # both P2P kernels on one GPU (virtual ranks): the push matrix and push vs pull timing
  run loopback ${T_LOOP:-400} python3 tests/gpu/loopback.py --out "$OUT/loopback.json"
  tail -n 14 "$OUT/loopback.log" | tee -a "$summary" ;;
fp8)  # the quantized gather on one GPU: the kernel bit for bit, the data plane, quantize vs copy timing
  run fp8_check ${T_FP8:-300} python3 tests/gpu/fp8_check.py --out "$OUT/fp8.json"
  tail -n 8 "$OUT/fp8_check.log" | tee -a "$summary" ;;
p2pvariants)  # the kernel's tuning switches (kernels/pull.cu), timed by the self-test
  for v in "" "DPG_P2P_FLAG_FENCE=0" "DPG_P2P_RELAXED_POLL=1" "DPG_P2P_FLAG_FENCE=0,DPG_P2P_RELAXED_POLL=1,DPG_P2P_SLEEP_AFTER=100000"; do
    tag=$(echo "${v:-default}" | tr '=,' '__')
    DPGATHER_P2P_DEFINES="$v" run "p2p_variant_$tag" ${T_P2P:-300} python3 -m dpgather.tools.launch -n "$NG" --timeout 280 tests/gpu/p2p_selftest.py --out "$OUT/p2p_$tag.json"
    grep -A4 "rows/rank" "$OUT/p2p_variant_$tag.log" | sed "s/^/[${v:-default}] /" | tee -a "$summary"
  done ;;
p2pparts)  # where a pull's time goes: its parts at small sizes, and the raw link ceilings (push vs pull)
  run p2p_parts ${T_P2P:-240} python3 -m dpgather.tools.launch -n "$NG" --timeout 230 tests/gpu/p2p_selftest.py \
      --skip matrix,graph,timeout --rows 1,4,16,64,256,1024 --breakdown --link 1,16,64,1024,8192 --out "$OUT/p2p_parts.json" ;;
p2player)  # P2P and VARLEN gather / combine on balanced, one-sided and uneven layouts (the cost model's data)
  run p2p_layouts ${T_COLL:-300} python3 -m dpgather.tools.launch -n "$NG" --timeout 290 bench/collective_bench.py \
      --patterns "" --attn-tp2 "" --no-torch --variants varlen,p2p --json "$OUT/p2p_layouts.json" \
      --counts "${P2P_LAYOUTS:-1/1;16/16;64/64;256/256;1024/1024;4096/4096;8192/8192;1/0;16/0;64/0;256/0;1024/0;4096/0;8192/0;256/128;1024/256;4096/1024;4096/2048;8192/1;8192/4096;1441/1718;2048/64}" ;;
eager)
  run eager_bench ${T_EAGER:-240} python3 -m dpgather.tools.launch -n "$NG" --timeout 230 bench/eager_bench.py --strict --json "$OUT/eager.json" ;;
test)
  run make_test ${T_TEST:-590} env PATH="$NODE_PATH" make test
  for f in build/test-logs/*.log; do [ -f "$f" ] && cp "$f" "$OUT/test-$(basename "$f")"; done ;;
diag)  # the suite split for diagnosis: the CPU part verbose in the background, each GPU test alone
  ( timeout -k 5 ${T_CPU:-450} python3 -m pytest -v -rfE --tb=short --durations=40 -p no:cacheprovider \
      --ignore=tests/test_gpu.py tests > "$OUT/cpu_suite.log" 2>&1; echo "rc=$?" >> "$OUT/cpu_suite.log" ) &
  for t in $(python3 -m pytest --collect-only -q -p no:cacheprovider tests/test_gpu.py | grep '::'); do
    t0=$(date +%s)
    timeout -k 5 ${T_ONE:-110} python3 -m pytest -q -rfE --tb=short -p no:cacheprovider "$t" > "$OUT/one.log" 2>&1; rc=$?
    { echo "=== $t rc=$rc $(( $(date +%s) - t0 ))s"; tail -n 40 "$OUT/one.log"; } >> "$OUT/gpu_each.log"
    note "[gpu] rc=$rc $(( $(date +%s) - t0 ))s $t"
  done
  rm -f "$OUT/one.log"; wait
  note "[cpu_suite] $(tail -n 2 "$OUT/cpu_suite.log" | tr '\n' ' ')" ;;
gputest)
  run gputest ${T_GPUTEST:-400} python3 -m pytest -q -rs tests/test_gpu.py ;;
sanitize)
  run sanitizer ${T_SAN:-300} compute-sanitizer --tool memcheck --error-exitcode 9 python3 tests/gpu/sanitize_replay.py ;;
sanitize2)  # the overlapped two-batch layer (async calls, P2P and NCCL, copy kernels) at every GPU, under each tool
  for tool in memcheck racecheck synccheck; do
    PYTHONPATH=tests OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 \
      run "sanitizer_$tool" ${T_SAN2:-150} mpirun --bind-to none -n "$NG" \
      compute-sanitizer --tool "$tool" --error-exitcode 9 --print-limit 20 \
      python3 examples/two_batch_overlap.py --backend cuda --steps 2
    grep -ho "ERROR SUMMARY.*\|RACECHECK SUMMARY.*\|bit for bit: [a-z]*\|Error: .*" "$OUT/sanitizer_$tool.log" | sort | uniq -c | head -8 | sed "s/^/[$tool] /" | tee -a "$summary"
  done ;;
copy)
  run copy_bench ${T_COPY:-120} python3 bench/copy_bench.py ;;
collective)
  run collective_bench ${T_COLL:-300} python3 -m dpgather bench --np "$NG" ;;
graph)
  run graph_bench ${T_GRAPH:-300} python3 -m dpgather.tools.launch -n "$NG" bench/graph_bench.py --json "$OUT/graph.json" ;;
graphnccl)
  run graph_bench_nccl ${T_GRAPH:-300} python3 -m dpgather.tools.launch -n "$NG" bench/graph_bench.py --transport nccl --json "$OUT/graph_nccl.json" ;;
overlap)
  run overlap_tests ${T_OVL:-300} python3 -m pytest -q -rs tests/test_gpu.py -k overlap ;;
overlapbench)
  run overlap_bench ${T_OVLB:-300} python3 -m dpgather.tools.launch -n "$NG" --timeout 280 bench/overlap_bench.py --json "$OUT/overlap.json" ${OVLB_ARGS:-} ;;
calibrate)
  run calibrate ${T_CAL:-120} python3 -m dpgather.tools.launch -n "$NG" -m dpgather.tools.calibrate --out "$OUT/cost.json" ;;
pack)  # one archive of every log and JSON (the device tool returns a few files per call)
  (cd "$OUT" && tar czf logs.tgz --exclude=logs.tgz --exclude=summary.txt * && find . -maxdepth 1 -type f ! -name logs.tgz ! -name summary.txt -delete) ;;
*) note "unknown phase $p" ;;
esac; done
cat "$summary"
