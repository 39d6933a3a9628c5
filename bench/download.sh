#!/usr/bin/env bash
# Download benchmark: the SDK against curl pipelines, same file, same server, one run.
#
#   bench/download.sh [SIZE_MIB]        (default 256)
#
# Serves one random file over HTTP and HTTPS from one local server and prints MB/s for:
#   - md5sum FILE                              (the digest alone, from the page cache)
#   - curl -s URL | md5sum                     (HTTP baseline)
#   - both example devices, the Rust ota_example (download_to pipeline) and the C
#     ota_example (iot_ota_fetch_yield, 5000-byte buffer, 1 s timeout, fwrite):
#     download + MD5 + write (HTTP), end to end from the command to the verified file
#   - the C ota_example --to-file (iot_ota_fetch_to_file: the library's own pipeline
#     writes the file), next to the Rust download_to it should match
#   - curl --cacert CA URL | openssl dgst -sha256   (HTTPS baseline)
#   - both examples: download + SHA-256 + write  (HTTPS, plain MQTT)
# and the ratios; then the peak RSS of each example upgrading a 1 GiB and a 1 MiB image
# (and the 1 GiB one over HTTPS),
# and the stripped size of the C example.
# Each figure is the best of 5 runs (RUNS=N to change), baselines and SDKs interleaved.
# Needs mosquitto, curl, openssl, make, a C compiler and /usr/bin/time.
# BENCH_DIR=/dev/shm puts the image and the downloads on tmpfs (no disk).
# Everything printed is also appended to bench/RESULTS.md, with the date and
# the machine (RESULTS=path to write elsewhere, RESULTS= not at all).
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_MIB=${1:-256}
RUNS=${RUNS:-5}
for tool in mosquitto curl openssl md5sum /usr/bin/time; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || {
    echo "bench: $tool is missing (apt-get install -y mosquitto curl openssl time)" >&2; exit 1; }
done
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)

echo "building (release; the C library with make)..." >&2
cargo build -q --release -p iot-ota-device --example ota_example
cargo build -q --release -p iot-ota-testkit --bin ota-bench-helper
make -s example >/dev/null
TARGET=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
RUST_EXAMPLE=$TARGET/release/examples/ota_example
C_EXAMPLE=$PWD/build/$(uname -m)/bin/ota_example
HELPER=$TARGET/release/ota-bench-helper

