#!/usr/bin/env bash
# Fuzzes the data plane of `walq serve` against its own OpenAPI document with
# schemathesis: builds the `walq` binary, starts `walq serve` on a temporary
# directory with ephemeral ports, validates GET /openapi.json against the
# OpenAPI 3.1 schema (openapi-spec-validator), then runs schemathesis on every
# operation but POST /v1/shutdown (it would stop the server), with these checks:
#   not_a_server_error            no 5xx, no dropped connection
#   status_code_conformance       every status is one the document lists
#   content_type_conformance      every Content-Type is one the document lists
#   response_headers_conformance  documented response headers (Retry-After) are present and valid
#   response_schema_conformance   every body matches its documented schema
#   unsupported_method            an undocumented method of a documented path is 405
#   allow_header_conformance      ... with an Allow header naming the documented methods
#   use_after_free                a deleted consumer is gone (404) afterwards
#   ensure_resource_availability  a created queue, consumer or group can be read back
# Not enabled: positive_data_acceptance and negative_data_rejection. The
# server is lenient where the document is strict (the durability grammar
# in any case, `wait_ms` above 2^63 clamped, a bad batch entry answered per
# entry in a 200) and strict where a schema cannot say why (416 for an
# offset past the end, retention_max_bytes below segment_bytes), so both
# would report deliberate behaviour, not bugs.
# Then it stops the server (SIGTERM: it must drain and exit 0) and fails if
# schemathesis failed, if the server answered any 5xx (counted by its own
# /metrics: a 503 here could only be a poisoned queue or a drain, neither of
# which this run causes, so none is legitimate), or if it logged a panic.
# The tools come from PyPI, pinned, into a venv of their own that later runs
# reuse. Bounded for a 2-core machine: WALQ_SCHEMATHESIS_EXAMPLES examples per
# operation and phase (default 300), about 75 s of fuzzing; a hard cap of
# WALQ_SCHEMATHESIS_TIMEOUT seconds (default 600) ends a run that hangs.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${WALQ_SCHEMATHESIS_VENV:-target/schemathesis-venv}
tools="schemathesis==4.32.5 openapi-spec-validator==0.9.0"
examples=${WALQ_SCHEMATHESIS_EXAMPLES:-300}
hard_cap=${WALQ_SCHEMATHESIS_TIMEOUT:-600}
seed=${WALQ_SCHEMATHESIS_SEED:-20261129}
report_dir=$(realpath -m "${WALQ_SCHEMATHESIS_REPORT:-target/schemathesis-report}")

