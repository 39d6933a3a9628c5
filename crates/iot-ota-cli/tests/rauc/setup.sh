#!/bin/sh
# setup.sh DIR -- a RAUC test "system" under DIR, for the agent's RAUC test
# (crates/iot-ota-cli/tests/cli.rs, device_agent_installs_with_rauc).
#
# Creates:
#   DIR/system.conf            RAUC system config (custom bootloader, 2 raw file slots)
#   DIR/bootloader.sh          custom bootloader backend; state in DIR/bootloader.state,
#                              every call logged to DIR/bootloader.log
#   DIR/slot-a.img, slot-b.img the two slot "devices" (regular files, SLOT_SIZE bytes)
#   DIR/pki/{ca,signing}.{key,cert.pem}, DIR/pki/keyring.pem
#   DIR/bundle-2.0.0.raucb, DIR/bundle-3.0.0.raucb   (plain format, signed)
#   DIR/data/                  RAUC data-directory (central.raucs status file)
#   DIR/mnt/                   RAUC mount prefix
#   DIR/env.sh                 env to source: private D-Bus address etc.
#
# Needs: root, rauc, squashfs-tools (mksquashfs), openssl, dbus (dbus-daemon).
# Runtime (install) additionally needs loop devices + squashfs in the kernel.
set -eu

DIR=${1:?usage: setup.sh DIR}
COMPATIBLE=iot-ota-test-device
SLOT_SIZE_KB=1024     # slot file size == image size

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)                          # RAUC needs absolute paths
mkdir -p "$DIR/pki" "$DIR/data" "$DIR/mnt" "$DIR/bundles"
rm -f "$DIR/data/central.raucs"                  # stale slot status from a previous run

# ---------------------------------------------------------------- slots
# Initial "factory" content: slot A holds 1.0.0, slot B is blank.
mkimg() { # mkimg FILE TEXT   -> SLOT_SIZE_KB file starting with TEXT, zero padded
	dd if=/dev/zero of="$1" bs=1024 count="$SLOT_SIZE_KB" status=none
	printf '%s\n' "$2" | dd of="$1" conv=notrunc status=none
}
mkimg "$DIR/slot-a.img" "rootfs 1.0.0"
mkimg "$DIR/slot-b.img" ""

# ---------------------------------------------------------------- bootloader
cat >"$DIR/bootloader.sh" <<'EOF'
#!/bin/sh
# Fake bootloader for RAUC's "custom" backend.  State file format (one key=value a line):
#   primary=<bootname>   state.<bootname>=good|bad
# RAUC calls:  get-primary | set-primary BOOTNAME | get-state BOOTNAME |
#              set-state BOOTNAME good|bad | get-current (rauc >= 1.14 only)
# Test-only:   boot  (simulate a reboot: print the bootname the "firmware" would boot
#              and record it as current)    dump (print the state file)
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
STATE=$HERE/bootloader.state
LOG=$HERE/bootloader.log
SLOTS="A B"

echo "$(date +%s) $*" >>"$LOG"

get() { sed -n "s/^$1=//p" "$STATE" | tail -n 1; }
put() { # put KEY VALUE  (atomic rewrite)
	tmp="$STATE.tmp.$$"
	{ grep -v "^$1=" "$STATE" 2>/dev/null || true; echo "$1=$2"; } >"$tmp"
	mv "$tmp" "$STATE"
}
known() { for s in $SLOTS; do [ "$s" = "$1" ] && return 0; done; echo "unknown slot '$1'" >&2; exit 2; }

[ -f "$STATE" ] || { echo "no state file $STATE" >&2; exit 1; }
cmd=${1:-}
case "$cmd" in
get-primary)
	get primary ;;
set-primary)
	known "${2:?}"
	put primary "$2"
	# like barebox/u-boot backends: (re)activating a slot makes it bootable again
	put "state.$2" good ;;
get-state)
	known "${2:?}"
	v=$(get "state.$2"); [ -n "$v" ] || v=bad
	echo "$v" ;;
set-state)
	known "${2:?}"
	case "${3:-}" in good|bad) put "state.$2" "$3" ;; *) echo "bad state '${3:-}'" >&2; exit 2 ;; esac ;;
get-current)
	get current ;;
