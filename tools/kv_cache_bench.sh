#!/usr/bin/env bash
# Issue 22's measurements of the paged KV cache on one GPU (docs/benchmarks.md, "Paged KV
# cache at equal memory, prefix cache and chunked prefill"), each step one `jaxpp.bench`
# call on the Llama-3-8B shape with random weights:
#
#   bash tools/kv_cache_bench.sh OUT_DIR [STEPS]
#
# STEPS (default `mixed prefix`), any of:
#   mixed   docs/bench/mixed-256.jsonl, the dense cache's 64 slots of 1,280 positions
#           against pages of MIXED_BLOCKS (default 16,64) positions given the same memory (64 x 1,280
#           positions x 128 KiB = 10.74 GB), slots capped at MIXED_CAP (default 256, the
#           engine's own cap: blocks, not slots, bound what is in flight, and a decode call
#           runs only the rows in use, serve/decode_rows.py);
#   prefix  docs/bench/shared-prefix-256.jsonl (512 shared + 512 distinct tokens, 128 out)
#           with the prefix cache off, then on;
#   blocks  1,024/128 at 64 slots, the dense cache against blocks of BLOCK_SIZES (default
#           16,32,64,128) positions: decode's cost of the table by block size, at equal rows;
#   chunk   mixed-256 paged as in `mixed`, prompts prefilled whole, then in 512-token pieces;
#   grow    mixed-256 paged as in `mixed` (blocks of 64), whole reservations against
#           `--kv_grow` (admit with the prompt's blocks, grow in decode, swap out when full).
# Results go to OUT_DIR/<step>/ (the bench's results.json and .md, written after each run,
# so a step cut short keeps what it measured) and OUT_DIR/<step>.log.
set -euo pipefail
out=${1:?usage: tools/kv_cache_bench.sh OUT_DIR [STEPS]}
steps=${2:-mixed prefix}
G=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
hw=h100; [[ $G == *H200* ]] && hw=h200
mkdir -p "$out"
bench() {  # $1: step name; the rest: bench flags
  local name=$1; shift
  python -m jaxpp.bench --model=llama3-8b --hardware=$hw --layouts=pp1tp1 \
    --out="$out/$name" "$@" > "$out/$name.log" 2>&1 || tail -20 "$out/$name.log"
  tail -6 "$out/$name.log"
}
for s in $steps; do
  case $s in
    mixed)
      bench mixed_dense --workload=docs/bench/mixed-256.jsonl --block_size=0 --max_num_seqs=64
      bench mixed_paged --workload=docs/bench/mixed-256.jsonl --block_size=${MIXED_BLOCKS:-16,64} \
        --kv_cache_memory=10.74 --max_num_seqs=${MIXED_CAP:-256} ;;
    prefix)
      bench prefix --workload=docs/bench/shared-prefix-256.jsonl --max_num_seqs=64 \
        --prefix_cache=false,true ;;
    blocks)
      bench blocks --input_len=1024 --output_len=128 --num_requests=256 --max_num_seqs=64 \
        --block_size=0,${BLOCK_SIZES:-16,32,64,128} ;;
    grow)
      bench grow --workload=docs/bench/mixed-256.jsonl --block_size=64 --kv_cache_memory=10.74 \
        --max_num_seqs=${MIXED_CAP:-256} --kv_grow=false,true ;;
    chunk)
      bench chunk --workload=docs/bench/mixed-256.jsonl --block_size=64 \
        --kv_cache_memory=10.74 --max_num_seqs=${MIXED_CAP:-256} --prefill_chunk=0,512 ;;
    *) echo "unknown step $s" >&2; exit 2 ;;
  esac
done
