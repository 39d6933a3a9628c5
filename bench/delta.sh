#!/usr/bin/env bash
# The delta benchmark: a 64 MiB ext4 image built from a real directory tree
# (Python's standard library from this machine), a "monthly" change of it (a
# few files changed, some added, some removed) and a "major" one (half the
# tree replaced), each downloaded by the device agent from the same platform
# process (`iot-ota platform`, its firmware server) as a delta update from
# the 1.0.0 image, and as a full download, in one run.
#
#   bench/delta.sh [SIZE_MIB]        (default 64)
#
# Prints, for each case: the bytes fetched as a fraction of the full image,
# the requests, and the time from the batch's start to the agent's exit
# (download, verify, install). Targets (issue "delta"): the monthly change
# fetches at most 0.25 of the image in at most 64 requests; on the major
# change the planner falls back to the full download (or fetches less).
# Needs mke2fs (e2fsprogs), python3 and curl.
# Everything printed is also appended to bench/RESULTS.md, with the date and
# the machine (RESULTS=path to write elsewhere, RESULTS= not at all).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-64}
MKE2FS=$(command -v mke2fs || echo /usr/sbin/mke2fs)
[ -x "$MKE2FS" ] || { echo "bench/delta.sh: mke2fs is missing (apt-get install -y e2fsprogs)" >&2; exit 1; }
for tool in python3 curl; do
  command -v "$tool" >/dev/null || { echo "bench/delta.sh: $tool is missing" >&2; exit 1; }
done
cargo build --release -q -p iot-ota-cli
BIN=$PWD/target/release/iot-ota
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

RESULTS=${RESULTS-bench/RESULTS.md}
if [ -n "$RESULTS" ]; then
  {
    printf '\n## bench/delta.sh %s MiB, %s\n\n' "$SIZE_MIB" "$(date -u '+%Y-%m-%d %H:%M UTC')"
    printf 'machine: %s, %s cores, %s\n\n' "$(uname -m)" "$(nproc)" \
      "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
  } >> "$RESULTS"
  exec > >(tee >(sed -u 's/^/    /' >> "$RESULTS"))
fi

# The images: ext4 from a directory tree, deterministic (fixed UUID, hash
# seed and time), so that only the tree's changes change the image.
src=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
tree="$work/tree"
mkdir -p "$tree"
# About half of the image: what fits of the standard library, in file order.
python3 - "$src" "$tree" "$((SIZE_MIB * 1024 * 1024 / 2))" <<'PY'
import os, shutil, sys
src, dst, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
largest = budget // 20
for root, dirs, files in os.walk(src):
    dirs[:] = sorted(d for d in dirs if d != "__pycache__")
    for f in sorted(files):
        path = os.path.join(root, f)
        if not os.path.isfile(path) or os.path.islink(path):
            continue
        size = os.path.getsize(path)
        if size > largest:
            continue  # no single file dominates the image
        blocks = (size + 4095) // 4096 * 4096 + 4096  # its blocks and metadata
        if blocks > budget:
            sys.exit(0)
        budget -= blocks
        out = os.path.join(dst, os.path.relpath(path, src))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        shutil.copyfile(path, out)