boot)
	# firmware logic: boot primary if good, else first other good slot
	p=$(get primary); pick=
	if [ -n "$p" ] && [ "$(get "state.$p")" = good ]; then pick=$p
	else for s in $SLOTS; do [ "$(get "state.$s")" = good ] && { pick=$s; break; }; done; fi
	[ -n "$pick" ] || { echo "no bootable slot" >&2; exit 1; }
	put current "$pick"
	echo "$pick" ;;
dump)
	cat "$STATE" ;;
*)
	echo "usage: $0 get-primary|set-primary S|get-state S|set-state S good|bad|get-current|boot|dump" >&2
	exit 2 ;;
esac
EOF
chmod 0755 "$DIR/bootloader.sh"
printf 'primary=A\nstate.A=good\nstate.B=bad\ncurrent=A\n' >"$DIR/bootloader.state"
: >"$DIR/bootloader.log"

# ---------------------------------------------------------------- PKI
cd "$DIR/pki"
cat >openssl.cnf <<'EOF'
[ req ]
distinguished_name = dn
prompt = no
[ dn ]
CN = placeholder
[ v3_ca ]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[ v3_leaf ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
EOF
openssl req -config openssl.cnf -x509 -newkey rsa:2048 -nodes -days 3650 \
	-subj "/O=iot-ota-test/CN=iot-ota-test test CA" -extensions v3_ca \
	-keyout ca.key.pem -out ca.cert.pem 2>/dev/null
openssl req -config openssl.cnf -newkey rsa:2048 -nodes \
	-subj "/O=iot-ota-test/CN=iot-ota-test signing" -keyout signing.key.pem -out signing.csr.pem 2>/dev/null
openssl x509 -req -in signing.csr.pem -CA ca.cert.pem -CAkey ca.key.pem -CAcreateserial \
	-days 3650 -extfile openssl.cnf -extensions v3_leaf -out signing.cert.pem 2>/dev/null
cp ca.cert.pem keyring.pem
cd - >/dev/null

# ---------------------------------------------------------------- system.conf
cat >"$DIR/system.conf" <<EOF
[system]
compatible=$COMPATIBLE
bootloader=custom
mountprefix=$DIR/mnt
data-directory=$DIR/data
bundle-formats=plain

[keyring]
path=$DIR/pki/keyring.pem

[handlers]
bootloader-custom-backend=$DIR/bootloader.sh

[slot.rootfs.0]
device=$DIR/slot-a.img
type=raw
bootname=A

[slot.rootfs.1]
device=$DIR/slot-b.img
type=raw
bootname=B
EOF

# ---------------------------------------------------------------- bundles
mkbundle() { # mkbundle VERSION
	v=$1; src="$DIR/bundles/src-$v"
	rm -rf "$src"; mkdir -p "$src"
	mkimg "$src/rootfs.img" "rootfs $v"
	cat >"$src/manifest.raucm" <<EOF
[update]
compatible=$COMPATIBLE
version=$v
description=iot-ota-test test bundle $v
build=$(date -u +%Y%m%dT%H%M%SZ)

[bundle]
format=plain

[image.rootfs]
filename=rootfs.img
EOF
	rm -f "$DIR/bundle-$v.raucb"
	rauc --conf="$DIR/system.conf" bundle \
		--cert="$DIR/pki/signing.cert.pem" --key="$DIR/pki/signing.key.pem" \
		--keyring="$DIR/pki/keyring.pem" \
		"$src" "$DIR/bundle-$v.raucb" >"$DIR/bundles/bundle-$v.log" 2>&1 \
		|| { cat "$DIR/bundles/bundle-$v.log" >&2; exit 1; }
}
mkbundle 2.0.0
mkbundle 3.0.0

# ---------------------------------------------------------------- env for tests
cat >"$DIR/env.sh" <<EOF
# source me: private session bus that both 'rauc service' and the rauc client use
RAUC_TEST_DIR=$DIR
DBUS_SESSION_BUS_ADDRESS=unix:path=$DIR/bus.sock
DBUS_STARTER_BUS_TYPE=session
export RAUC_TEST_DIR DBUS_SESSION_BUS_ADDRESS DBUS_STARTER_BUS_TYPE
EOF
echo "iot-ota-test system ready in $DIR"
