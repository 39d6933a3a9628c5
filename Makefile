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
LDFLAGS     ?= -Wl,--gc-sections -Wl,-z,noexecstack -s
# `lean` compiles out the SDK's log statements, which a C program could never
# see (it cannot install a Rust logger): about 70 KB smaller.
FEATURES    ?= lean

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

.PHONY: all libs headers pkgconfig example test-c size clean

all: libs headers pkgconfig example

# cargo decides what is stale; always ask it.
libs:
	$(CARGO) build -p iot-ota-ffi --lib --profile $(PROFILE) --features "$(FEATURES)"
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

clean:
	rm -rf build
