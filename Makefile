# One documented line per target. `make test` is the README's (and CI's) test command.
.PHONY: install-dev test test-py test-threads test-rust lint bench fuzz-smoke

# Build the extension in place (editable): replaces any stale _core*.so under python/wsgate/.
install-dev:
	rm -f python/wsgate/_core*.so
	python -m pip install -q -e '.[test,pipecat]'

# Everything CI runs: build, Python tests on asyncio and trio, Rust tests, linters and types.
test: install-dev test-rust test-py test-threads lint fuzz-smoke

# pytest on real sockets (both anyio backends).
test-py:
	python -m pytest -q

# The relay's tests again with another relay thread count than the default (half the CPUs: one
# on CI's two), so that every one passes with one thread and with sessions spread over several.
RELAY_TESTS = relay_messages relay_close split_frames limits hostile tls inprocess session_control embed engine_twilio
test-threads:
	WSGATE_RELAY_THREADS=3 python -m pytest -q $(RELAY_TESTS:%=tests/test_%.py)

# Plain-Rust tests, no interpreter needed.
test-rust:
	cargo test -q --no-default-features

# ruff, mypy --strict, the stub checked against the built module, clippy.
lint:
	python -m ruff check .
	python -m ruff format --check .
	python -m mypy
	python -m mypy.stubtest wsgate._core
	cargo fmt --check
	cargo clippy -q --all-targets --no-default-features -- -D warnings
	cargo clippy -q --all-targets -- -D warnings

# cargo-fuzz smoke: every target, 20,000 inputs from its seeds (see fuzz/README.md). cargo-fuzz
# needs -Zsanitizer, which the stable toolchain takes with RUSTC_BOOTSTRAP=1.
FUZZ_TARGETS = frame_header session_stream token_verify token_claims token_mutate body_decode provider_opening
fuzz-smoke:
	command -v cargo-fuzz >/dev/null || cargo install -q cargo-fuzz --locked
	cd fuzz && for t in $(FUZZ_TARGETS); do \
	  log=$$(mktemp); \
	  RUSTC_BOOTSTRAP=1 cargo fuzz run $$t "$$(mktemp -d)" corpus/$$t -- \
	    -runs=20000 -max_len=17000 >$$log 2>&1 || { cat $$log; exit 1; }; \
	  echo "$$t: $$(tail -n 1 $$log)"; \
	done

# pytest-benchmark functions (the load bench is `python benches/load.py`, see benches/README.md).
bench:
	python -m pytest benches -q --benchmark-only
