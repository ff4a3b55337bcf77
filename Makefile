# Two commands on a fresh machine:
#   make demo   installs the toolchain, fetches all-MiniLM-L6-v2 into models/ if missing, builds,
#               embeds a handful of sentences (GPU if there is one, else CPU) and prints their
#               cosine-similarity matrix
#   make test   installs the toolchain and runs every test (GPU tests print SKIPPED without a GPU),
#               then the CPU-only build's library and CLI tests
# `make demo-kernels` is the kernels' demo: `cuattn info`, then `cuattn check` (needs a GPU).
# `make finetune-demo` fine-tunes all-MiniLM-L6-v2 on data/sentiment (CPU, a few minutes),
#               prints the held-out accuracy and classifies a few new sentences.
CARGO ?= cargo

.PHONY: demo demo-kernels finetune-demo minilm test toolchain lint bundle bench clean-toolchain c-example header

toolchain:
	bash scripts/install-cuda-toolchain.sh

minilm:
	bash scripts/fetch-minilm.sh

demo: toolchain minilm
	$(CARGO) build --release --bin cuattn
	./target/release/cuattn embed --model models/all-MiniLM-L6-v2 --similarity \
	  "A man is eating food." \
	  "A man is eating a piece of bread." \
	  "The girl is carrying a baby." \
	  "A man is riding a horse." \
	  "A woman is playing violin." \
	  "A monkey is playing drums."

demo-kernels: toolchain
	$(CARGO) build --release --features testing --bin cuattn
	./target/release/cuattn info
	@./target/release/cuattn check; rc=$$?; \
	  if [ $$rc -eq 3 ]; then echo "(no CUDA device here: cuattn check runs on a machine with a GPU)"; \
	  else exit $$rc; fi

FINETUNE_OUT ?= target/finetune-demo

finetune-demo: minilm
	$(CARGO) build --release --no-default-features --bin cuattn
	./target/release/cuattn finetune --device cpu --overwrite \
	  --model models/all-MiniLM-L6-v2 \
	  --train data/sentiment/train.tsv --eval data/sentiment/test.tsv \
	  --out $(FINETUNE_OUT)
	./target/release/cuattn classify --device cpu --model $(FINETUNE_OUT) \
	  "The waiter was charming and the soup was superb." \
	  "I waited forty minutes and the pizza arrived cold." \
	  "A clever, heartfelt film with a wonderful cast." \
	  "The charger stopped working after a week." \
	  "Our guide made the whole tour a delight."

# `testing`: the test scaffolding (check, twin, tolerance, bench, runtime::conformance) the
# suites and the CLI's check/bench need; an embedder's build leaves it off.
test: toolchain
	$(CARGO) test --release --features testing
	@# The CPU-only build (--no-default-features): every suite above already ran the same CPU
	@# code, so this pass runs what the feature changes: the library's unit tests and every
	@# suite that drives the `cuattn` binary (CLI commands, hostile inputs), which now has no
	@# GPU layer at all. (clippy --no-default-features --all-targets compiles the rest.)
	$(CARGO) test --release --no-default-features --features testing --lib --bins --test 'cli_*' --test hostile_inputs
	@# The CPU-only pass left its binary in target/release/cuattn: put the CUDA one back
	@# (nothing recompiles, the CUDA build is still current), and check that it is back.
	$(CARGO) build --release --features testing --bin cuattn
	@./target/release/cuattn info | grep -qx 'features: cuda' || { \
	  echo "make test: target/release/cuattn was not built with the cuda feature:"; \
	  ./target/release/cuattn info | head -n 3; exit 1; }
	@echo "make test: target/release/cuattn has the cuda feature"

lint: toolchain
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets --features testing -- -D warnings
	$(CARGO) clippy --no-default-features --all-targets --features testing -- -D warnings
	$(CARGO) clippy --lib -- -D warnings

bundle: toolchain
	bash scripts/gpu-bundle.sh

bench: toolchain
	$(CARGO) run --release --features testing -- bench layernorm

clean-toolchain:
	rm -rf .toolchain

# The C ABI: builds capi/ (libcuattn_c.so and .a), compiles examples/c/attention.c against
# include/cuattn.h, and runs it (CPU reference always; the GPU part when there is a device).
c-example: toolchain
	$(CARGO) build --release -p cuattn-capi
	$(CC) -std=c11 -O2 -Wall -Wextra -Werror -Iinclude examples/c/attention.c \
	  -Ltarget/release -lcuattn_c -lm -o target/release/attention_c
	LD_LIBRARY_PATH=target/release ./target/release/attention_c

# Regenerates include/cuattn.h from capi/src/lib.rs (cbindgen); CI checks it is up to date.
header:
	CUATTN_BLESS=1 $(CARGO) test --release -p cuattn-capi --test header