if [ "$(cat "$venv/.tools" 2>/dev/null)" != "$tools" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  # shellcheck disable=SC2086 # one word per requirement
  "$venv/bin/pip" install --quiet --disable-pip-version-check $tools
  echo "$tools" >"$venv/.tools"
fi
bin=$(cd "$venv/bin" && pwd) # absolute, symlinks kept (python is one)
py=$bin/python
schemathesis=$bin/schemathesis

cargo build --release --quiet -p walq-cli --bin walq
walq=${CARGO_TARGET_DIR:-target}/release/walq

work=$(mktemp -d)
server_pid='' watchdog_pid='' fuzzer_pid=''
stop_server() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
      kill -0 "$server_pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$server_pid" 2>/dev/null; then
      echo "the server did not stop within 10 s of SIGTERM; killing it" >&2
      kill -KILL "$server_pid" 2>/dev/null || true
    fi
  fi
}
cleanup() {
  if [ -n "$fuzzer_pid" ]; then
    kill -TERM "$fuzzer_pid" 2>/dev/null || true
    wait "$fuzzer_pid" 2>/dev/null || true
  fi
  stop_server
  if [ -n "$server_pid" ]; then
    wait "$server_pid" 2>/dev/null || true
  fi
  if [ -n "$watchdog_pid" ]; then
    kill "$watchdog_pid" 2>/dev/null || true
    wait "$watchdog_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Short long-polls (the fuzzer asks for waits up to the maximum), room for
# the queues, consumers and groups it creates, and a short drain.
"$walq" serve --data-dir "$work/data" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
  --long-poll-max-ms 200 --max-queues 100000 --max-groups-per-queue 100000 \
  --max-consumers-per-queue 100000 --shutdown-grace-ms 5000 >"$work/server.log" 2>&1 &
server_pid=$!
# Should this script be killed outright (no trap runs then), the server and
# the fuzzer go too, and the scratch directory.
script_pid=$$
(
  while kill -0 "$script_pid" 2>/dev/null; do sleep 1; done
  kill -TERM "$server_pid" 2>/dev/null
  if [ -f "$work/fuzzer.pid" ]; then kill -TERM "$(cat "$work/fuzzer.pid")" 2>/dev/null; fi
  sleep 5
  rm -rf "$work"
) &
watchdog_pid=$!

# `walq serve: listening on ADDR, admin on ADDR` once bound.
data='' admin=''
for _ in $(seq 1 100); do
  line=$(grep -m1 '^walq serve: listening on ' "$work/server.log" || true)
  if [ -n "$line" ]; then
    data=$(echo "$line" | sed -E 's/^walq serve: listening on ([^,]+), admin on (.+)$/\1/')
    admin=$(echo "$line" | sed -E 's/^walq serve: listening on ([^,]+), admin on (.+)$/\2/')
    break
  fi
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$data" ]; then
  echo "walq serve did not start:" >&2
  cat "$work/server.log" >&2
  exit 1
fi
"$py" - "$admin" <<'EOF'
import sys, time, urllib.request
deadline = time.time() + 20
while True:
    try:
        if urllib.request.urlopen(f"http://{sys.argv[1]}/readyz", timeout=2).status == 200:
            break
    except Exception:
        pass
    if time.time() > deadline:
        sys.exit("walq serve is not ready after 20 s")
    time.sleep(0.1)
EOF
echo "walq serve: data plane on $data, admin on $admin"

# The document is valid OpenAPI 3.1 (the official schema, by openapi-spec-validator).
"$py" - "$data" <<'EOF'
import json, sys, urllib.request
from openapi_spec_validator import validate
doc = json.load(urllib.request.urlopen(f"http://{sys.argv[1]}/openapi.json", timeout=10))
validate(doc)
ops = sum(1 for item in doc["paths"].values() for m in item if m in ("get", "put", "post", "delete"))
print(f"openapi.json: OpenAPI {doc['openapi']}, {len(doc['paths'])} paths, {ops} operations: valid")
EOF

started=$SECONDS
status=0
checks=not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance
checks=$checks,response_schema_conformance,unsupported_method,allow_header_conformance,use_after_free
checks=$checks,ensure_resource_availability
# From the scratch directory: schemathesis keeps its example database in
# ./.schemathesis, which must not land in the work tree.
# In the background and waited for, so that a signal to this script is
# handled at once (bash runs traps only between foreground commands).
(cd "$work" && exec timeout "$hard_cap" "$schemathesis" run "http://$data/openapi.json" \
  --checks "$checks" \
  --exclude-operation-id shutdown \
  --max-examples "$examples" \
  --seed "$seed" \
  --workers 2 \
  --request-timeout 10 \
  --report junit --report-dir "$report_dir" \
  --no-color) &
fuzzer_pid=$!
echo "$fuzzer_pid" >"$work/fuzzer.pid"
wait "$fuzzer_pid" || status=$?
fuzzer_pid=
echo "schemathesis: exit $status after $((SECONDS - started)) s (report: $report_dir)"

# What the server answered, by its own count (/metrics); every 5xx listed.
"$py" - "$admin" "$work/fivexx" <<'EOF'
import collections, re, sys, urllib.request
text = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=10).read().decode()
by_status, fivexx = collections.Counter(), []
for line in text.splitlines():
    m = re.match(r'walq_http_requests_total\{(.*)\} (\d+)$', line)
    if not m or 'listener="data"' not in m.group(1):
        continue
    status = re.search(r'status="(\d+)"', m.group(1)).group(1)
    by_status[status] += int(m.group(2))
    if status.startswith("5"):
        fivexx.append(f"  {m.group(1)}: {m.group(2)}")
print(f"the server answered {sum(by_status.values())} requests:",
      ", ".join(f"{n} x {s}" for s, n in sorted(by_status.items())))
open(sys.argv[2], "w").write("\n".join(fivexx))
EOF
fivexx=$(cat "$work/fivexx")

stop_server
server_exit=0
wait "$server_pid" || server_exit=$?
server_pid=

failed=0
if [ "$status" != 0 ]; then
  echo "schemathesis found failures (see above)" >&2
  failed=1
fi
if [ -n "$fivexx" ]; then
  echo "the server answered 5xx:" >&2
  echo "$fivexx" >&2
  failed=1
fi
if grep -q 'panicked' "$work/server.log"; then
  echo "the server panicked:" >&2
  grep -A5 'panicked' "$work/server.log" >&2
  failed=1
fi
if [ "$server_exit" != 0 ]; then
  echo "walq serve exited $server_exit after SIGTERM (expected a clean drain, 0):" >&2
  tail -20 "$work/server.log" >&2
  failed=1
fi
if [ "$failed" != 0 ]; then
  echo "schemathesis: FAILED" >&2
  exit 1
fi
echo "schemathesis: passed (no 5xx, every answer conforms to /openapi.json; the server drained and exited 0)"
