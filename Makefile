# mailgate: build, test, lint, bench.
CARGO ?= cargo
# command=debian-package pairs the tests and benchmarks need
TEST_PACKAGES = swaks=swaks python3=python3
BENCH_PACKAGES = smtp-source=postfix smtp-sink=postfix swaks=swaks

.PHONY: build test unit lint bench deps fmt

build:
	$(CARGO) build --release

deps:
	@scripts/ensure-packages.sh $(TEST_PACKAGES)

# Everything: unit tests, integration tests against the real binary over TCP, swaks, crash test.
test: deps
	$(CARGO) test --all-targets

unit:
	$(CARGO) test --lib

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

# Benchmarks are never timed tests: they write docs/BENCHMARKS.md.
bench:
	@scripts/ensure-packages.sh $(BENCH_PACKAGES)
	$(CARGO) build --release --bin mailgate --example loadgen --example benchdns
	scripts/bench.sh
