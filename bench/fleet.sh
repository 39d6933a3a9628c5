#!/usr/bin/env bash
# The fleet benchmark: 10,000 simulated devices, a 1 MiB image, one batch,
# on the embedded broker and on Mosquitto; prints the fleet's summary for each.
#
#   bench/fleet.sh [DEVICES] [PUSH_RATE_PER_MIN]
#
# The platform runs as its own process (iot-ota platform) and the fleet as
# another (iot-ota fleet --api): each side then holds one descriptor per
# device, which fits a 20,000 open-file limit. Targets (issue "fleet"):
# 100% success within 120 s of the batch start, push -> ack p99 <= 50 ms,
# fleet RSS <= 150 KB per device.
# Everything printed is also appended to bench/RESULTS.md, with the date and
# the machine (RESULTS=path to write elsewhere, RESULTS= not at all).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}
RATE=${2:-12000}
cargo build --release -q -p iot-ota-cli
BIN=target/release/iot-ota
need=$((N + 1000))
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$need" ]; then
  ulimit -n "$need" 2>/dev/null || { echo "bench/fleet.sh: ulimit -n is $(ulimit -n); $N devices need $need" >&2; exit 1; }
fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
work=$(mktemp -d)
trap cleanup EXIT

RESULTS=${RESULTS-bench/RESULTS.md}
if [ -n "$RESULTS" ]; then
  {
    printf '\n## bench/fleet.sh %s devices, push rate %s/min, %s\n\n' "$N" "$RATE" "$(date -u '+%Y-%m-%d %H:%M UTC')"
    printf 'machine: %s, %s cores, %s\n\n' "$(uname -m)" "$(nproc)" \
      "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
  } >> "$RESULTS"
  # Indented: a Markdown code block that needs no closing line.
  exec > >(tee >(sed -u 's/^/    /' >> "$RESULTS"))
fi

run() { # $1: label, $2: broker flag for the platform ("" = embedded), $3: broker URL for the fleet
  local http; http=$(free_port)
  local data="$work/$1"
  local mqtt_listen; mqtt_listen=$(free_port)
  local broker_url=${3:-mqtt://127.0.0.1:$mqtt_listen}
  # shellcheck disable=SC2086
  $BIN platform --data-dir "$data" --http "127.0.0.1:$http" --mqtt-listen "127.0.0.1:$mqtt_listen" $2 \
    > "$work/$1.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do [ -f "$data/api-token" ] && curl -sf "http://127.0.0.1:$http/api/health" >/dev/null && break; sleep 0.1; done
  echo "== $1: $N devices, 1 MiB, push rate $RATE/min"
  $BIN fleet --devices "$N" --api "http://127.0.0.1:$http" --broker "$broker_url" \
    --token "$(cat "$data/api-token")" --push-rate "$RATE" --size-mib 1 --timeout-secs 300 || true
  kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
}

run embedded "" ""
if command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ]; then
  mport=$(free_port)
  cat > "$work/mosquitto.conf" <<CONF
listener $mport 127.0.0.1
allow_anonymous true
max_queued_messages 100000
max_inflight_messages 0
CONF
  "$(command -v mosquitto || echo /usr/sbin/mosquitto)" -c "$work/mosquitto.conf" > "$work/mosquitto.log" 2>&1 &
  pids+=($!)
  sleep 0.5
  run mosquitto "--broker mqtt://127.0.0.1:$mport" "mqtt://127.0.0.1:$mport"
else
  echo "== mosquitto: not installed (apt-get install mosquitto), skipped"
fi
