#!/usr/bin/env bash
# The image built and run for real, and a pod simulated with it (deploy/README.md).
#
# Builds the static `walq` and the static example client (walq-server/examples/
# pod_client.rs), starts a private dockerd (its own socket, data and exec roots in a temp
# dir, no bridge, no iptables, no pulls), builds both FROM-scratch images and runs:
#   1. the sidecar alone, read-only as 65532 on a named volume, its probes answering,
#      and an application container joined to its network namespace;
#   2. a pod: a "pause" container holding the network namespace, the sidecar and the
#      application joined to it, sharing volumes; `docker kill` of the sidecar under
#      load, then a restart on the same volume: every produce answered 200 is there,
#      every delivery unacknowledged at the kill comes back, no acked one does;
#   3. the same pod, `docker stop` under load: exit 0, every answer 200 or 503, every
#      200 there, no acknowledged delivery comes back.
# WALQ_POD_TEST_LOGS=DIR keeps every container's output (the journals) in DIR.
# Needs root (dockerd); installs Debian's docker.io if dockerd is missing. Otherwise it
# says SKIPPED and exits 0. Every wait is bounded; everything is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

started=$SECONDS
say() { printf '[pod-test %3ds] %s\n' "$((SECONDS - started))" "$*"; }
fail() {
  say "FAILED: $*" >&2
  exit 1
}

# Load: produces acknowledged per scenario (about 3,000 a second on a 2-core machine),
# and the group deliveries the kill scenario's consumer keeps unacknowledged.
acks=${WALQ_POD_TEST_ACKS:-20000}
held=20
# walq's drain bound, and docker stop's wait before its SIGKILL: more than the drain.
drain_grace_ms=10000
stop_timeout_s=30

if [ "$(id -u)" != 0 ]; then
  echo "pod test: SKIPPED (dockerd needs root; run it as root to build and run the image)"
  exit 0
fi
if ! command -v dockerd >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "pod test: SKIPPED (no dockerd and no apt-get to install docker.io)"
    exit 0
  fi
  say "installing docker.io"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q docker.io >/dev/null ||
    { apt-get update -q >/dev/null && apt-get install -y -q docker.io >/dev/null; } ||
    fail "apt-get install docker.io failed"
fi
# The client of the same package as the daemon: a newer CLI elsewhere on the PATH would
# want the buildx plugin for `docker build`.
docker_cli=/usr/bin/docker
[ -x "$docker_cli" ] || docker_cli=$(command -v docker) || fail "dockerd is here but no docker client"
# Every docker call is bounded: a wedged daemon fails the test instead of hanging CI.
d() { timeout 120 "$docker_cli" "$@"; }

say "building the static binaries"
export CARGO_TARGET_DIR=target # the Dockerfiles copy from target/
export RUSTFLAGS="-C target-feature=+crt-static"
cargo build --release --target x86_64-unknown-linux-gnu -p walq-cli
cargo build --release --target x86_64-unknown-linux-gnu -p walq-server --example pod_client
unset RUSTFLAGS

