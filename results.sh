#!/usr/bin/env bash
# Re-runs every measurement of docs/results.md and prints its tables. Every run is one train.py / eval.py command
# with one thread; a finished run is skipped and an interrupted one resumes, so the script can be stopped and started
# again at any point. Runs go to $R (default runs/results); the tables (bench.py --runs) to stdout and
# $R/<task>/tables.md; with matplotlib installed, the figures (bench.py --plot) to $R/<task>/<task>_*.png.
#
#   bash results.sh               # everything: ~8.5 h of CPU time, LANES=2 runs side by side
#   TASKS=pairs bash results.sh   # one demo task only
#   TASKS=pairs-adventurer bash results.sh   # the paper's student (adventurer_demo) on pairs, seeds 0-2: ~50 min
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-python}
R=${R:-runs/results}
LANES=${LANES:-2}
TASKS=${TASKS:-"pairs relations pairs-adventurer"}
export OMP_NUM_THREADS=1                    # the figures depend on the thread count: one thread per run, always
COMMON="--threads 1 --batch-size 32 --warmup-frac 0.05"

# The protocol (docs/results.md, "Protocol"). Batch 32 everywhere; steps = epochs x floor(n / 32).
D_FLAGS="--demo-pool 32000 --epochs 1 --lr 4e-3"  # distillation: 1,000 steps, one pass over 32,000 fresh unlabelled images
SNAPSHOTS="0,125,250,500"                   # + last.pt (step 1,000): the linear-probe curve of the AM + MP runs; step 0 =
                                            # the random initialisation (= the labels-only student's, same seed)
FT_LR=1e-3                                  # fine-tuning a distilled student: lower lr, short schedule (~300 steps)
declare -A FT_EPOCHS=([100]=100 [300]=33 [1200]=8)         # ~300 steps
# labels only, two schedule lengths (each flat at its end; the longer one is not better: it keeps overfitting the
# few images), and at n = 300 the equal-updates schedule (1,000 + 300 steps)
declare -A SHORT_EPOCHS=([100]=233 [300]=78 [1200]=19)      # ~700 steps
declare -A LONG_EPOCHS=([100]=667 [300]=222 [1200]=54)      # ~2,000 steps
EQ_EPOCHS_300=144                                           # 1,296 steps
SEEDS5="0 1 2 3 4"; SEEDS3="0 1 2"

# A task folder TASK-adventurer holds the Adventurer student's runs on the demo task TASK, with TASK's teachers
task_of() { echo "${1%-adventurer}"; }
student_of() { [[ $1 == *-adventurer ]] && echo "--student adventurer_demo" || echo "--student demo"; }

