# mailgate: build, test, lint, bench.
CARGO ?= cargo
# command=debian-package pairs the tests and benchmarks need
TEST_PACKAGES = swaks=swaks python3=python3 redis-server=redis-server perl:Net::SSLeay=libnet-ssleay-perl fusermount3=fuse3
BENCH_PACKAGES = smtp-source=postfix smtp-sink=postfix swaks=swaks redis-server=redis-server
E2E_PACKAGES = postfix=postfix sendmail=postfix smtp-source=postfix swaks=swaks

.PHONY: build test unit lint bench deps fmt e2e fuzz

build:
	$(CARGO) build --release

deps:
	@scripts/ensure-packages.sh $(TEST_PACKAGES)

# Everything: unit tests, integration tests against the real binary over TCP, swaks, crash and
# power-cut tests (they mount examples/powercutfs; cargo test builds examples only as test harnesses).
test: deps
	$(CARGO) build --example powercutfs
	$(CARGO) test --all-targets

# End to end behind a real, private Postfix (modes A and B of DESIGN.md): needs root; one
# test at a time, each with its own Postfix, mailgate, DNS server and temporary directory.
e2e:
	@scripts/ensure-packages.sh $(E2E_PACKAGES)
	$(CARGO) test --test e2e_postfix -- --test-threads=1

unit:
	$(CARGO) test --lib

# Fuzzing (fuzz/README.md): every cargo-fuzz target for FUZZ_SECONDS each, one after the other;
# installs cargo-fuzz if missing. Crashes land in fuzz/artifacts/<target>/.
FUZZ_SECONDS ?= 600
fuzz:
	scripts/fuzz.sh $(FUZZ_SECONDS)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --test e2e_postfix -- -D warnings

fmt:
	$(CARGO) fmt --all

# Benchmarks are never timed tests: they write docs/BENCHMARKS.md.
bench:
	@scripts/ensure-packages.sh $(BENCH_PACKAGES)
	$(CARGO) build --release --bin mailgate --example loadgen --example benchdns --example deliverysink
	scripts/bench.sh
