#!/bin/sh
# tools/demo.sh BUILD - the main job (`make demo`): MedSAMix on the embedded
# demo world (examples/demo). Runs a MedSAMix-S search on one task and a
# MedSAMix-M search over all six tasks with base.pth as the base and
# spec_ct.pth + spec_mri.pth as the fine-tuned models, then prints the
# results tables (calib/test Dice of the inputs, the uniform merges and the
# result). Outputs go to runs/demo-single-<task>/ and runs/demo-multi/.
# Last, medical volumes: the small nnU-Net dataset examples/demo/nnunet
# (ct_organ slices stacked into NIfTI volumes) goes through `prepare`
# (runs/demo-nnunet/) and the merged model segments a volume with
# `segment --volume` (a NIfTI prediction on the input's grid).
#
# Interrupted (Ctrl-C)? Run it again: each search resumes from its log.
# Knobs (environment): MSX_DEMO_TASK (default mri_abdomen), MSX_DEMO_S_TRIALS,
# MSX_DEMO_M_TRIALS, MSX_DEMO_SEED, MSX_DEMO_JOBS, MSX_DEMO_FIDELITY (race, the
# default, or full: every trial on every calibration image). The single-task
# search runs on mri_abdomen, which no model was trained on: there the merge can
# combine CT anatomy with MRI image statistics and beat every input (on mri_ring
# the MRI specialist already wins at home and the search can only tie it).
set -e
build=${1:-build}
bin="$build/medsamix"
demo=examples/demo
task=${MSX_DEMO_TASK:-mri_abdomen}
s_trials=${MSX_DEMO_S_TRIALS:-60}
m_trials=${MSX_DEMO_M_TRIALS:-150}
seed=${MSX_DEMO_SEED:-0}
jobs=${MSX_DEMO_JOBS:+--jobs $MSX_DEMO_JOBS}
fidelity="--fidelity ${MSX_DEMO_FIDELITY:-race}"

[ -x "$bin" ] || { echo "demo: $bin not found (run make first)" >&2; exit 1; }
mkdir -p runs
models="$demo/models/spec_ct.pth $demo/models/spec_mri.pth"
t0=$(date +%s)

# search OUT ARGS...: --resume continues an interrupted run (or starts a new
# one). A log this run cannot resume (another version's racing rule, other
# knobs: the messages that end in "another --out") is moved aside, never
# deleted, and the search starts afresh; any other failure stops the demo.
# stderr carries only warnings and the final error; it is shown afterwards.
search() {
    out=$1
    shift
    err=$(mktemp)
    st=0
    "$bin" search "$@" --out "$out" --resume 2>"$err" || st=$?
    cat "$err" >&2
    if [ "$st" -ne 0 ] && grep -Eq '(use|or) another --out' "$err"; then
        old="$out.prev-$(date +%Y%m%d-%H%M%S)"
        mv "$out" "$old"
        echo "demo: the log in $out cannot be resumed by this run (see above); moved to $old, starting afresh"
        st=0
        "$bin" search "$@" --out "$out" --resume || st=$?
    fi
    rm -f "$err"
    return "$st"
}

echo "== MedSAMix-S: single-task search on $task ($s_trials trials)"
search "runs/demo-single-$task" --base "$demo/models/base.pth" --models $models \
    --tasks "$demo/tasks/$task" --trials "$s_trials" --seed "$seed" $jobs $fidelity

echo
echo "== MedSAMix-M: multi-task search over all demo tasks ($m_trials trials)"
search runs/demo-multi --base "$demo/models/base.pth" --models $models \
    --tasks "$demo"/tasks/* --multi --trials "$m_trials" --seed "$seed" $jobs $fidelity

t1=$(date +%s)
echo
echo "================================================================"
echo "MedSAMix demo results ($((t1 - t0)) s). Reference Dice of the inputs and"
echo "uniform merges: $demo/baseline_dice.md"
echo "----------------------------------------------------------------"
echo "MedSAMix-S on $task (runs/demo-single-$task/report.md):"
sed -n '/^### Dice (%) on `test`/,/^## /p' "runs/demo-single-$task/report.md" | sed '/^## /d'
echo "MedSAMix-M over all tasks (runs/demo-multi/report.md):"
sed -n '/^### Dice (%) on `calib`/,/^## /p' runs/demo-multi/report.md | sed '/^## /d'
echo "Plots (open in a browser) and overlays, linked from each report.md:"
echo "  runs/demo-single-$task/progress.svg plan.svg; runs/demo-multi/progress.svg pareto.svg plan.svg; overlays/"


echo "================================================================"
echo "== nnU-Net volumes ($demo/nnunet): prepare + segment --volume"
nn="$demo/nnunet"
ds="$nn/Dataset801_DemoCT"
"$bin" prepare --nnunet "$nn" --task-table "$nn/tasks.json" --out runs/demo-nnunet 2>/dev/null
echo "task folders for search/eval: runs/demo-nnunet/ct_organ_3d/{calib,test}, slice list in slices.json"
"$bin" eval --model "$demo/models/base.pth" --config "$demo/models/config.json" \
    --nnunet "$nn" --task-table "$nn/tasks.json" --split test
for m in "$demo/models/base.pth" runs/demo-multi/best.safetensors; do
    echo "-- $m on demo_02 (label foreground 1):"
    "$bin" segment --model "$m" --config "$demo/models/config.json" \
        --volume "$ds/imagesTr/demo_02_0000.nii.gz" --label "$ds/labelsTr/demo_02.nii.gz" --foreground 1 \
        --out "runs/demo-nnunet/demo_02_$(basename "$m" | sed 's/\..*//').nii.gz"
done