PY
image() { # $1: tree, $2: image
  E2FSPROGS_FAKE_TIME=1700000000 "$MKE2FS" -q -F -t ext4 -b 4096 -U 6c6f7461-6265-6e63-6864-656c74610001 \
    -E hash_seed=6c6f7461-6265-6e63-6864-656c74610002,root_owner=0:0 -d "$1" "$2" "${SIZE_MIB}M" >/dev/null
}
image "$tree" "$work/v1.img"
# Monthly: a few files changed, some added, some removed.
cp -a "$tree" "$work/tree2"
mapfile -t files < <(cd "$work/tree2" && find . -type f | sort)
n=${#files[@]}
for i in 3 17 101 250 333; do
  f="$work/tree2/${files[$((i % n))]}"
  printf '\n# patched for 2.0.0 (%s)\n' "$i" >> "$f"
done
for i in 1 2 3; do head -c 200000 /dev/urandom > "$work/tree2/added-$i.bin"; done
for i in 40 41 42 500; do rm -f "$work/tree2/${files[$((i % n))]}"; done
image "$work/tree2" "$work/v2.img"
# Major: half of the files replaced by new content.
cp -a "$tree" "$work/tree3"
for ((i = 0; i < n; i += 2)); do
  f="$work/tree3/${files[$i]}"
  head -c "$(stat -c %s "$f")" /dev/urandom > "$f"
done
image "$work/tree3" "$work/v3.img"

http=$(free_port)
mqtt=$(free_port)
data="$work/platform"
"$BIN" platform --data-dir "$data" --http "127.0.0.1:$http" --mqtt-listen "127.0.0.1:$mqtt" \
  > "$work/platform.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -f "$data/api-token" ] && curl -sf "http://127.0.0.1:$http/api/health" >/dev/null && break; sleep 0.1; done
export IOT_OTA_API="http://127.0.0.1:$http" IOT_OTA_API_TOKEN
IOT_OTA_API_TOKEN=$(cat "$data/api-token")
"$BIN" firmware add --product bench --version 2.0.0 --name monthly.img "$work/v2.img" >/dev/null
"$BIN" firmware add --product bench --version 3.0.0 --name major.img "$work/v3.img" >/dev/null
stat_of() { curl -sf "$IOT_OTA_API/api/stats" | python3 -c "import json,sys; s=json.load(sys.stdin); print(s['firmware_bytes_served'], s['firmware_requests'])"; }

case_run() { # $1: label, $2: device, $3: version, $4: image, $5: "delta" or "full"
  local secret
  secret=$("$BIN" device add --product bench --device "$2" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["devices"][0]["secret"])')
  local home="$work/$2"
  mkdir -p "$home"
  local base=()
  [ "$5" = delta ] && base=(--delta-base "$work/v1.img")
  IOT_OTA_DEVICE_PASSWORD=$secret "$BIN" -v device run --broker "mqtt://127.0.0.1:$mqtt" \
    --product-key bench --device-name "$2" --version 1.0.0 --username "bench/$2" \
    --work-dir "$home" --install-command 'true {file}' --reboot-command '' --once "${base[@]}" \
    > "$home/agent.log" 2>&1 &
  local agent=$!
  pids+=($agent)
  for _ in $(seq 100); do
    curl -sf "$IOT_OTA_API/api/devices?product=bench" | grep -q "\"device\":\"$2\",[^}]*\"version\":\"1.0.0\"" && break
    sleep 0.1
  done
  read -r b0 r0 < <(stat_of)
  local t0; t0=$(date +%s.%N)
  "$BIN" batch create --product bench --version "$3" --devices "$2" >/dev/null
  local rc=0
  wait "$agent" || rc=$?
  local t1; t1=$(date +%s.%N)
  read -r b1 r1 < <(stat_of)
  local size; size=$(stat -c %s "$4")
  local desc; desc=$(grep -m1 -oE 'delta: [0-9.]+ MiB of [^/]* requests?|delta would fetch .*|[^:]*: full download' "$home/agent.log" || true)
  python3 - "$1" "$rc" "$((b1 - b0))" "$((r1 - r0))" "$size" "$t0" "$t1" "$desc" <<'PY'
import sys
label, rc, got, reqs, size, t0, t1, desc = sys.argv[1:]
got, reqs, size = int(got), int(reqs), int(size)
print(f"{label:<22} {'ok' if rc == '0' else 'FAILED (exit ' + rc + ')':<6} fetched {got / 2**20:7.2f} MiB = {got / size:5.3f} of the image, "
      f"{reqs:3d} requests, {float(t1) - float(t0):5.2f} s" + (f"   [{desc}]" if desc else ""))
PY
}

echo "image: ext4 of $(find "$tree" -type f | wc -l) files ($(du -sh "$tree" | cut -f1)) from $src, ${SIZE_MIB} MiB"
echo "monthly: 5 files changed, 3 added (600 KB), 4 removed; major: half of the files replaced"
case_run "monthly, delta" dm 2.0.0 "$work/v2.img" delta
case_run "monthly, full" fm 2.0.0 "$work/v2.img" full
case_run "major, delta" dx 3.0.0 "$work/v3.img" delta
case_run "major, full" fx 3.0.0 "$work/v3.img" full
