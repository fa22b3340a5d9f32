#!/usr/bin/env bash
# Reproduces the README's CPU performance table: protembed's whole `embed` command (start-up, model
# load and HDF5 write included) against the peer harnesses in ../shared/bench, in one run on one
# machine, with random weights of the real shapes (speed does not depend on the values).
# Usage: bash scripts/bench_readme.sh [OUT_DIR]   (default bench-results/); takes ~30 minutes on 2 cores.
# Peers: Hugging Face (sorted and naive batching) always; fair-esm when `import esm` works
# (pip install fair-esm); esm-cpp when ESMCPP_PYTHON names a Python that has esm-cpp (it needs
# numpy < 2, so its own venv: see scripts/bench_esmcpp.py).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-results}
BENCH=../shared/bench
mkdir -p "$OUT" "$OUT/ckpt"
export BENCH_RESULTS=$OUT
python "$BENCH/bench_peak.py" --seconds 2 > "$OUT/peak.jsonl"  # torch.matmul: MKL for fp32
python -c "import json, torch; from protembed.peaks import measure_peak as m; p = m(torch.device('cpu'), torch.float32)
print(json.dumps({'peak_gflops_fp32': round(p.tflops * 1e3, 1), 'source': p.source}))" > "$OUT/peak-protembed.json"

run_protembed() {  # model fasta dtype extra...
  local model=$1 fasta=$2 dtype=$3; shift 3
  local tag="$model-$(basename "$fasta" .fasta)-$dtype${TAG:+-$TAG}"
  /usr/bin/time -f '{"wall_s": %e, "max_rss_kb": %M}' -o "$OUT/$tag.time" \
    protembed embed "$fasta" --model "$OUT/ckpt/$model" -o "$OUT/$tag.h5" --overwrite --dtype "$dtype" \
    --json --quiet "$@" > "$OUT/$tag.json"
  echo "$tag $(cat "$OUT/$tag.time") $(python -c "import json;d=json.load(open('$OUT/$tag.json'));print(d['elapsed_s'], d['residues_per_s'])")"
}

for spec in "esm2-8m 8M realistic256" "esm2-35m 35M realistic256" "esm2-150m 150M realistic64"; do
  set -- $spec
  model=$1 hf=$2 fasta=$BENCH/$3.fasta
  python scripts/random_checkpoint.py "$model" "$OUT/ckpt/$model" > /dev/null
  python "$BENCH/bench_hf.py" "$fasta" --model "$hf" --batching sorted --toks-per-batch 4096 --attn sdpa \
    --repeats 2 > "$OUT/hf-$hf-$3-fp32.json"
  python "$BENCH/bench_hf.py" "$fasta" --model "$hf" --batching sorted --toks-per-batch 4096 --attn sdpa \
    --repeats 1 --bf16 > "$OUT/hf-$hf-$3-bf16.json"
  python "$BENCH/bench_hf.py" "$fasta" --model "$hf" --batching naive --attn sdpa \
    --repeats 1 > "$OUT/hf-$hf-$3-naive.json"
  if python -c "import esm" 2> /dev/null; then
    python "$BENCH/bench_fairesm.py" "$fasta" --model "$hf" --repeats 1 > "$OUT/fairesm-$hf-$3.json"
  fi
  if [ -n "${ESMCPP_PYTHON:-}" ]; then
    "$ESMCPP_PYTHON" scripts/bench_esmcpp.py "$fasta" "$OUT/ckpt/$model" --repeats 1 > "$OUT/esmcpp-$hf-$3.json"
  fi
  run_protembed "$model" "$fasta" float32
  run_protembed "$model" "$fasta" bfloat16
done
# data-parallel machinery: 1 worker vs 2 CPU workers, one thread each
OMP_NUM_THREADS=1 TAG=inprocess run_protembed esm2-35m "$BENCH/realistic256.fasta" float32 --device cpu
OMP_NUM_THREADS=1 TAG=1worker run_protembed esm2-35m "$BENCH/realistic256.fasta" float32 --device cpu:1
OMP_NUM_THREADS=1 TAG=2workers run_protembed esm2-35m "$BENCH/realistic256.fasta" float32 --device cpu:2
python scripts/bench_report.py "$OUT"