# BENCH_DIR: where the files go (default /tmp; /dev/shm measures without the disk).
WORK=$(mktemp -d "${BENCH_DIR:-/tmp}/ota-bench.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Broker.
PORT=$(free_port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nuser root\n' "$PORT" > "$WORK/mosquitto.conf"
"$MOSQUITTO" -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
pids+=($!)
BROKER=mqtt://127.0.0.1:$PORT

# Files and server.
head -c $((SIZE_MIB << 20)) /dev/urandom > "$WORK/fw.bin"
head -c $((1 << 20)) /dev/urandom > "$WORK/small.bin"
mkfifo "$WORK/server.in"
"$HELPER" serve "$WORK/fw.bin" "$WORK/ca.pem" < "$WORK/server.in" > "$WORK/server.out" &
pids+=($!)
exec 7>"$WORK/server.in"   # keeps the server's stdin open until we exit
for _ in $(seq 100); do [ -s "$WORK/server.out" ] && break; sleep 0.05; done
read -r HTTP_URL HTTPS_URL < "$WORK/server.out"
SIZE=$(stat -c %s "$WORK/fw.bin")
MD5=$(md5sum "$WORK/fw.bin" | cut -d' ' -f1)
SHA=$(sha256sum "$WORK/fw.bin" | cut -d' ' -f1)

now() { date +%s.%N; }
mbps() { python3 -c "print(f'{$SIZE / ($2 - $1) / 1e6:.0f}')"; }

best=0
# Runs "$@" RUNS times; sets $best to the best MB/s.
measure() {
  best=0
  for _ in $(seq "$RUNS"); do
    local t0 t1 r
    t0=$(now); "$@"; t1=$(now)
    r=$(mbps "$t0" "$t1")
    if [ "$r" -gt "$best" ]; then best=$r; fi
  done
}

n=0
# One upgrade through ota_example: start it, wait until it listens, push the
# command, wait for it to exit. Timing covers command to verified file on disk.
sdk_upgrade() { # EXAMPLE URL SIGN METHOD [extra flags...]
  local example=$1 url=$2 sign=$3 method=$4; shift 4
  n=$((n + 1))
  local dev=bench$n out=$WORK/out$n
  "$example" --broker "$BROKER" --product-key bench --device-name "$dev" --firmware-version 1.0 \
    --output-dir "$out" --once "$@" 2>"$WORK/example$n.log" &
  local pid=$!
  for _ in $(seq 200); do grep -q "waiting for upgrade commands" "$WORK/example$n.log" && break; sleep 0.02; done
  local cmd
  cmd=$(printf '{"msgId":"%s","version":"1.0","data":{"policy":"standard","size":%s,"firmwareVersion":"2.0","url":"%s","sign":"%s","signMethod":"%s"}}' \
    "$n" "$SIZE" "$url" "$sign" "$method")
  T0=$(now)
  "$HELPER" publish "$BROKER" "/sys/bench/$dev/ota/firmware/upgrade" "$cmd"
  wait "$pid" || { echo "$example failed:" >&2; cat "$WORK/example$n.log" >&2; exit 1; }
  T1=$(now)
  cmp -s "$WORK/fw.bin" "$out/firmware-2.0.bin" || { echo "bench: downloaded file differs" >&2; exit 1; }
  rm -rf "$out"
}

sdk_best=0
measure_sdk() {
  sdk_best=0
  for _ in $(seq "$RUNS"); do
    sdk_upgrade "$@"
    local r; r=$(mbps "$T0" "$T1")
    if [ "$r" -gt "$sdk_best" ]; then sdk_best=$r; fi
  done
}

cat "$WORK/fw.bin" > /dev/null  # warm the page cache for every contender alike

RESULTS=${RESULTS-bench/RESULTS.md}
if [ -n "$RESULTS" ]; then
  {
    printf '\n## bench/download.sh %s MiB, %s\n\n' "$SIZE_MIB" "$(date -u '+%Y-%m-%d %H:%M UTC')"
    printf 'machine: %s, %s cores, %s; output on %s\n\n' "$(uname -m)" "$(nproc)" \
      "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)" "${BENCH_DIR:-the disk}"
  } >> "$RESULTS"
  # Indented: a Markdown code block that needs no closing line.
  exec > >(tee >(sed -u 's/^/    /' >> "$RESULTS"))
fi
echo "file: $SIZE_MIB MiB; best of $RUNS interleaved runs; MB/s = 10^6 bytes/s"
# Baseline and SDK runs alternate, so a slow spell of the machine hits both.
best_of() { if [ "$2" -gt "$1" ]; then echo "$2"; else echo "$1"; fi; }
md5_file=0; curl_md5=0; rust_md5=0; c_md5=0; curl_sha=0; rust_sha=0; c_sha=0; cf_md5=0; cf_sha=0
RUNS_SAVED=$RUNS; RUNS=1
for _ in $(seq "$RUNS_SAVED"); do
  measure sh -c "md5sum '$WORK/fw.bin' > /dev/null"; md5_file=$(best_of "$md5_file" "$best")
  measure sh -c "curl -s '$HTTP_URL' | md5sum > /dev/null"; curl_md5=$(best_of "$curl_md5" "$best")
  measure_sdk "$RUST_EXAMPLE" "$HTTP_URL" "$MD5" Md5; rust_md5=$(best_of "$rust_md5" "$sdk_best")
  measure_sdk "$C_EXAMPLE" "$HTTP_URL" "$MD5" Md5; c_md5=$(best_of "$c_md5" "$sdk_best")
  measure_sdk "$C_EXAMPLE" "$HTTP_URL" "$MD5" Md5 --to-file; cf_md5=$(best_of "$cf_md5" "$sdk_best")
  measure sh -c "curl -s --cacert '$WORK/ca.pem' '$HTTPS_URL' | openssl dgst -sha256 > /dev/null"; curl_sha=$(best_of "$curl_sha" "$best")
  measure_sdk "$RUST_EXAMPLE" "$HTTPS_URL" "$SHA" Sha256 --ca-file "$WORK/ca.pem"; rust_sha=$(best_of "$rust_sha" "$sdk_best")
  measure_sdk "$C_EXAMPLE" "$HTTPS_URL" "$SHA" Sha256 --ca-file "$WORK/ca.pem"; c_sha=$(best_of "$c_sha" "$sdk_best")
  measure_sdk "$C_EXAMPLE" "$HTTPS_URL" "$SHA" Sha256 --ca-file "$WORK/ca.pem" --to-file; cf_sha=$(best_of "$cf_sha" "$sdk_best")
done
RUNS=$RUNS_SAVED

ratio() { python3 -c "print(f'{$1 / $2:.2f}x')"; }
printf '%-56s %8s\n' "contender" "MB/s"
printf '%-56s %8s\n' "md5sum FILE" "$md5_file"
printf '%-56s %8s\n' "curl -s URL | md5sum (HTTP)" "$curl_md5"
printf '%-56s %8s   %s vs curl|md5sum (target >= 1.10x)\n' "Rust ota_example download+MD5+write (HTTP)" "$rust_md5" "$(ratio "$rust_md5" "$curl_md5")"
printf '%-56s %8s   %s vs curl|md5sum (target >= 1.10x)\n' "C ota_example fetch_yield+MD5+fwrite (HTTP)" "$c_md5" "$(ratio "$c_md5" "$curl_md5")"
printf '%-56s %8s   %s vs curl|md5sum, %s vs Rust download_to (target >= 0.95x)\n' "C ota_example --to-file (iot_ota_fetch_to_file, HTTP)" "$cf_md5" "$(ratio "$cf_md5" "$curl_md5")" "$(ratio "$cf_md5" "$rust_md5")"
printf '%-56s %8s\n' "curl --cacert CA URL | openssl dgst -sha256 (HTTPS)" "$curl_sha"
printf '%-56s %8s   %s vs curl|openssl (target >= 1.2x)\n' "Rust ota_example download+SHA-256+write (HTTPS)" "$rust_sha" "$(ratio "$rust_sha" "$curl_sha")"
printf '%-56s %8s   %s vs curl|openssl (target >= 1.2x)\n' "C ota_example fetch_yield+SHA-256+fwrite (HTTPS)" "$c_sha" "$(ratio "$c_sha" "$curl_sha")"
printf '%-56s %8s   %s vs curl|openssl, %s vs Rust download_to (target >= 0.95x)\n' "C ota_example --to-file (iot_ota_fetch_to_file, HTTPS)" "$cf_sha" "$(ratio "$cf_sha" "$curl_sha")" "$(ratio "$cf_sha" "$rust_sha")"

# Peak RSS: a 1 GiB image against a 1 MiB image.
RSS_KIB=0
rss() { # EXAMPLE FILE [https] -> sets RSS_KIB: the peak RSS of the example upgrading it (runs in this shell, so its server is cleaned up)
  local example=$1 file=$2 https=${3:-}
  n=$((n + 1))
  "$HELPER" serve "$file" "$WORK/ca$n.pem" < "$WORK/server.in" > "$WORK/server$n.out" &
  pids+=($!)
  for _ in $(seq 100); do [ -s "$WORK/server$n.out" ] && break; sleep 0.05; done
  local url tls_url; read -r url tls_url < "$WORK/server$n.out"
  local size sign method=Md5 tls=() dev=rss$n out=$WORK/out$n
  size=$(stat -c %s "$file"); sign=$(md5sum "$file" | cut -d' ' -f1)
  if [ -n "$https" ]; then
    url=$tls_url method=Sha256 tls=(--ca-file "$WORK/ca$n.pem")
    sign=$(sha256sum "$file" | cut -d' ' -f1)
  fi
  /usr/bin/time -f %M -o "$WORK/rss$n" "$example" --broker "$BROKER" --product-key bench --device-name "$dev" \
    --firmware-version 1.0 --output-dir "$out" --once "${tls[@]}" 2>"$WORK/example$n.log" &
  local pid=$!
  for _ in $(seq 200); do grep -q "waiting for upgrade commands" "$WORK/example$n.log" && break; sleep 0.02; done
  "$HELPER" publish "$BROKER" "/sys/bench/$dev/ota/firmware/upgrade" \
    "{\"msgId\":\"$n\",\"data\":{\"size\":$size,\"firmwareVersion\":\"2.0\",\"url\":\"$url\",\"sign\":\"$sign\",\"signMethod\":\"$method\"}}"
  wait "$pid" || { echo "$example failed:" >&2; cat "$WORK/example$n.log" >&2; exit 1; }
  rm -rf "$out"
  RSS_KIB=$(cat "$WORK/rss$n")
}
head -c $((1 << 30)) /dev/urandom > "$WORK/big.bin"
rss "$RUST_EXAMPLE" "$WORK/big.bin"; rust_big=$RSS_KIB
rss "$C_EXAMPLE" "$WORK/big.bin"; c_big=$RSS_KIB
rss "$RUST_EXAMPLE" "$WORK/big.bin" https; rust_big_tls=$RSS_KIB
rss "$C_EXAMPLE" "$WORK/big.bin" https; c_big_tls=$RSS_KIB
rm -f "$WORK/big.bin"
rss "$RUST_EXAMPLE" "$WORK/small.bin"; rust_small=$RSS_KIB
rss "$C_EXAMPLE" "$WORK/small.bin"; c_small=$RSS_KIB
printf 'peak RSS of the Rust ota_example: 1 GiB image %s KiB, 1 MiB image %s KiB, difference %s KiB (targets: <= 8192 KiB, difference <= 1024 KiB)\n' \
  "$rust_big" "$rust_small" "$((rust_big - rust_small))"
printf 'peak RSS of the C ota_example:    1 GiB image %s KiB, 1 MiB image %s KiB, difference %s KiB (targets: <= 3277 KiB (3.2 MiB), difference <= 1024 KiB)\n' \
  "$c_big" "$c_small" "$((c_big - c_small))"
printf 'peak RSS over HTTPS (SHA-256), 1 GiB image: Rust %s KiB, C %s KiB (the TLS code, its buffer and the trust anchors come on top of the HTTP figures; README)\n' \
  "$rust_big_tls" "$c_big_tls"
stripped=$WORK/ota_example.stripped
cp "$C_EXAMPLE" "$stripped" && strip "$stripped"
printf 'C ota_example stripped: %s bytes (target < 2097152)\n' "$(stat -c %s "$stripped")"
