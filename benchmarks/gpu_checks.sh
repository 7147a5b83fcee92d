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
#   Step host: the host (CPU) cost per call of each piece (benchmarks/host_overhead.py) and of a whole training step
#        at 1x64 tokens, where every model is host-bound (benchmarks/model.py --train-shapes 1x64), with the
#        backward on autograd's device thread (the default) and on the calling thread (--single-thread-backward).
#   PLAN may also be a comma list of step names (see run_step), e.g. gpu_tests,model_train,bench_fla1.
set -u
LOGS=${1:?usage: gpu_checks.sh LOGS [SECONDS] [kernels|diagnose|model|model-profile|tune|compare|STEP,STEP...]}
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

run_step() {  # the steps a plan is made of, by name
  case $1 in
    gpu_tests) step gpu_tests 300 python3 -m pytest tests/test_kernels_gpu.py tests/test_kernels_decay.py -q -rP -n 14 \
      -p no:cacheprovider;;
    bench_ours) step bench_ours 120 python3 benchmarks/bench_kernels.py --only chunk --no-check --no-fla \
      --json "$WORK/chunk_ours.json";;
    roofline) step roofline 60 python3 benchmarks/tune_chunk_kernels.py --roofline --kinds vector,scalar;;
    roofline_model16k) step roofline_model16k 60 python3 benchmarks/tune_chunk_kernels.py --roofline \
      --kinds vector,scalar --shape 1,16384,16,64;;
    bench_decode) step bench_decode 60 python3 benchmarks/bench_kernels.py --only decode --no-check \
      --json "$WORK/decode.json";;
    # FLA autotunes every op at every shape (minutes each without the kept results): ours, FLA and SDPA per shape
    bench_fla[0-3]) step "$1" 200 python3 benchmarks/bench_kernels.py --only chunk --shape "${1#bench_fla}" \
      --no-check --json "$WORK/chunk_fla${1#bench_fla}.json";;
    diagnose) step diagnose 150 python3 benchmarks/diagnose_chunk_kernels.py --length 200 --dims 128 \
      --dtypes bfloat16,float32 --warps 8 --reload 1 --whole-chunks 1,0;;
    tune_*) local shape=${1#tune_}; step "$1" 240 python3 benchmarks/tune_chunk_kernels.py --shape "${shape//x/,}" \
      --kinds vector,scalar \
      --block_v 16,32 --warps 8 --stages 2 --value-loop 0,1 --json "$WORK/$1.json";;
    segments_*) local shape=${1#segments_}; step "$1" 150 python3 benchmarks/tune_chunk_kernels.py \
      --shape "${shape//x/,}" --kinds static,scalar,vector --segment-chunks auto,4,8,16,32,64,1000000;;
    model_train) step model_train 180 python3 benchmarks/model.py --sections train --json "$WORK/model_train.json";;
    # Triton's own launch path (LINEAR_DECAY_FAST_LAUNCH=0; the default is linear_decay/kernels_launch_linear_decay.py)
    model_train_triton_launch) step model_train_triton_launch 180 env LINEAR_DECAY_FAST_LAUNCH=0 python3 \
      benchmarks/model.py --sections train --single-thread-backward --json "$WORK/model_train_triton_launch.json";;
    model_train_caller_thread) step model_train_caller_thread 180 python3 benchmarks/model.py --sections train \
      --single-thread-backward --json "$WORK/model_train_caller_thread.json";;
    model_train_compiled) step model_train_compiled 240 python3 benchmarks/model.py --sections train --compile \
      --json "$WORK/model_train_compiled.json";;
    model_generate) step model_generate 170 python3 benchmarks/model.py --sections generate \
      --json "$WORK/model_generate.json";;
    model_generate_eager) step model_generate_eager 150 python3 benchmarks/model.py --sections generate \
      --ours-overrides decode_cuda_graphs=False --json "$WORK/model_generate_eager.json";;
    model_cold) step model_cold 70 python3 benchmarks/model.py --sections cold --decays mamba2:vector \
      --json "$WORK/model_cold.json";;
    model_profile) step model_profile 80 python3 benchmarks/model.py --sections profile \
      --decays mamba2:vector,simple:scalar --json "$WORK/model_profile.json";;
    model_profile_16k) step model_profile_16k 110 python3 benchmarks/model.py --sections profile \
      --train-shapes 1x16384 --decays mamba2:vector,simple:scalar --json "$WORK/model_profile_16k.json";;
    model_profile_host) step model_profile_host 120 python3 benchmarks/model.py --sections profile \
      --train-shapes 1x16384 --decays mamba2:vector,gla:vector --profile-sort cpu --single-thread-backward \
      --json "$WORK/model_profile_host.json";;
    fused_tests) step fused_tests 120 python3 -m pytest tests/test_kernels_loss.py tests/test_projections.py \
      tests/test_kernels_norm.py tests/test_kernels_swiglu.py tests/test_loss.py -q -rP -n 8 -p no:cacheprovider;;
    model_tests) step model_tests 150 python3 -m pytest tests/test_kernels_decay.py tests/test_kernels_gpu.py -q -rP \
      -n 14 -p no:cacheprovider -k "decay or model or compile or graph";;
    host) run_step host_pieces
      step host_steps 150 python3 benchmarks/model.py --sections train --train-shapes 1x64 \
        --json "$WORK/host_steps.json"
      step host_steps_caller_thread 150 python3 benchmarks/model.py --sections train --train-shapes 1x64 \
        --single-thread-backward --json "$WORK/host_steps_caller_thread.json";;
    host_pieces) step host_pieces 90 python3 benchmarks/host_overhead.py --json "$WORK/host_pieces.json";;
    decay_ab) for fused in "" --unfused-decay; do
        step "decay_ab${fused}" 70 python3 benchmarks/model.py --sections train --train-shapes 8x2048 --no-llama \
          --single-thread-backward $fused --decays gla:vector,simple:scalar,mamba2:vector \
          --json "$WORK/decay_ab${fused}.json"
      done;;
    *) echo "unknown step $1"; exit 2;;
  esac
}

case $PLAN in
  kernels) STEPS="gpu_tests bench_ours roofline roofline_model16k bench_decode bench_fla0";;
  diagnose) STEPS="diagnose";;
  model) STEPS="model_train model_train_compiled model_generate model_cold";;
  model-profile) STEPS="model_profile model_generate_eager";;
  tune) STEPS="tune_8x2048x16x128 tune_1x16384x16x64";;
  compare) STEPS="model_profile_16k bench_fla0 bench_fla1 bench_fla2";;
  *) STEPS=${PLAN//,/ };;  # a comma list of step names
esac
nvidia-smi -L
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
for name in $STEPS; do run_step "$name"; done