jobs_file=$(mktemp); trap 'rm -f "$jobs_file"' EXIT
job() { echo "$*" >> "$jobs_file"; }
run_jobs() {                                # each line is one chain of commands; LANES chains at a time
  [ -s "$jobs_file" ] || return 0
  xargs -P "$LANES" -d '\n' -I{} bash -c '{}' < "$jobs_file"
  : > "$jobs_file"
}
train() {   # RUN_DIR TRAIN_ARGS...: train.py, unless RUN_DIR's log already says finished (no Python start-up)
  echo "{ grep -qs '\"finished\": true' $1/log.jsonl || $PY train.py ${*:2}; }"
}
teacher() { echo "$(train $R/$1/teacher-s$2/teacher --stage teacher --demo-task $1 --seed $2 --epochs 5 --lr 1.5e-3 --out $R/$1/teacher-s$2 $COMMON)"; }
probe() {   # probe.json gets one entry per checkpoint; skipped when last.pt is already in it
  echo "{ grep -qs '\"last.pt\"' $1/probe.json || $PY eval.py --probe ${*:2} $1/last.pt; }"
}
distill() { # TASK CONFIG SEED [distillation flags]; snapshots and their probes for the main (am+mp) runs only
  local dir=$R/$1/$2-s$3 snaps="" save=""
  if [ "$2" = am+mp ]; then
    save="--save-steps $SNAPSHOTS"
    snaps=$(for s in ${SNAPSHOTS//,/ }; do printf '%s ' "$dir/distill/step$s.pt"; done)
  fi
  echo "$(train $dir/distill --stage distill --demo-task $(task_of $1) --seed $3 $(student_of $1) \
          --teacher $R/$(task_of $1)/teacher-s$3/teacher/last.pt $D_FLAGS $save --out $dir $COMMON ${*:4}) \
          && $(probe $dir/distill $snaps)"
}
finetune() { # TASK CONFIG SEED N: the distilled student of CONFIG fine-tuned on N labelled images
  train $R/$1/$2-s$3/n$4 --stage finetune --demo-task $(task_of $1) --seed $3 --init $R/$1/$2-s$3/distill/last.pt \
        --demo-train $4 --epochs ${FT_EPOCHS[$4]} --lr $FT_LR --eval-every-steps 100 --out $R/$1/$2-s$3 --name n$4 $COMMON
}
labels_only() { # TASK NAME SEED N EPOCHS: the same student, labels only, on the same N images
  train $R/$1/$2-s$3/n$4 --stage finetune --demo-task $(task_of $1) --seed $3 $(student_of $1) --demo-train $4 \
        --epochs $5 --lr 4e-3 --eval-every-steps 250 --out $R/$1/$2-s$3 --name n$4 $COMMON
}

# 1. teachers: one per seed, so the seed spread includes the teacher's
for task in $(for t in $TASKS; do task_of $t; done | sort -u); do
  if [[ " $TASKS " == *" pairs "* && $task == pairs ]]; then seeds=$SEEDS5; else seeds=$SEEDS3; fi
  for s in $seeds; do job "$(teacher $task $s) && $(probe $R/$task/teacher-s$s/teacher)"; done
done
run_jobs

# 2. students, in order of importance: a partial run already answers the first questions (LANES chains at a time)
labels_pair() { # TASK SEED N: the labels-only student on N images, the ~700-step schedule, then the ~2,000-step one
  job "$(labels_only $1 labels_700 $2 $3 ${SHORT_EPOCHS[$3]})"
  job "$(labels_only $1 labels_2000 $2 $3 ${LONG_EPOCHS[$3]})"
}
main_chain() { # TASK SEED N...: AM + MP distillation (snapshots, probes), then fine-tuning on each N
  local chain
  chain="$(distill $1 am+mp $2)"
  for n in "${@:3}"; do chain+=" && $(finetune $1 am+mp $2 $n)"; done
  job "$chain"
}
# the paper's ablation under the protocol of the label-efficiency gap (300 labelled images): one chain per row and seed
ablation() { # CONFIG SEED FLAGS
  job "$(distill pairs $1 $2 "${@:3}") && $(finetune pairs $1 $2 300)"
}
if [[ " $TASKS " == *" pairs "* ]]; then
  for s in $SEEDS5; do           # (a) the probe curve, (b) label efficiency at 300 labels, equal updates
    if [ "$s" -lt 3 ]; then main_chain pairs $s 100 300 1200; else main_chain pairs $s 300; fi
    labels_pair pairs $s 300
    job "$(labels_only pairs labels_1300 $s 300 $EQ_EPOCHS_300)"                              # equal updates
  done
  for s in $SEEDS5; do ablation mp_only $s --am-weight 0; ablation am_only $s --lam 0; done    # (c) the paper's rows
  for s in $SEEDS3; do                                                                         # (b) at 100 and 1,200
    job "$(labels_only pairs labels_700 $s 100 ${SHORT_EPOCHS[100]})"
    job "$(labels_only pairs labels_700 $s 1200 ${SHORT_EPOCHS[1200]})"
  done
  for s in $SEEDS5; do ablation am_cls $s --am-scope cls; ablation am_all $s --am-scope all; done  # (c) AM's scope
  for s in $SEEDS3; do                                                                         # (b) longer baselines
    job "$(labels_only pairs labels_2000 $s 100 ${LONG_EPOCHS[100]})"
    job "$(labels_only pairs labels_2000 $s 1200 ${LONG_EPOCHS[1200]})"
  done
  for s in $SEEDS3; do ablation am_only_nomask $s --lam 0 --mask-ratio 0; done                 # (c) our sweeps
  for s in $SEEDS3; do ablation mask0.9 $s --mask-ratio 0.9; ablation mask0.5 $s --mask-ratio 0.5; done
  for s in $SEEDS3; do ablation lam0.5 $s --lam 0.5; ablation lam2 $s --lam 2; done
fi
if [[ " $TASKS " == *" relations "* ]]; then  # the harder task: the label survives 75 % masking in 62 % of the images
  for s in $SEEDS3; do
    main_chain relations $s 300 1200
    labels_pair relations $s 300
    labels_pair relations $s 1200
    job "$(distill relations am_only_nomask $s --lam 0 --mask-ratio 0) && $(finetune relations am_only_nomask $s 300)"
  done
fi
if [[ " $TASKS " == *" pairs-adventurer "* ]]; then  # the paper's own student: probe curve, label efficiency, 3 seeds
  for s in $SEEDS3; do
    main_chain pairs-adventurer $s 300 100 1200
    for n in 300 100 1200; do job "$(labels_only pairs-adventurer labels_700 $s $n ${SHORT_EPOCHS[$n]})"; done
  done
fi
run_jobs

# 3. the tables
for task in $TASKS; do
  echo; echo "## $task"; $PY bench.py --runs "$R/$task" | tee "$R/$task/tables.md"
  if $PY -c "import matplotlib" 2>/dev/null; then $PY bench.py --plot "$R/$task" --out "$R/$task"; fi
done
