#!/usr/bin/env bash
# Runs `cargo xtask demo -- --json` N times (default 5) with the given extra demo arguments and
# prints the median and the worst of each figure, for docs/benchmarks.md.
#   tools/demo-figures.sh 5 --clients 8
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
shift || true
out=$(mktemp)
for i in $(seq 1 "$runs"); do
  cargo xtask demo -- --json "$@" >>"$out"
  printf 'run %s/%s done\n' "$i" "$runs" >&2
done
python3 - "$out" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
def column(path):
    values = []
    for run in runs:
        value = run
        for key in path.split('.'):
            value = value[key]
        values.append(value)
    return values
rows = [
    ("client-observed write pause (ms)", "cutover.write_pause_ms", max),
    ("longest transaction during the fence (ms)", "cutover.longest_transaction_in_cutover_ms", max),
    ("pgshift-measured pause (ms)", "cutover.server_pause_ms", max),
    ("longest interval without a commit (ms)", "workload.longest_commit_gap_ms", max),
    ("committed transactions", "workload.committed", min),
    ("failed transactions", "workload.failed", max),
    ("in-doubt transactions", "workload.in_doubt", max),
    ("lost transactions", "workload.lost", max),
    ("throughput (TPS)", "workload.tps", min),
    ("p99 latency (ms)", "workload.p99_latency_ms", max),
    ("max latency (ms)", "workload.max_latency_ms", max),
    ("mismatched tables", "verification.mismatched", max),
]
first = runs[0]
print(f"{len(runs)} runs, PostgreSQL {first['source_version']} -> {first['target_version']}, "
      f"{first['mode']} mode, {first['workload']['clients']} clients")
print()
print("| figure | median | worst |")
print("|---|---|---|")
for name, path, worst in rows:
    values = column(path)
    median = statistics.median(values)
    fmt = (lambda v: f"{v:.1f}") if isinstance(values[0], float) else str
    print(f"| {name} | {fmt(median)} | {fmt(worst(values))} |")
PY
rm -f "$out"
