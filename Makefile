# medsamix.h - build, test and install.
#   make            tools and examples into build/
#   make test       every test (installs missing Debian packages first)
#   make asan       the tests under AddressSanitizer + UBSan
#   make demo       the main job: MedSAMix on the embedded demo world
#   make bench      benchmarks (not tests)
#   make NATIVE=1   any of the above built for this CPU (-march=native)
#   make fuzz       libFuzzer harnesses (clang), FUZZ_SECONDS each
#   make mpi        build/medsamix-mpi and examples/search_mpi.c (Open MPI's mpicc)
#   make install PREFIX=/usr/local DESTDIR=

CC      ?= gcc
CXX     ?= g++
# The header needs no ISA flags (its AVX2 paths are behind __AVX2__ /
# __FMA__ with plain-C fallbacks, and oneDNN picks its kernels at run time).
# On x86-64 the default is x86-64-v3 (AVX2 + FMA: every x86-64 server CPU
# since Haswell / Zen 1), which keeps SAM's AVX2 softmax/GELU/bf16-rounding
# kernels; ARCH= builds for any x86-64, NATIVE=1 for this CPU only.
ifeq ($(NATIVE),1)
ARCH    ?= -march=native
else ifeq ($(shell uname -m),x86_64)
ARCH    ?= -march=x86-64-v3
else
ARCH    ?=
endif
OPT     ?= -O2
WARN     = -Wall -Wextra -Wpedantic -Werror
CFLAGS  ?= -std=c99 $(OPT) $(ARCH) -g
ALLCFLAGS = $(CFLAGS) $(WARN) -fopenmp -I. $(NIFTI_CFLAGS)
NIFTI_CFLAGS ?= -I/usr/include/nifti
LDLIBS   = -ldnnl -lstb -lnifti2 -lznz -lz -lm
PREFIX  ?= /usr/local
BUILD   ?= build
FUZZ_SECONDS ?= 60
TEST_ENV ?=
JOBS    ?= $(shell nproc 2>/dev/null || echo 2)

