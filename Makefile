# Two commands on a fresh machine:
#   make demo   installs the toolchain, builds, prints `cuattn info` and runs `cuattn check`
#               (the check needs a GPU; without one it says so and the demo still succeeds)
#   make test   installs the toolchain and runs every test (GPU tests print SKIPPED without a GPU)
CARGO ?= cargo

.PHONY: demo test toolchain lint bundle bench clean-toolchain

toolchain:
	bash scripts/install-cuda-toolchain.sh

demo: toolchain
	$(CARGO) build --release --bin cuattn
	./target/release/cuattn info
	@./target/release/cuattn check; rc=$$?; \
	  if [ $$rc -eq 2 ]; then echo "(no CUDA device here: cuattn check runs on a machine with a GPU)"; \
	  else exit $$rc; fi

test: toolchain
	$(CARGO) test --release
	$(CARGO) test --release --no-default-features

lint: toolchain
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --no-default-features --all-targets -- -D warnings

bundle: toolchain
	bash scripts/gpu-bundle.sh

bench: toolchain
	$(CARGO) run --release -- bench layernorm

clean-toolchain:
	rm -rf .toolchain
