# Builds the C API of the OTA SDK for devices:
#
#   build/$(uname -m)/lib/libiot_ota.a, libiot_ota.so   the libraries
#   build/$(uname -m)/lib/pkgconfig/iot_ota.pc          pkg-config file
#   build/$(uname -m)/include/                          iot_ota.h, iot_mqtt.h, iot_config.h
#   build/$(uname -m)/bin/ota_example                   the C example, linked statically
#
# The libraries come from the iot-ota-ffi crate built with cargo's `device`
# profile (Cargo.toml: release + opt-level "s", LTO, one codegen unit,
# stripped). `make test-c` also builds and runs the C tests.

ARCH        := $(shell uname -m)
BUILD       := build/$(ARCH)
CARGO       ?= cargo
PROFILE     ?= device
TARGET_DIR  := $(or $(CARGO_TARGET_DIR),target)
CARGO_OUT   := $(TARGET_DIR)/$(PROFILE)
CC          ?= cc
CFLAGS      ?= -std=c11 -Os -Wall -Wextra -Werror
# ring's assembly objects carry no .note.GNU-stack: say explicitly that the
# stack is not executable (GNU ld would otherwise make it so, with a warning).
# -static-libgcc: the unwinder Rust's standard library refers to comes from
# libgcc_eh.a into the binary (about 25 KB) instead of loading libgcc_s.so.1
# at run time: one shared object fewer to ship on the device, and about
# 100 KiB less resident memory (its pages and relocations).
LDFLAGS     ?= -Wl,--gc-sections -Wl,-z,noexecstack -static-libgcc -s
# `lean` compiles out the SDK's log statements, which a C program could never
# see (it cannot install a Rust logger): about 70 KB smaller.
FEATURES    ?= lean
# The device profile aborts on a panic (Cargo.toml): nothing unwinds, so the
# Rust code needs no unwind tables (.eh_frame): about 200 KB smaller. A
# panic still prints its message and location; only a RUST_BACKTRACE
# backtrace stops at the first frame of ours. UNWIND_TABLES=1 keeps them.
# (A build that unwinds, CARGO_PROFILE_DEVICE_PANIC=unwind, needs them.)
ifneq ($(UNWIND_TABLES),1)
ifneq ($(CARGO_PROFILE_DEVICE_PANIC),unwind)
DEVICE_RUSTFLAGS := -C force-unwind-tables=no
endif
endif

# DT_RELR packs the position-independent executable's relocations (about
# 120 KB smaller, ASLR kept) but needs binutils >= 2.38 to link and glibc >=
# 2.36 to run. Used when this toolchain links and runs it; set RELR=0 when
# cross-compiling for an older C library.
ifndef RELR
RELR := $(shell d=$$(mktemp -d) && printf 'int main(void){return 0;}\n' > $$d/t.c && \
          $(CC) $$d/t.c -Wl,-z,pack-relative-relocs -o $$d/t >/dev/null 2>&1 && $$d/t && \
          echo 1 || echo 0; rm -rf $$d)
endif
ifeq ($(RELR),1)
LDFLAGS += -Wl,-z,pack-relative-relocs
endif
LDLIBS      := -lpthread -ldl -lm
FFI         := crates/iot-ota-ffi
HEADERS     := iot_ota.h iot_mqtt.h iot_config.h
VERSION     := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)

PREFIX      ?= /usr/local
DESTDIR     ?=
SOVERSION   := 0

.PHONY: all libs headers pkgconfig example test-c size install check-install clean

all: libs headers pkgconfig example

# cargo decides what is stale; always ask it.
libs:
	RUSTFLAGS="$(RUSTFLAGS) $(DEVICE_RUSTFLAGS)" $(CARGO) build -p iot-ota-ffi --lib --profile $(PROFILE) --features "$(FEATURES)"
	mkdir -p $(BUILD)/lib
	cp $(CARGO_OUT)/libiot_ota.a $(CARGO_OUT)/libiot_ota.so $(BUILD)/lib/

headers:
	mkdir -p $(BUILD)/include
	cp $(addprefix $(FFI)/include/,$(HEADERS)) $(BUILD)/include/

# Relocatable: paths are relative to the .pc file's own directory.
pkgconfig:
	mkdir -p $(BUILD)/lib/pkgconfig
	printf '%s\n' \
	  'prefix=$${pcfiledir}/../..' \
	  'libdir=$${prefix}/lib' \
	  'includedir=$${prefix}/include' \
	  '' \
	  'Name: iot_ota' \
	  'Description: IoT device OTA SDK, C API (libiot_ota)' \
	  'Version: $(VERSION)' \
	  'Libs: -L$${libdir} -liot_ota' \
	  'Libs.private: $(LDLIBS)' \
	  'Cflags: -I$${includedir}' \
	  > $(BUILD)/lib/pkgconfig/iot_ota.pc
	# pkg-config cannot turn -liot_ota into the archive (--static only adds
	# Libs.private), so static linking has its own module.
	printf '%s\n' \
	  'prefix=$${pcfiledir}/../..' \
	  'libdir=$${prefix}/lib' \
	  'includedir=$${prefix}/include' \
	  '' \
	  'Name: iot_ota_static' \
	  'Description: IoT device OTA SDK, C API (libiot_ota.a, linked statically)' \
	  'Version: $(VERSION)' \
	  'Libs: $${libdir}/libiot_ota.a -Wl,--gc-sections -Wl,-z,noexecstack -static-libgcc $(LDLIBS)' \
	  'Cflags: -I$${includedir}' \
	  > $(BUILD)/lib/pkgconfig/iot_ota_static.pc