HDR      = medsamix.h
TOOL_SRC = tools/medsamix.c $(wildcard tools/cmd_*.c)
TESTS    = $(patsubst tests/%.c,$(BUILD)/tests/%,$(wildcard tests/test_*.c))
# Embedding: the header split over two translation units, and two private
# MEDSAMIX_STATIC copies linked into one program.
EMBED    = $(BUILD)/tests/test_embed_two_tu $(BUILD)/tests/test_embed_static
EXAMPLES = $(patsubst examples/%.c,$(BUILD)/examples/%,$(wildcard examples/*.c))

.PHONY: all deps test test-run check asan cxx-check bench demo fuzz install clean mpi

all: $(BUILD)/medsamix $(EXAMPLES)

deps:
	@sh tools/ensure-deps.sh

MPICC   ?= mpicc
MPI_SRC  = tools/medsamix-mpi.c tools/cmd_search.c tools/cmd_common.c

# The MPI driver (the header stays free of MPI): only this target needs Open MPI.
mpi:
	@MSX_MPI=1 sh tools/ensure-deps.sh
	@$(MAKE) --no-print-directory $(BUILD)/medsamix-mpi

$(BUILD)/medsamix-mpi: $(MPI_SRC) tools/cli.h $(HDR)
	@mkdir -p $(dir $@)
	OMPI_CC=$(CC) $(MPICC) $(ALLCFLAGS) -pthread -o $@ $(MPI_SRC) $(LDLIBS)

$(BUILD)/mpi/search_mpi: examples/mpi/search_mpi.c $(HDR)
	@mkdir -p $(dir $@)
	OMPI_CC=$(CC) $(MPICC) $(ALLCFLAGS) -pthread -o $@ $< $(LDLIBS)

$(BUILD)/medsamix: $(TOOL_SRC) tools/cli.h $(HDR)
	@mkdir -p $(dir $@)
	$(CC) $(ALLCFLAGS) -o $@ $(TOOL_SRC) $(LDLIBS)

$(BUILD)/examples/%: examples/%.c $(HDR)
	@mkdir -p $(dir $@)
	$(CC) $(ALLCFLAGS) -o $@ $< $(LDLIBS)

$(BUILD)/tests/%: tests/%.c $(wildcard tests/*.h) $(HDR)
	@mkdir -p $(dir $@)
	$(CC) $(ALLCFLAGS) -o $@ $< $(LDLIBS)

$(BUILD)/tests/test_embed_two_tu: tests/embed/two_tu_impl.c tests/embed/two_tu_main.c $(HDR)
	@mkdir -p $(dir $@)
	$(CC) $(ALLCFLAGS) -o $@ tests/embed/two_tu_impl.c tests/embed/two_tu_main.c $(LDLIBS)

$(BUILD)/tests/test_embed_static: tests/embed/static_a.c tests/embed/static_b.c $(HDR)
	@mkdir -p $(dir $@)
	$(CC) $(ALLCFLAGS) -o $@ tests/embed/static_a.c tests/embed/static_b.c $(LDLIBS)

# The header must compile as C99 and as C++ (declarations and implementation).
cxx-check: $(HDR)
	@mkdir -p $(BUILD)
	printf '#define MEDSAMIX_IMPLEMENTATION\n#include "medsamix.h"\nint main(void){return 0;}\n' > $(BUILD)/cxx_check.cpp
	$(CXX) -std=c++11 $(OPT) $(WARN) -fopenmp -I. $(NIFTI_CFLAGS) -c $(BUILD)/cxx_check.cpp -o $(BUILD)/cxx_check.o
	cp $(BUILD)/cxx_check.cpp $(BUILD)/c_check.c
	$(CC) -std=c99 $(OPT) $(WARN) -fopenmp -I. $(NIFTI_CFLAGS) -c $(BUILD)/c_check.c -o $(BUILD)/c_check.o
	@echo "cxx-check: header compiles as C99 and C++11"

test: deps
	@$(MAKE) --no-print-directory test-run

# Builds in parallel (each test compiles the whole header), then runs.
# build/medsamix-mpi too when Open MPI is installed (tests/test_mpi.c skips otherwise).
MPI_TEST_BIN ?= $(if $(shell command -v $(MPICC) 2>/dev/null),$(BUILD)/medsamix-mpi)

test-run:
	@$(MAKE) --no-print-directory -j$(JOBS) cxx-check $(TESTS) $(EMBED) $(BUILD)/medsamix $(EXAMPLES) $(MPI_TEST_BIN)
	@$(TEST_ENV) sh tools/run-tests.sh $(BUILD) $(TESTS) $(EMBED)

check: test

asan: deps
	@$(MAKE) --no-print-directory BUILD=build-asan OPT="-O1" \
	  CFLAGS="-std=c99 -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined" \
	  TEST_ENV="MSX_ASAN=1 ASAN_OPTIONS=detect_leaks=1" MPI_TEST_BIN= test-run

bench: deps $(BUILD)/medsamix
	$(BUILD)/medsamix bench
	$(BUILD)/medsamix bench-merge
	$(BUILD)/medsamix bench-opt

demo: deps
	@$(MAKE) --no-print-directory $(BUILD)/medsamix $(EXAMPLES)
	@sh tools/demo.sh $(BUILD)

fuzz: deps
	@sh tools/fuzz.sh $(FUZZ_SECONDS)

install: medsamix.h
	install -d $(DESTDIR)$(PREFIX)/include $(DESTDIR)$(PREFIX)/lib/pkgconfig $(DESTDIR)$(PREFIX)/bin
	install -m 644 medsamix.h $(DESTDIR)$(PREFIX)/include/medsamix.h
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@VERSION@|'`sed -n 's/^#define MSX_VERSION_STRING "\(.*\)"/\1/p' medsamix.h | head -1`'|' tools/medsamix.pc.in > $(DESTDIR)$(PREFIX)/lib/pkgconfig/medsamix.pc
	if [ -x $(BUILD)/medsamix ]; then install -m 755 $(BUILD)/medsamix $(DESTDIR)$(PREFIX)/bin/medsamix; fi

clean:
	rm -rf build build-asan
