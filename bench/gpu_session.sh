#!/usr/bin/env bash
# One GPU session's proofs and benchmark, run in the background so that they outlast one command of
# the GPU machine (each is limited to 10 minutes; a process in its own session keeps running).
#
#   source bench/gpu_setup.sh && bash bench/gpu_session.sh start [tp]   # returns at once
#   bash bench/gpu_session.sh wait SECONDS                              # waits, packs results into $OUT
#
# Single GPU ("start"): serve proof of every mix (4 servers side by side; entry points for one mix)
# next to the reload proof, then the stock-vs-mixed benchmark alone on the GPU (timings).
# Two GPUs ("start tp"): serve proof of two mixes with --tp-size 2 and with --dp-size 2.
set -u
R=/tmp/gpu_session
case "${1:-}" in
  start)
    mkdir -p "$R"
    setsid nohup bash "$0" run "${2:-single}" >"$R/session.log" 2>&1 </dev/null &
    echo "started in the background; logs under $R" ;;
  run)
    step() {  # name, command...: one step's log, exit status and timing
      local name=$1; shift
      echo "[$(date +%T)] $name: start"
      "$@" >"$R/$name.log" 2>&1; local rc=$?
      echo "$rc" >"$R/$name.rc"; echo "[$(date +%T)] $name: rc $rc"
    }
    if [ "$2" = tp ]; then
      step serve_tp2 python bench/gpu_serve_proof.py --out "$R/serve_tp2" --workdir /tmp/sp --tp-size 2 --parallel 2 \
        --only qwen3/attn-fp8+experts-int4,qwen3_moe/attn-fp8+experts-int4,qwen3_moe/all-bf16
      step serve_dp2 python bench/gpu_serve_proof.py --out "$R/serve_dp2" --workdir /tmp/sp --dp-size 2 \
        --only qwen3_moe/attn-fp8+experts-int4
    else
      step serve python bench/gpu_serve_proof.py --out "$R/serve" --workdir /tmp/sp --parallel 4 \
        --entrypoints attn-fp8+experts-int4 &
      step reload python bench/gpu_reload_proof.py --out "$R/reload" --workdir /tmp/rp &
      wait
      step bench python bench/gpu_bench_mix.py --out "$R/bench" --workdir /tmp/bmw --only all
    fi
    touch "$R/done" ;;
  wait)
    end=$(( $(date +%s) + ${2:-560} ))
    while [ ! -f "$R/done" ] && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
    [ -f "$R/done" ] && echo "session finished" || echo "session still running"
    cat "$R/session.log"
    # Results and logs in one archive ($OUT returns at most 8 files); summaries printed last.
    tar -czf "$OUT/gpu_session.tgz" -C "$R" --exclude='work' --exclude='plans' . 2>/dev/null
    for f in "$R"/*.log; do echo "== $f"; grep -E "SUMMARY|FAIL|Error|error" "$f" | tail -5; done ;;
  *) echo "usage: $0 start [tp] | wait SECONDS" >&2; exit 2 ;;
esac
