#!/usr/bin/env bash
# The long version of walq's reliability checks, for hours instead of CI's
# minutes: every fuzz target, the simulated crash tests (power cuts and
# process crashes on SimDisk) under fresh seeds, and real kill -9 cycles.
# Prints the totals at the end (and a line per round as it goes).
#
#   scripts/soak.sh                 # 4 hours
#   WALQ_SOAK_SECONDS=3600 scripts/soak.sh
#
# The budget is split: 40% fuzzing (equal shares per target), 40% simulated
# crashes, 20% kill -9. At this project's rates an hour reaches about 10
# million simulated crash runs and 100,000 kill cycles. A failure stops the
# soak with the failing command's output and its seed (WALQ_SEED replays it).
set -euo pipefail
cd "$(dirname "$0")/.."
total=${WALQ_SOAK_SECONDS:-14400}
fuzz_budget=$((total * 40 / 100))
crash_budget=$((total * 40 / 100))
kill_budget=$((total - fuzz_budget - crash_budget))
log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT
export CARGO_TERM_COLOR=never
started=$SECONDS
echo "soak: ${total}s (fuzz ${fuzz_budget}s, simulated crashes ${crash_budget}s, kill -9 ${kill_budget}s); logs in $log"

# --- fuzzing -----------------------------------------------------------------
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
targets=$(cd fuzz && cargo fuzz list)
per_target=$((fuzz_budget / $(echo "$targets" | wc -w)))
declare -A fuzz_runs
for t in $targets; do
  scratch=$(mktemp -d)
  if ! (cd fuzz && cargo fuzz run -s none "$t" "$scratch" "corpus/$t" -- -max_total_time="$per_target" -print_final_stats=1) >"$log/fuzz-$t.txt" 2>&1; then
    tail -40 "$log/fuzz-$t.txt"
    echo "soak: fuzz target $t FAILED; the input is in fuzz/artifacts/$t/"
    exit 1
  fi
  rm -rf "$scratch"
  fuzz_runs[$t]=$(grep -o 'Done [0-9]* runs' "$log/fuzz-$t.txt" | tail -1 | awk '{print $2}')
  echo "soak: fuzz $t: ${fuzz_runs[$t]} executions in ${per_target}s"
done

# --- simulated crashes -------------------------------------------------------
cargo test --release --all-features --test durability --test consumer_model --test faults --no-run >/dev/null 2>&1
crash_runs=0
fault_runs=0
round=0
deadline=$((SECONDS + crash_budget))
while [ $SECONDS -lt $deadline ]; do
  round=$((round + 1))
  seed=$((RANDOM * 32768 + RANDOM + round))
  out="$log/crash-$round.txt"
  if ! WALQ_SEED=$seed WALQ_ITERS=20000 cargo test --release --all-features --test durability -- --nocapture random_workloads >"$out" 2>&1 ||
     ! WALQ_SEED=$seed WALQ_ITERS=10000 cargo test --release --all-features --test consumer_model -- --nocapture >>"$out" 2>&1 ||
     ! WALQ_SEED=$seed WALQ_ITERS=200 cargo test --release --all-features --test faults -- --nocapture >>"$out" 2>&1; then
    tail -60 "$out"
    echo "soak: simulated crash round $round FAILED (WALQ_SEED=$seed)"
    exit 1
  fi
  cuts=$(grep -o '[0-9]* power cuts' "$out" | awk '{s+=$1} END {print s+0}')
  restarts=$(grep -o '[0-9]* restarts' "$out" | awk '{s+=$1} END {print s+0}')
  faults=$(grep -o 'fault matrix: [0-9]* runs' "$out" | awk '{s+=$3} END {print s+0}')
  crash_runs=$((crash_runs + cuts + restarts))
  fault_runs=$((fault_runs + faults))
  echo "soak: crash round $round (seed $seed): $cuts power cuts, $restarts model restarts, $faults fault runs; total $crash_runs"
done

# --- kill -9 -----------------------------------------------------------------
kill_cycles=0
round=0
deadline=$((SECONDS + kill_budget))
while [ $SECONDS -lt $deadline ]; do
  round=$((round + 1))
  seed=$((RANDOM * 32768 + RANDOM + round))
  out="$log/kill-$round.txt"
  if ! WALQ_SEED=$seed WALQ_KILL9_CYCLES=5000 cargo test --release --all-features --test kill9 --test kill9_group -- --nocapture >"$out" 2>&1; then
    tail -60 "$out"
    echo "soak: kill -9 round $round FAILED (WALQ_SEED=$seed)"
    exit 1
  fi
  n=$(grep -o '^[0-9]* kill -9 cycles' "$out" | awk '{s+=$1} END {print s+0}')
  kill_cycles=$((kill_cycles + n))
  echo "soak: kill round $round (seed $seed): $n cycles; total $kill_cycles"
done

echo
echo "== soak totals ($((SECONDS - started)) s on $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ))"
for t in $targets; do
  echo "fuzz executions, $t: ${fuzz_runs[$t]}"
done
echo "simulated crash runs (power cuts and model restarts): $crash_runs"
echo "fault-injection runs: $fault_runs"
echo "kill -9 cycles: $kill_cycles"