work=$(mktemp -d /tmp/walq-pod-test.XXXXXX)
dockerd_pid=
cleanup() {
  local rc=$?
  set +e
  if [ -n "$dockerd_pid" ] && kill -0 "$dockerd_pid" 2>/dev/null; then
    if [ "$rc" != 0 ]; then
      for c in $(d ps -a --format '{{.Names}}' 2>/dev/null); do
        echo "--- last lines of $c:"
        d logs --tail 15 "$c" 2>&1
      done
      echo "--- last lines of dockerd's log:"
      tail -n 15 "$work/dockerd.log"
    fi
    # shellcheck disable=SC2046 # one word per container id
    d rm -f $(d ps -aq) >/dev/null 2>&1
    kill "$dockerd_pid"
    for _ in $(seq 100); do
      kill -0 "$dockerd_pid" 2>/dev/null || break
      sleep 0.2
    done
    kill -9 "$dockerd_pid" 2>/dev/null
  fi
  if [ -n "${WALQ_POD_TEST_LOGS:-}" ]; then
    mkdir -p "$WALQ_POD_TEST_LOGS" && cp "$work"/*.log "$WALQ_POD_TEST_LOGS"/ 2>/dev/null
  fi
  # Mounts dockerd left behind (it unmounts its own on a clean exit).
  grep -o " ${work}[^ ]*" /proc/mounts | sort -r | xargs -r umount -l 2>/dev/null
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "starting a private dockerd in $work"
dockerd --data-root "$work/data" --exec-root "$work/exec" --pidfile "$work/dockerd.pid" \
  -H "unix://$work/docker.sock" --bridge=none --iptables=false >"$work/dockerd.log" 2>&1 &
dockerd_pid=$!
export DOCKER_HOST="unix://$work/docker.sock"
for i in $(seq 150); do
  d version >/dev/null 2>&1 && break
  kill -0 "$dockerd_pid" 2>/dev/null || fail "dockerd exited: $(tail -n 5 "$work/dockerd.log")"
  [ "$i" != 150 ] || fail "dockerd did not answer within 30 s: $(tail -n 5 "$work/dockerd.log")"
  sleep 0.2
done

say "building the images (FROM scratch: nothing to pull)"
# BuildKit gives each WORKDIR to the image's USER, so fresh named volumes are 65532's.
export DOCKER_BUILDKIT=1
d build -q -t walq:pod-test . >/dev/null || fail "docker build of the walq image"
d build -q -f deploy/pod-client.Dockerfile -t walq-pod-client:pod-test . >/dev/null ||
  fail "docker build of deploy/pod-client.Dockerfile"
# Issue 8's bound on the image: at most 20 MB.
image_bytes=$(d image inspect -f '{{.Size}}' walq:pod-test)
say "the walq image is $image_bytes bytes ($((image_bytes / 1000000)) MB; the bound is 20 MB)"
[ "$image_bytes" -le 20000000 ] || fail "the walq image is $image_bytes bytes, over 20 MB"

secure=(--read-only --user 65532:65532 --cap-drop ALL --security-opt no-new-privileges)
serve=(serve --data-dir /var/lib/walq --listen 127.0.0.1:3600 --admin-listen 0.0.0.0:9600
  --shutdown-grace-ms "$drain_grace_ms")
# The application container: the client, joined to the network namespace of $1.
app() {
  local netns=$1
  shift
  d run "${secure[@]}" --network "container:$netns" -v walq-pod-shared:/shared "$@"
}
client=walq-pod-client:pod-test
# `ready NETNS`: the sidecar's /readyz answers 200 within 60 s (asked from inside the pod).
ready() { app "$1" --rm "$client" probe --path /readyz --timeout-ms 60000 >/dev/null || fail "/readyz not 200 within 60 s"; }
exit_code() { d inspect -f '{{.State.ExitCode}}' "$1"; }
count() { d logs "$1" 2>/dev/null | grep -c "^$2 " || true; }
# `await DESCRIPTION SECONDS COMMAND...`: polls COMMAND until it succeeds, or fails the test.
await() {
  local what=$1 until=$((SECONDS + $2))
  shift 2
  until "$@"; do
    [ "$SECONDS" -lt "$until" ] || fail "timed out waiting for $what"
    sleep 0.2
  done
}
at_least() { [ "$(count "$1" "$2")" -ge "$3" ]; }
# `finish CONTAINER`: waits for it to exit 0 (bounded), and saves its output.
finish() {
  local rc
  rc=$(timeout 240 "$docker_cli" wait "$1") || fail "$1 still running after 240 s"
  d logs "$1" >"$work/$1.log" 2>&1
  [ "$rc" = 0 ] || fail "$1 exited $rc: $(tail -n 3 "$work/$1.log")"
}
# `check_consumer PRODUCER CONSUMER HELD`: every acknowledged produce was delivered;
# every delivery was acked in the end (or its ack was sent and got no answer: it may
# have been applied); none came back after its ack was answered 200; all HELD
# deliveries kept unacknowledged came back. Prints "redeliveries=N".
check_consumer() {
  awk -v want_held="$3" '
    FNR == NR { if ($1 == "ack") produced[$2] = 1; next }
    $1 == "got" { if ($2 in acked) after_ack++; if ($3 >= 2) redeliveries++; got[$2] = 1 }
    $1 == "acked" { acked[$2] = 1 }
    $1 == "ack-error" && $3 == "dropped" { unknown[$2] = 1 }
    $1 == "held" { nheld++ }
    $1 == "redelivered" { back++ }
    END {
      for (o in produced) if (!(o in got)) { never++; if (never <= 5) print "never delivered: offset " o }
      for (o in got) if (!(o in acked) && !(o in unknown)) { unacked++; if (unacked <= 5) print "never acked: offset " o }
      printf "redeliveries=%d held=%d came_back=%d delivered_after_ack=%d never_delivered=%d never_acked=%d\n",
        redeliveries, nheld, back, after_ack, never, unacked
      exit (after_ack || never || unacked || nheld != want_held || back != nheld) ? 1 : 0
    }' "$work/$1.log" "$work/$2.log"
}

# --- 1. the sidecar alone, and an application container in its network namespace.
say "1. sidecar: --read-only --user 65532:65532, a named volume; app: --network container:sidecar"
d volume create walq-pod-data >/dev/null
d volume create walq-pod-shared >/dev/null
d run -d --name sidecar0 "${secure[@]}" --network none -v walq-pod-data:/var/lib/walq walq:pod-test "${serve[@]}" >/dev/null
ready sidecar0
app sidecar0 --rm "$client" probe --path /livez --timeout-ms 5000 >/dev/null || fail "/livez not 200"
app sidecar0 --rm "$client" probe --path /metrics --timeout-ms 5000 >/dev/null || fail "/metrics not 200"
app sidecar0 --rm "$client" produce --queue smoke --acks 100 --journal /shared/smoke.log >/dev/null ||
  fail "producing 100 records to the sidecar"
app sidecar0 --rm "$client" verify --queue smoke --journal /shared/smoke.log || fail "smoke records missing"
app sidecar0 --rm "$client" consume --queue smoke --group workers --idle 1 | tail -n 1 || fail "consuming the smoke records"
d stop -t "$stop_timeout_s" sidecar0 >/dev/null
[ "$(exit_code sidecar0)" = 0 ] || fail "sidecar0 exited $(exit_code sidecar0) on docker stop"
d rm sidecar0 >/dev/null

# --- 2. a pod: the pause container holds the network namespace, as Kubernetes' does,
# so a restarted sidecar is reachable on the same 127.0.0.1 by the running application.
say "2. pod: pause + sidecar + application; docker kill of the sidecar under load"
d run -d --name pod --read-only --user 65532:65532 --network none "$client" pause >/dev/null
start_sidecar() {
  d run -d --name sidecar "${secure[@]}" --network container:pod -v walq-pod-data:/var/lib/walq \
    walq:pod-test "${serve[@]}" >/dev/null
  ready pod
}
start_sidecar
# Acks synced before they are answered: an ack answered 200 is never redelivered, even
# after a SIGKILL. The long ack wait leaves only the restart to redeliver.
app pod --rm "$client" request PUT /v1/queues/kill >/dev/null || fail "creating queue kill"
app pod --rm "$client" request PUT /v1/queues/kill/groups/workers \
  '{"ack_durability": "sync", "ack_wait_ms": 600000, "max_deliver": 0}' >/dev/null || fail "creating group kill/workers"
app pod -d --name produce-kill "$client" produce --queue kill --acks "$acks" --prefix kill \
  --journal /shared/produce-kill.log --max-ms 180000 >/dev/null
app pod -d --name consume-kill "$client" consume --queue kill --group workers --hold "$held" \
  --journal /shared/consume-kill.log --max-ms 200000 >/dev/null
loaded() { at_least produce-kill ack $((acks / 4)) && at_least consume-kill held "$held"; }
await "a quarter of the produces and $held held deliveries" 120 loaded
d kill sidecar >/dev/null
kill_acks=$(count produce-kill ack)
timeout 60 "$docker_cli" wait sidecar >/dev/null || fail "the killed sidecar did not exit"
kill_rc=$(exit_code sidecar)
say "   killed (exit $kill_rc) after $kill_acks acknowledged produces; restarting it on the same volume"
sleep 1 # the application keeps trying meanwhile: refused connections
d start sidecar >/dev/null
ready pod
finish produce-kill
finish consume-kill
app pod --rm "$client" verify --queue kill --journal /shared/produce-kill.log >"$work/verify-kill.log" ||
  fail "acknowledged records lost after docker kill: $(grep -m 5 -e MISSING -e verify: "$work/verify-kill.log")"
kill_consumer=$(check_consumer produce-kill consume-kill "$held") || fail "kill, group: $kill_consumer"
kill_summary="$(tail -n 1 "$work/produce-kill.log"); $(tail -n 1 "$work/verify-kill.log"); $kill_consumer"
say "   $kill_summary"

# --- 3. the same pod: docker stop (SIGTERM, the drain) under load.
say "3. pod: docker stop of the sidecar under load (drain grace ${drain_grace_ms} ms, stop timeout ${stop_timeout_s} s)"
# Default ack durability (interval:100): the drain's sync is what keeps the last acks.
app pod --rm "$client" request PUT /v1/queues/stop >/dev/null || fail "creating queue stop"
app pod --rm "$client" request PUT /v1/queues/stop/groups/workers '{"ack_wait_ms": 600000}' >/dev/null ||
  fail "creating group stop/workers"
app pod -d --name produce-stop "$client" produce --queue stop --acks "$acks" --prefix stop \
  --journal /shared/produce-stop.log --max-ms 180000 >/dev/null
app pod -d --name consume-stop "$client" consume --queue stop --group workers \
  --journal /shared/consume-stop.log --max-ms 200000 >/dev/null
await "a quarter of the produces" 120 at_least produce-stop ack $((acks / 4))
d stop -t "$stop_timeout_s" sidecar >/dev/null
stop_acks=$(count produce-stop ack)
stop_rc=$(exit_code sidecar)
d logs sidecar >"$work/sidecar-stop.log" 2>&1
[ "$stop_rc" = 0 ] || fail "the sidecar exited $stop_rc on docker stop, not 0 (drained): $(tail -n 3 "$work/sidecar-stop.log")"
say "   stopped (exit $stop_rc) after $stop_acks acknowledged produces; restarting it on the same volume"
d rm sidecar >/dev/null
start_sidecar
finish produce-stop
finish consume-stop
# Every answer was 200 or 503 (shutting_down); a request that got no answer at all is
# counted ("dropped") and fails nothing unless an acknowledged record is missing.
bad=$(grep -hE '^(status|ack-status|fetch-error) ' "$work/produce-stop.log" "$work/consume-stop.log" |
  grep -vE '^status 503 |^ack-status [0-9]+ 503$|^fetch-error (503|refused|dropped)' || true)
[ -z "$bad" ] || fail "answers other than 200 or 503 during the drain: $(head -n 5 <<<"$bad")"
app pod --rm "$client" verify --queue stop --journal /shared/produce-stop.log >"$work/verify-stop.log" ||
  fail "acknowledged records lost after docker stop: $(grep -m 5 -e MISSING -e verify: "$work/verify-stop.log")"
stop_consumer=$(check_consumer produce-stop consume-stop 0) || fail "stop, group: $stop_consumer"
dropped=$(grep -c '^dropped ' "$work/produce-stop.log" || true)
answered_503=$(grep -c '^status 503 ' "$work/produce-stop.log" || true)
stop_summary="$(tail -n 1 "$work/produce-stop.log"); $(tail -n 1 "$work/verify-stop.log"); $stop_consumer"
say "   $stop_summary"

d stop -t "$stop_timeout_s" sidecar >/dev/null
[ "$(exit_code sidecar)" = 0 ] || fail "the final docker stop: exit $(exit_code sidecar)"

say "pod test: PASSED in $((SECONDS - started)) s." \
  "kill: sidecar exit $kill_rc, $(count produce-kill ack) acknowledged produces ($kill_acks before the kill), all present," \
  "$(grep -o 'redeliveries=[0-9]*' <<<"$kill_consumer" | cut -d= -f2) redeliveries, $held/$held held deliveries came back." \
  "stop: sidecar exit $stop_rc, $(count produce-stop ack) acknowledged ($stop_acks before the stop), all present," \
  "$answered_503 answered 503, $dropped dropped without an answer, no acked delivery redelivered."
