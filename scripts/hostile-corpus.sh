#!/usr/bin/env bash
# Adversarial corpus for the `cuattn` binary: malformed model folders, hostile inputs and
# flags, by category. Every case states what a correct program does: `E` (a clean error: exit
# status 1-3, an `error:` line on stderr, no panic) or `O` (success, checked by the case), and
# every run is bounded (time and peak memory; a run over either fails the case).
#
#   scripts/hostile-corpus.sh [BIN]     (default target/release/cuattn)
#   TIME_S (60), RSS_MB (1500), VMEM_MB (6000): per-case limits; ONLY=REGEX: a subset.
#
# Needs models/all-MiniLM-L6-v2 (scripts/fetch-minilm.sh) and tests/fixtures/tiny-gpt2; CPU only.
# Prints one line per case and a table of passed/failed cases per category.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin="$(realpath "${1:-target/release/cuattn}")"
minilm="$PWD/models/all-MiniLM-L6-v2"
gpt2="$PWD/tests/fixtures/tiny-gpt2"
[ -x "$bin" ] || { echo "hostile-corpus: $bin not found"; exit 2; }
[ -f "$minilm/model.safetensors" ] || { echo "hostile-corpus: run scripts/fetch-minilm.sh"; exit 2; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
TIME_S=${TIME_S:-60}
RSS_MB=${RSS_MB:-1500}
VMEM_MB=${VMEM_MB:-6000}
declare -A pass fail
failed_cases=()

# A copy of a model folder (small files copied, the checkpoint linked) to corrupt.
clone() { # SRC NAME
    local d="$work/$2"
    mkdir -p "$d"
    for f in "$1"/*; do
        if [ "$(basename "$f")" = model.safetensors ]; then ln -s "$f" "$d/"; else cp -r "$f" "$d/"; fi
    done
    echo "$d"
}
# Edits a JSON file in place with a jq filter.
jqset() { jq "$2" "$1" > "$1.new" && mv "$1.new" "$1"; }

# run CATEGORY NAME EXPECT CHECK -- COMMAND...   (CHECK: shell code run on success, sees
# $out/$err; `true` for none). The command runs with stdout in $out and stderr in $err.
run() {
    local cat=$1 name=$2 expect=$3 check=$4; shift 5
    # ONLY=REGEX runs just the cases whose "category/name" matches (e.g. to rerun timeouts).
    if [ -n "${ONLY:-}" ] && ! [[ "$cat/$name" =~ $ONLY ]]; then return; fi
    local out="$work/out" err="$work/err" tm="$work/time"
    # Address space capped too, so a runaway allocation fails here rather than on the machine.
    (ulimit -v $((VMEM_MB * 1024)); timeout "$TIME_S" /usr/bin/time -o "$tm" -f %M "$@" > "$out" 2> "$err")
    local rc=$?
    local rss_kb; rss_kb=$(tail -1 "$tm" 2>/dev/null); [[ "$rss_kb" =~ ^[0-9]+$ ]] || rss_kb=0
    local rss=$((rss_kb / 1024)) verdict=ok why=""
    if grep -q "panicked" "$err"; then verdict=bad; why="panic"
    elif [ "$rc" -ge 124 ]; then verdict=bad; why="killed/timeout (rc $rc)"
    elif [ "$rss" -gt "$RSS_MB" ]; then verdict=bad; why="peak RSS ${rss} MB"
    elif [ "$expect" = E ]; then
        if [ "$rc" -eq 0 ]; then verdict=bad; why="exit 0 (accepted)"
        elif ! grep -q "error" "$err"; then verdict=bad; why="rc $rc without an error line"
        fi
    else
        if [ "$rc" -ne 0 ]; then verdict=bad; why="rc $rc: $(head -c 200 "$err" | tr '\n' ' ')"
        elif ! (eval "$check") > /dev/null 2>&1; then verdict=bad; why="wrong output"
        fi
    fi
    if [ "$verdict" = ok ]; then pass[$cat]=$((${pass[$cat]:-0} + 1)); else fail[$cat]=$((${fail[$cat]:-0} + 1)); failed_cases+=("$cat/$name"); fi
    printf '%-6s %-10s %-44s %-4s rc=%-3s %5s MB %s\n' "$verdict" "$cat" "$name" "$expect" "$rc" "$rss" "$why"
}

# ---- config: every field type- and range-checked before anything is allocated
for case in 'num_hidden_layers=1000000000' 'num_hidden_layers=1000000000000000000' \
    'layer_norm_eps=-1' 'hidden_act=5' 'hidden_size="384"' 'vocab_size=1000000000000000' \
    'max_position_embeddings=1000000000000' 'intermediate_size=0' 'num_attention_heads=-3' \
    'type_vocab_size=1e18' 'layer_norm_eps=1e300'; do
    d=$(clone "$minilm" "cfg-$RANDOM"); jqset "$d/config.json" ".${case}"
    run config "bert $case" E true -- "$bin" embed --device cpu --model "$d" "hello"
done
d=$(clone "$minilm" cfg-zero); rm "$d/config.json"; ln -s /dev/zero "$d/config.json"
run config "bert config.json -> /dev/zero" E true -- "$bin" embed --device cpu --model "$d" "hello"
d=$(clone "$minilm" cfg-bigfile); head -c 300000000 /dev/zero | tr '\0' ' ' > "$d/config.json"
run config "bert config.json of 300 MB" E true -- "$bin" embed --device cpu --model "$d" "hello"
d=$(clone "$minilm" cfg-st); jqset "$d/sentence_bert_config.json" '.max_seq_length="x"'
run config "sentence_bert max_seq_length string" E true -- "$bin" embed --device cpu --model "$d" "hello"
for case in 'n_layer=1000000000000000000' 'n_layer=1000000000' 'layer_norm_epsilon=-1' \
    'activation_function=7' 'n_positions=1000000000000' 'n_inner=1000000000000' \
    'eos_token_id=99999999999' 'vocab_size=1000000000000'; do
    d=$(clone "$gpt2" "g-$RANDOM"); jqset "$d/config.json" ".${case}"
    run config "gpt2 $case" E true -- "$bin" generate --device cpu --model "$d" --prompt hi --max-new-tokens 2
done

# ---- checkpoint: the safetensors reader
d=$(clone "$minilm" ck-trunc); rm "$d/model.safetensors"; head -c 1000000 "$minilm/model.safetensors" > "$d/model.safetensors"
run checkpoint "truncated" E true -- "$bin" embed --device cpu --model "$d" "hello"
d=$(clone "$minilm" ck-hdr); rm "$d/model.safetensors"; printf '\xff\xff\xff\xff\xff\xff\xff\x7f{}' > "$d/model.safetensors"
run checkpoint "header length 2^63" E true -- "$bin" embed --device cpu --model "$d" "hello"
d=$(clone "$minilm" ck-rand); rm "$d/model.safetensors"; head -c 4096 /dev/urandom > "$d/model.safetensors"
run checkpoint "random bytes" E true -- "$bin" embed --device cpu --model "$d" "hello"
d=$(clone "$minilm" ck-empty); rm "$d/model.safetensors"; : > "$d/model.safetensors"
run checkpoint "empty file" E true -- "$bin" embed --device cpu --model "$d" "hello"
d=$(clone "$minilm" ck-zero); rm "$d/model.safetensors"; ln -s /dev/zero "$d/model.safetensors"
run checkpoint "model.safetensors -> /dev/zero" E true -- "$bin" embed --device cpu --model "$d" "hello"
d=$(clone "$minilm" ck-dir); rm "$d/model.safetensors"; mkdir "$d/model.safetensors"
run checkpoint "model.safetensors is a folder" E true -- "$bin" embed --device cpu --model "$d" "hello"

# ---- non-finite numbers: weights that make NaN/Inf outputs
nan_weights() { # SRC DST DTYPE-VALUE(bytes as printf escape) TENSOR
    python3 - "$1" "$2" "$3" "$4" <<'EOF'
import json, struct, sys, shutil
src, dst, val, name = sys.argv[1:]
data = open(src, 'rb').read()
n = struct.unpack('<Q', data[:8])[0]
hdr = json.loads(data[8:8 + n])
lo, hi = hdr[name]['data_offsets']
buf = bytearray(data)
f = struct.pack('<f', float(val))
for i in range(8 + n + lo, 8 + n + hi, 4):
    buf[i:i + 4] = f
open(dst, 'wb').write(bytes(buf))
EOF
}
d=$(clone "$minilm" nf-nan); rm "$d/model.safetensors"
nan_weights "$minilm/model.safetensors" "$d/model.safetensors" nan encoder.layer.0.output.dense.bias
run nonfinite "bert NaN bias -> embed" E true -- "$bin" embed --device cpu --model "$d" "hello"
d=$(clone "$minilm" nf-inf); rm "$d/model.safetensors"
nan_weights "$minilm/model.safetensors" "$d/model.safetensors" inf embeddings.LayerNorm.bias
run nonfinite "bert +Inf bias -> embed --json" E true -- "$bin" embed --device cpu --model "$d" --json "hello"
d=$(clone "$gpt2" nf-gnan); rm "$d/model.safetensors"
nan_weights "$gpt2/model.safetensors" "$d/model.safetensors" nan transformer.h.0.mlp.c_fc.bias
run nonfinite "gpt2 NaN bias -> generate" E true -- "$bin" generate --device cpu --model "$d" --prompt hi --max-new-tokens 2
run nonfinite "gpt2 NaN bias -> sampling" E true -- "$bin" generate --device cpu --model "$d" --prompt hi --max-new-tokens 2 --temperature 1

# ---- model-folder paths: nothing outside the folder
# A pooling config outside the folder that a module path reaches: reading it is the escape.
mkdir -p "$work/outside"; cp "$minilm/1_Pooling/config.json" "$work/outside/"
d=$(clone "$minilm" p-up); jqset "$d/modules.json" '.[1].path="../outside"'
run paths "modules.json pooling ../outside" E true -- "$bin" embed --device cpu --model "$d" "hello"
d=$(clone "$minilm" p-abs); jqset "$d/modules.json" ".[1].path=\"$work/outside\""
run paths "modules.json pooling /abs/outside" E true -- "$bin" embed --device cpu --model "$d" "hello"
d=$(clone "$minilm" p-tokz); rm "$d/tokenizer.json"; ln -s /dev/zero "$d/tokenizer.json"
run paths "tokenizer.json -> /dev/zero" E true -- "$bin" embed --device cpu --model "$d" "hello"
d=$(clone "$minilm" p-modz); rm "$d/modules.json"; ln -s /dev/zero "$d/modules.json"
run paths "modules.json -> /dev/zero" E true -- "$bin" embed --device cpu --model "$d" "hello"
d=$(clone "$minilm" p-tokg); head -c 3000 /dev/urandom > "$d/tokenizer.json"
run paths "tokenizer.json random bytes" E true -- "$bin" embed --device cpu --model "$d" "hello"
d=$(clone "$gpt2" p-vocab); echo '{"a": 0}' > "$d/vocab.json"; ln -s /dev/zero "$d/merges.txt"
run paths "gpt2 merges.txt -> /dev/zero" E true -- "$bin" generate --device cpu --model "$d" --prompt hi --max-new-tokens 2

# ---- output: a closed pipe ends quietly, other write errors are one error line
python3 -c "
for i in range(1000): print('sentence number', i)" > "$work/many.txt"
run output "embed | head -c 10" O '[ ! -s "$err" ]' -- bash -c "'$bin' embed --device cpu --model '$minilm' --input '$work/many.txt' | head -c 10; exit \${PIPESTATUS[0]}"
run output "info | true" O '[ ! -s "$err" ]' -- bash -c "'$bin' info | true; exit \${PIPESTATUS[0]}"
run output "generate | head -c 1" O '[ ! -s "$err" ]' -- bash -c "'$bin' generate --device cpu --model '$gpt2' --prompt hi --max-new-tokens 20 | head -c 1; exit \${PIPESTATUS[0]}"
run output "embed > /dev/full" E true -- bash -c "'$bin' embed --device cpu --model '$minilm' hello > /dev/full"
run output "info > /dev/full" E true -- bash -c "'$bin' info > /dev/full"
run output "generate > /dev/full" E true -- bash -c "'$bin' generate --device cpu --model '$gpt2' --prompt hi --max-new-tokens 2 > /dev/full"

# ---- inputs: memory bounded by model and batch, whatever the input
run input "--input /dev/zero" E true -- "$bin" embed --device cpu --model "$minilm" --input /dev/zero
python3 -c "print('word ' * 4000000)" > "$work/long.txt"
run input "one 20 MB line" O 'grep -q "truncated" "$err"' -- "$bin" embed --device cpu --model "$minilm" --input "$work/long.txt"
run input "--batch-size 100000, 1000 lines" O '[ $(wc -l < "$out") -eq 1000 ]' -- "$bin" embed --device cpu --model "$minilm" --batch-size 100000 --input "$work/many.txt"
run input "--batch-size 0" E true -- "$bin" embed --device cpu --model "$minilm" --batch-size 0 hello
run input "no sentences" E true -- "$bin" embed --device cpu --model "$minilm" --input /dev/null
args=(); for i in $(seq 1 10000); do args+=(--prompt "p$i"); done
run input "10000 prompts" O '[ $(wc -l < "$out") -ge 10000 ]' -- "$bin" generate --device cpu --model "$gpt2" --max-new-tokens 2 "${args[@]}"
printf 'ok\n\xff\xfe bad utf8\n' > "$work/bad-utf8.txt"
run input "--input not UTF-8" E true -- "$bin" embed --device cpu --model "$minilm" --input "$work/bad-utf8.txt"
run input "empty prompt (nothing to continue)" E true -- "$bin" generate --device cpu --model "$gpt2" --prompt "" --max-new-tokens 2

# ---- flags: none silently ignored
run flags "--top-k without --temperature" E true -- "$bin" generate --device cpu --model "$gpt2" --prompt hi --max-new-tokens 2 --top-k 5
run flags "--top-p without --temperature" E true -- "$bin" generate --device cpu --model "$gpt2" --prompt hi --max-new-tokens 2 --top-p 0.5
run flags "--dtype f16 --device cpu (embed)" E true -- "$bin" embed --device cpu --model "$minilm" --dtype f16 hello
# bf16 runs on the CPU (bf16 weights, f32 arithmetic); f16 has no CPU backend and is refused.
run flags "--dtype f16 --device cpu (generate)" E true -- "$bin" generate --device cpu --model "$gpt2" --prompt hi --dtype f16
run flags "--dtype bf16 --device cpu (generate) runs" O true -- "$bin" generate --device cpu --model "$gpt2" --prompt hi --max-new-tokens 2 --dtype bf16
run flags "--max-new-tokens past the context" E true -- "$bin" generate --device cpu --model "$gpt2" --prompt hi --max-new-tokens 500
run flags "--temperature -1" E true -- "$bin" generate --device cpu --model "$gpt2" --prompt hi --temperature -1
run flags "--temperature NaN" E true -- "$bin" generate --device cpu --model "$gpt2" --prompt hi --temperature NaN
run flags "bench attention --sweep" E true -- "$bin" bench attention --sweep
run flags "<|endoftext|> in a prompt is token 50256" O 'jq -e ".prompt_ids == [50256]" "$out"' -- "$bin" generate --device cpu --model "$gpt2" --prompt "<|endoftext|>" --max-new-tokens 1 --json
run flags "no-GPU exit status differs from usage (2)" O true -- bash -c "'$bin' check; rc=\$?; [ \$rc -ne 2 ] && [ \$rc -ne 0 ] && [ \$rc -ne 1 ]"
run flags "unknown flag is a usage error (2)" O true -- bash -c "'$bin' embed --frobnicate 2>/dev/null; [ \$? -eq 2 ]"

echo
printf '%-12s %6s %6s\n' category passed failed
for cat in config checkpoint nonfinite paths output input flags; do
    printf '%-12s %6s %6s\n' "$cat" "${pass[$cat]:-0}" "${fail[$cat]:-0}"
done
[ ${#failed_cases[@]} -eq 0 ]
