#!/usr/bin/env bash
# The design-space grids (DESIGN §6) on one GPU, on text (held-out perplexity) and on MQAR (recall accuracy), at one
# of two scales. Small models use little of a GPU, so each sweep runs as several processes on the same GPU
# (`--processes`). Sweeps resume: run it again with the same OUTPUT to finish what a time limit interrupted (or copy
# results/sweep_t1_t3, the records of the small-scale runs behind RESULTS.md, to OUTPUT first); the last step of each
# sweep writes OUTPUT/{corpus,mqar}/results.md (with the paired comparisons), results.csv and
# decay.png. A configuration that several grids share is trained once.
#
# Usage: benchmarks/reproduce_grids.sh OUTPUT [GRIDS] [SECONDS] [SCALE] [DATA]
#   GRIDS   grids joined by commas, one sweep per data kind (default "T1,T3")
#   SECONDS wall-clock limit for all training (default 0: none): each sweep process starts no run that would end after
#           it (`--time_budget`), and one still running at the limit is stopped; the summaries are written either way
#   SCALE   small  — the runs behind RESULTS.md's first tables: 4 layers × 256 wide, 4M tokens of 256-token
#                    blocks of the bundled corpus, MQAR of 64 tokens with 8 pairs, two seeds;
#           medium — 8 layers × 512 wide (8 heads of 64, 36.7M parameters), 21M tokens of 1024-token blocks of the
#                    bundled corpus and the fetched Gutenberg selections (linear_decay/texts.py), MQAR of 512
#                    tokens with 64 pairs and queries anywhere after the context (20M tokens; no configuration
#                    learns it within this budget, RESULTS.md's medium section), three seeds, bf16, learning rate
#                    1e-3 (the sweep's default of 3e-3 is tuned for the small scale)
#   DATA    corpus, mqar or both (default both): which of the two sweeps to run
#   PROCESSES (environment) shard processes per sweep (default 8); the text and the MQAR sweep run at once
set -u
OUTPUT=${1:?usage: reproduce_grids.sh OUTPUT [GRIDS] [SECONDS] [SCALE] [DATA]}
GRIDS=${2:-T1,T3}
LIMIT=${3:-0}
SCALE=${4:-small}
DATA=${5:-both}
case "$DATA" in
  corpus|mqar|both) ;;
  *) echo "DATA must be corpus, mqar or both, got $DATA" >&2; exit 2 ;;
esac
PROCESSES=${PROCESSES:-8}
case "$SCALE" in
  small)
    COMMON=(--size tiny --model_overrides "hidden_size=256,num_hidden_layers=4,num_heads=4" --seeds 0,1)
    TEXT=(--data corpus --seq_len 256 --batch_size 32 --steps 500)
    MQAR=(--data mqar --mqar_vocab_size 256 --mqar_num_pairs 8 --seq_len 64 --batch_size 128 --steps 800)
    ;;
  medium)
    COMMON=(--size tiny --model_overrides "hidden_size=512,num_hidden_layers=8,num_heads=8" --seeds 0,1,2 --bf16)
    TEXT=(--data gutenberg --seq_len 1024 --batch_size 32 --steps 640 --learning_rate 1e-3)
    MQAR=(--data mqar --mqar_vocab_size 8192 --mqar_num_pairs 64 --mqar_query_gaps uniform --seq_len 512
          --batch_size 64 --steps 610 --learning_rate 1e-3)
    ;;
  *) echo "SCALE must be small or medium, got $SCALE" >&2; exit 2 ;;
esac

run_limited() {  # run "$@" under the remaining time limit, if any
  if [ "$LIMIT" -gt 0 ]; then
    local left=$(( LIMIT - SECONDS ))
    [ "$left" -gt 10 ] || { echo "no time left for: $*"; return 0; }
    timeout --signal=TERM --kill-after=15 "$left" "$@"
  else
    "$@"
  fi
}

BUDGET=()
[ "$LIMIT" -gt 0 ] && BUDGET=(--time_budget "$LIMIT")
SWEEPS=()
[ "$DATA" != mqar ] && SWEEPS+=(corpus)
[ "$DATA" != corpus ] && SWEEPS+=(mqar)
sweep_args() {  # ARGS: the data arguments of sweep $1
  if [ "$1" = corpus ]; then ARGS=("${TEXT[@]}"); else ARGS=("${MQAR[@]}"); fi
}
for sweep in "${SWEEPS[@]}"; do
  sweep_args "$sweep"
  run_limited python -m linear_decay.sweep --grid "$GRIDS" "${COMMON[@]}" "${ARGS[@]}" --processes "$PROCESSES" \
      "${BUDGET[@]}" --output_dir "$OUTPUT/$sweep" &
done
wait
# summaries of whatever finished (a no-op rewrite when the sweeps completed)
for sweep in "${SWEEPS[@]}"; do
  sweep_args "$sweep"
  python -m linear_decay.sweep --grid "$GRIDS" "${COMMON[@]}" "${ARGS[@]}" --summarize_only \
      --output_dir "$OUTPUT/$sweep"
done
