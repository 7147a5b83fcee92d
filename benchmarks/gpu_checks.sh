#!/usr/bin/env bash
# One call on the lent GPU machine: a plan of time-boxed steps, so a step that runs long costs only its own budget;
# their logs and JSON come back packed in LOGS/logs.tgz (LOGS: the device tool's $OUT).
#   benchmarks/gpu_checks.sh LOGS [SECONDS] [PLAN]       (SECONDS: the call's budget, default 570)
#   PLAN kernels (default): test (tests/test_kernels_gpu.py), then time the kernels (ours, each kernel against its
#        bound at 8x2048x16x128 and at the 410m model's B=1, T=16384 layer, decode, FLA at shape 0). Carry the FLA
#        wheels (.whl, see /work/.library/device/README.md) to time FLA in the same run; without them the benchmark
#        prints ours and SDPA only.
#   PLAN diagnose: localise a wrong result stage by stage, both vector paths.
#   PLAN model: the whole-model benchmark (training eager and under torch.compile, generate(), the cold start);
#   PLAN model-profile: the training profile and generate() with eager decoding (no CUDA graph).
#   PLAN tune: the dq and dk/dv kernels with and without VALUE_LOOP (value blocks of 16 and 32) at 8x2048x16x128 and
#        1x16384x16x64, each setting checked against the fp32 reference and timed per kernel.
#   PLAN compare: the training profile at B=1, T=16384, then ours against FLA and SDPA shape by shape (carry .whl and
#        .triton-autotune: FLA's tuning of the three shapes does not fit one call from scratch).
set -u
LOGS=${1:?usage: gpu_checks.sh LOGS [SECONDS] [kernels|diagnose|model|model-profile|tune|compare]}
BUDGET=${2:-570}
PLAN=${3:-kernels}
mkdir -p "$LOGS"
WORK=$(mktemp -d)  # every log and JSON, packed into LOGS/logs.tgz after each step (few files come back from a call)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

# FLA autotunes each op for minutes on a fresh machine. With TRITON_CACHE_AUTOTUNING=1 Triton keeps the results on
# disk; they come back in LOGS/autotune.tgz. Those of earlier calls are kept in benchmarks/triton-autotune-h200/ (see
# its README); unpacked into .triton-autotune/ (ignored by git; name it in the call's carry) a call's results serve
# the next call too: `mkdir -p .triton-autotune && tar xzf .../autotune.tgz -C .triton-autotune`.
export TRITON_CACHE_AUTOTUNING=1 TRITON_CACHE_DIR=/tmp/triton-cache
mkdir -p "$TRITON_CACHE_DIR"
for kept in benchmarks/triton-autotune-h200 .triton-autotune; do
  [ -d "$kept" ] && cp -r "$kept"/. "$TRITON_CACHE_DIR/"
done
rm -f "$TRITON_CACHE_DIR/README.md"

step() {  # step NAME SECONDS COMMAND...: run within its limit and what is left of the budget
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - SECONDS - 10 ))
  (( left < limit )) && limit=$left
  if (( limit < 20 )); then echo "== $name: skipped (budget spent)"; return; fi
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  echo "== $name: rc=$? after $SECONDS s; last lines:"
  tail -n 6 "$WORK/$name.log"
  tar czf "$LOGS/logs.tgz" -C "$WORK" .
  (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' -print0 | tar czf "$LOGS/autotune.tgz" --null -T -)
}

nvidia-smi -L
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
if [ "$PLAN" = model ]; then
  step model_train 180 python3 benchmarks/model.py --sections train --json "$WORK/model_train.json"
  step model_train_compiled 240 python3 benchmarks/model.py --sections train --compile --json \
    "$WORK/model_train_compiled.json"
  step model_generate 100 python3 benchmarks/model.py --sections generate --json "$WORK/model_generate.json"
  step model_cold 70 python3 benchmarks/model.py --sections cold --decays mamba2:vector --json "$WORK/model_cold.json"
  exit 0
fi
if [ "$PLAN" = model-profile ]; then
  step model_profile 80 python3 benchmarks/model.py --sections profile --decays mamba2:vector,simple:scalar \
    --json "$WORK/model_profile.json"
  step model_generate_eager 150 python3 benchmarks/model.py --sections generate --ours-overrides \
    decode_cuda_graphs=False --json "$WORK/model_generate_eager.json"
  exit 0
fi
if [ "$PLAN" = tune ]; then
  for shape in 8,2048,16,128 1,16384,16,64; do
    step "tune_$shape" 240 python3 benchmarks/tune_chunk_kernels.py --shape "$shape" --kinds vector,scalar \
      --block_v 16,32 --warps 8 --stages 2 --value-loop 0,1 --json "$WORK/tune_$shape.json"
  done
  exit 0
fi
if [ "$PLAN" = compare ]; then
  step model_profile_16k 110 python3 benchmarks/model.py --sections profile --train-shapes 1x16384 \
    --decays mamba2:vector,simple:scalar --json "$WORK/model_profile_16k.json"
  for shape in 0 1 2; do
    step "bench_fla$shape" 200 python3 benchmarks/bench_kernels.py --only chunk --shape "$shape" --no-check \
      --json "$WORK/chunk_fla$shape.json"
  done
  exit 0
fi
case $PLAN in
  kernels|diagnose) ;;
  *) echo "unknown plan $PLAN (kernels, diagnose, model, model-profile, tune or compare)"; exit 2;;
esac
if [ "$PLAN" = diagnose ]; then
  step diagnose 150 python3 benchmarks/diagnose_chunk_kernels.py --length 200 --dims 128 --dtypes bfloat16,float32 \
    --warps 8 --reload 1 --whole-chunks 1,0
  exit 0
fi
step gpu_tests 300 python3 -m pytest tests/test_kernels_gpu.py -q -rP -n 14 -p no:cacheprovider
step bench_ours 120 python3 benchmarks/bench_kernels.py --only chunk --no-check --no-fla --json "$WORK/chunk_ours.json"
step roofline 60 python3 benchmarks/tune_chunk_kernels.py --roofline --kinds vector,scalar
step roofline_model16k 60 python3 benchmarks/tune_chunk_kernels.py --roofline --kinds vector,scalar \
  --shape 1,16384,16,64
step bench_decode 60 python3 benchmarks/bench_kernels.py --only decode --no-check --json "$WORK/decode.json"
# FLA autotunes every op at every shape (minutes each on a cold machine): what the budget allows, shape 0 first
step bench_fla0 240 python3 benchmarks/bench_kernels.py --only chunk --shape 0 --no-check --json "$WORK/chunk_fla0.json"
