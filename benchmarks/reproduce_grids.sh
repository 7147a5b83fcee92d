#!/usr/bin/env bash
# The design-space reproduction behind RESULTS.md on one GPU: grids T1 and T3 (DESIGN §6), every variant, two
# seeds, on the bundled corpus (held-out perplexity) and on MQAR (recall accuracy). Small models use little of an
# H200, so each sweep runs as several processes on the same GPU (`--processes`). Sweeps resume: run it again with the
# same OUTPUT to finish what a time limit interrupted (or copy results/sweep_t1_t3, the records of the runs behind
# RESULTS.md, to OUTPUT first); the last step of each sweep writes OUTPUT/{corpus,mqar}/results.md, results.csv and
# decay.png. Usage: benchmarks/reproduce_grids.sh OUTPUT [GRIDS] [SECONDS]
#   GRIDS   grids joined by commas, one sweep (default "T1,T3": a configuration in both is trained once)
#   SECONDS wall-clock limit for all training (default: none); the summaries are written either way
set -u
OUTPUT=${1:?usage: reproduce_grids.sh OUTPUT [GRIDS] [SECONDS]}
GRIDS=${2:-T1,T3}
LIMIT=${3:-0}
PROCESSES=${PROCESSES:-8}             # per sweep; the corpus and the MQAR sweep run at once
MODEL="hidden_size=256,num_hidden_layers=4,num_heads=4"
CORPUS=(--data corpus --seq_len 256 --batch_size 32 --steps 500)
MQAR=(--data mqar --mqar_vocab_size 256 --mqar_num_pairs 8 --seq_len 64 --batch_size 128 --steps 800)
COMMON=(--size tiny --model_overrides "$MODEL" --seeds 0,1)

run_limited() {  # run "$@" under the remaining time limit, if any
  if [ "$LIMIT" -gt 0 ]; then
    local left=$(( LIMIT - SECONDS ))
    [ "$left" -gt 10 ] || { echo "no time left for: $*"; return 0; }
    timeout --signal=TERM --kill-after=15 "$left" "$@"
  else
    "$@"
  fi
}

run_limited python -m linear_decay.sweep --grid "$GRIDS" "${COMMON[@]}" "${CORPUS[@]}" --processes "$PROCESSES" \
    --output_dir "$OUTPUT/corpus" &
run_limited python -m linear_decay.sweep --grid "$GRIDS" "${COMMON[@]}" "${MQAR[@]}" --processes "$PROCESSES" \
    --output_dir "$OUTPUT/mqar" &
wait
# summaries of whatever finished (a no-op rewrite when the sweeps completed)
python -m linear_decay.sweep --grid "$GRIDS" "${COMMON[@]}" "${CORPUS[@]}" --summarize_only --output_dir "$OUTPUT/corpus"
python -m linear_decay.sweep --grid "$GRIDS" "${COMMON[@]}" "${MQAR[@]}" --summarize_only --output_dir "$OUTPUT/mqar"