example: libs headers
	mkdir -p $(BUILD)/bin
	$(CC) $(CFLAGS) -I$(BUILD)/include $(FFI)/examples/ota_example.c \
	  $(BUILD)/lib/libiot_ota.a $(LDFLAGS) $(LDLIBS) -o $(BUILD)/bin/ota_example

# The C tests: the parameter checks against the device build (found through
# pkg-config); the example tests (Mosquitto, HTTP server, valgrind) on the
# device-built ota_example; then the whole C suite on the debug library.
test-c: all
	$(CC) $(CFLAGS) $$(PKG_CONFIG_PATH=$(BUILD)/lib/pkgconfig pkg-config --cflags iot_ota) \
	  $(FFI)/tests/c/c_api_test.c $(BUILD)/lib/libiot_ota.a $(LDFLAGS) $(LDLIBS) \
	  -o $(BUILD)/bin/c_api_test
	$(BUILD)/bin/c_api_test params
	IOT_OTA_EXAMPLE=$(CURDIR)/$(BUILD)/bin/ota_example $(CARGO) test -p iot-ota-ffi --test c_api example_
	$(CARGO) test -p iot-ota-ffi

size: example
	@echo "RELR=$(RELR) FEATURES=$(FEATURES)"
	@stat -c '%s bytes  %n' $(BUILD)/bin/ota_example $(BUILD)/lib/libiot_ota.so

# make install [PREFIX=/usr/local] [DESTDIR=...]: headers, both libraries (the
# shared one as libiot_ota.so.VERSION with its SONAME link .so.0 and the
# development link .so), the pkg-config files and ota_example.
install: all
	install -d $(DESTDIR)$(PREFIX)/include $(DESTDIR)$(PREFIX)/lib/pkgconfig $(DESTDIR)$(PREFIX)/bin
	install -m 0644 $(addprefix $(BUILD)/include/,$(HEADERS)) $(DESTDIR)$(PREFIX)/include/
	install -m 0644 $(BUILD)/lib/libiot_ota.a $(DESTDIR)$(PREFIX)/lib/
	install -m 0755 $(BUILD)/lib/libiot_ota.so $(DESTDIR)$(PREFIX)/lib/libiot_ota.so.$(VERSION)
	ln -sf libiot_ota.so.$(VERSION) $(DESTDIR)$(PREFIX)/lib/libiot_ota.so.$(SOVERSION)
	ln -sf libiot_ota.so.$(SOVERSION) $(DESTDIR)$(PREFIX)/lib/libiot_ota.so
	install -m 0644 $(BUILD)/lib/pkgconfig/iot_ota.pc $(BUILD)/lib/pkgconfig/iot_ota_static.pc \
	  $(DESTDIR)$(PREFIX)/lib/pkgconfig/
	install -m 0755 $(BUILD)/bin/ota_example $(DESTDIR)$(PREFIX)/bin/

# Installs into a temporary DESTDIR and checks it: the SONAME, a program
# linked with `pkg-config iot_ota_static` needs no libiot_ota.so, one linked
# with `pkg-config iot_ota` records libiot_ota.so.0 and runs.
check-install:
	d=$$(mktemp -d) && trap 'rm -rf "$$d"' EXIT && \
	$(MAKE) -s install DESTDIR=$$d PREFIX=/opt/iot-ota >/dev/null && \
	readelf -d $$d/opt/iot-ota/lib/libiot_ota.so.$(VERSION) | grep -q 'SONAME.*libiot_ota.so.$(SOVERSION)' && \
	printf '#include "iot_ota.h"\nint main(void){return iot_ota_strerror(0)==0;}\n' > $$d/t.c && \
	export PKG_CONFIG_PATH=$$d/opt/iot-ota/lib/pkgconfig && \
	$(CC) $$(pkg-config --cflags iot_ota_static) $$d/t.c $$(pkg-config --libs iot_ota_static) -o $$d/t-static && \
	! readelf -d $$d/t-static | grep -q 'libiot_ota' && $$d/t-static && \
	$(CC) $$(pkg-config --cflags iot_ota) $$d/t.c $$(pkg-config --libs iot_ota) -o $$d/t-shared && \
	readelf -d $$d/t-shared | grep -q 'NEEDED.*libiot_ota.so.$(SOVERSION)' && \
	LD_LIBRARY_PATH=$$d/opt/iot-ota/lib $$d/t-shared && \
	echo "check-install: SONAME libiot_ota.so.$(SOVERSION), static and shared links ok"

clean:
	rm -rf build
