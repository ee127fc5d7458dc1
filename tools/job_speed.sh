#!/usr/bin/env bash
# The job's speed on one GPU against the bench's, as docs/benchmarks.md ("The job at the
# engine's speed") reports it: a Llama-3-8B-shaped random checkpoint, the shipped tickets
# repeated REPEAT times with unique ids, the job run twice (compile cache cold, then warm),
# then `jaxpp.bench` on fixed 1,024/128 requests in the same session.
#
#   bash tools/job_speed.sh OUT_DIR [REPEAT] [SLOTS] [STEPS]
#
# SLOTS 0 lets the job pick (engine.max_num_seqs=0: what memory holds); STEPS, a list of
# cold, warm, bench, workload, config, config_warm, rerun and long, says what to run
# (default cold warm bench):
# cold / warm run configs/harbor.py with the overrides below; `workload` is `jaxpp.bench
# --workload` of the job's own input at SLOTS slots (the engine on the same requests
# without the job around it); `config` runs configs/harbor_8b_1gpu.py as shipped (only the
# checkpoint, input and output set; SLOTS ignored), `config_warm` runs it again from the
# start (compile cache warm from `config`) and `rerun` repeats that command on its
# finished output (nothing left to do: the start-up of a no-op rerun); `long` runs that
# config on long documents (35 tickets each, ~6,600 tokens; LONG_DOCS of them, default 96)
# at max_len 8192 with attention=xla, then auto. BENCH_FLAGS adds flags to the bench's
# command (e.g. --decode_chunk=16, the job's chunk). Needs a GPU, ~17 GB
# of disk for the checkpoint (kept in out/llama3-8b-random between runs) and jaxpp
# importable (PYTHONPATH=. from the repo root). Logs and reports go to OUT_DIR; each job line also
# gives the peak anonymous host memory (RssAnon, sampled every 0.2 s).
set -euo pipefail
out=${1:?usage: tools/job_speed.sh OUT_DIR [REPEAT] [SLOTS] [STEPS]}
repeat=${2:-10}
slots=${3:-0}
steps=${4:-cold warm bench}
has() { [[ " $steps " == *" $1 "* ]]; }  # whether STEPS names step $1
mkdir -p "$out" out
ckpt=out/llama3-8b-random
[[ -f $ckpt/model.safetensors.index.json ]] || python tools/random_checkpoint.py \
  --model=llama3-8b --out=$ckpt --tokenizer=models/harbor-tiny | tee "$out/checkpoint.log"
python - "$repeat" <<'EOF'
import json, sys
n = int(sys.argv[1])
lines = [json.loads(l) for l in open("data/tickets.jsonl") if l.strip()]
with open("out/tickets_x%d.jsonl" % n, "w") as f:
  for r in range(n):
    for t in lines:
      f.write(json.dumps(dict(t, id=f"{t['id']}-{r}")) + "\n")
EOF
job() {  # $1: output name; $2: config; the rest: overrides. KEEP=1 keeps the output,
  # LOG=name names the logs and report copy (default: the output name), INPUT the input
  local name=$1 config=$2 log=${LOG:-$1}; shift 2
  [[ ${KEEP:-0} == 1 ]] || rm -f "out/$name.jsonl" "out/$name.errors.jsonl"
  python -m jaxpp.run --config "$config" \
    --config.model.checkpoint=$ckpt --config.job.input=${INPUT:-out/tickets_x$repeat.jsonl} \
    --config.job.output=out/$name.jsonl --config.job.progress=False "$@" \
    > "$out/$log.log" 2> "$out/$log.stderr" &
  local pid=$! peak=0 hwm=0 kb start=$SECONDS
  while kill -0 $pid 2> /dev/null; do
    kb=$(awk '/RssAnon/ {print $2}' /proc/$pid/status 2> /dev/null || echo 0)
    (( ${kb:-0} > peak )) && peak=$kb
    kb=$(awk '/VmHWM/ {print $2}' /proc/$pid/status 2> /dev/null || echo 0)
    (( ${kb:-0} > hwm )) && hwm=$kb
    sleep 0.2
  done
  wait $pid || { tail -30 "$out/$log.stderr"; return 1; }
  cp "out/$name.jsonl.report.json" "$out/$log.report.json"
  tail -15 "$out/$log.log"
  echo "$log: $((SECONDS - start)) s wall (process start to exit); host memory: peak" \
    "RssAnon $((peak / 1024)) MiB, VmHWM (file pages too) $((hwm / 1024)) MiB"
}
tuned() {  # the issue's workload on configs/harbor.py
  job "$1" configs/harbor.py --config.model.dtype=bfloat16 --config.mesh.pp=1 \
    --config.mesh.tp=1 --config.engine.max_len=1024 --config.engine.max_num_seqs=$slots \
    --config.sampling.max_new_tokens=64
}
has cold && { rm -rf ~/.cache/jaxpp/xla; tuned cold; }
has warm && tuned warm
has config && job config configs/harbor_8b_1gpu.py
has config_warm && LOG=config_warm job config configs/harbor_8b_1gpu.py
has rerun && KEEP=1 LOG=rerun job config configs/harbor_8b_1gpu.py
if has workload; then
  python -m jaxpp.bench --model=llama3-8b --hardware=h200 --layouts=pp1tp1 \
    --workload=out/tickets_x$repeat.jsonl --tokenizer=$ckpt --max_len=1024 --output_len=64 \
    --max_num_seqs=$slots --out="$out/workload" ${BENCH_FLAGS:-} > "$out/workload.log" 2>&1 \
    || tail -30 "$out/workload.log"
  tail -4 "$out/workload.log"
fi
if has long; then  # long documents: the prefill attention's case
  # LONG_DOCS documents, each 35 consecutive tickets (~6,600 tokens), through the shipped
  # 1-GPU config at max_len 8192, with XLA's attention and then with the default (auto)
  python - "${LONG_DOCS:-96}" <<'PY'
import json, sys
n = int(sys.argv[1])
lines = [json.loads(l) for l in open("data/tickets.jsonl") if l.strip()]
with open("out/long_docs.jsonl", "w") as f:
  for d in range(n):
    parts = [lines[(d * 35 + i) % len(lines)]["text"] for i in range(35)]
    f.write(json.dumps(dict(id=f"doc-{d}", text="\n\n".join(parts))) + "\n")
PY
  for attention in xla auto; do
    INPUT=out/long_docs.jsonl LOG=long_$attention job long_$attention \
      configs/harbor_8b_1gpu.py --config.engine.max_len=8192 \
      --config.engine.max_num_seqs=32 --config.job.length_policy=truncate \
      --config.model.attention=$attention
  done
fi
has bench || exit 0
python -m jaxpp.bench --model=llama3-8b --hardware=h200 --layouts=pp1tp1 --input_len=1024 \
  --output_len=128 --num_requests=256 --max_num_seqs=64 --out="$out/bench" \
  > "$out/bench.log" 2>&1 || tail -30 "$out/bench.log"
tail -4 "$out/bench.log"
