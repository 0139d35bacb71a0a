#!/usr/bin/env bash
# The GPU comparison in one command: diffusion_jax's DDPM CIFAR-10 training and sampling rates and
# the PyTorch baseline's (diffusers' UNet2DModel of the same architecture), measured one after the
# other on the same card, then the table of both (benchmarks/compare_torch.py).
#
#   bash benchmarks/gpu_comparison.sh --baseline path/to/torch_baseline.py
#   bash benchmarks/gpu_comparison.sh --baseline path/to/torch_baseline.py --copy-to /some/dir
#   bash benchmarks/gpu_comparison.sh --sd-baseline path/to/torch_sd_pipeline.py --sd-only
#
# In order, each under its own time limit, so that one hung step cannot take the whole slot:
#   1. the full bf16 training step at batch 128, the plain jit step beside it (--plain), and
#      where the step's device time goes (--profile)      -> benchmarks/results/NAME_train.json
#   2. sampling, bf16, DDIM in a lax.scan at batch 1024    -> NAME_sample.json
#   3. the PyTorch baseline, DDPM UNet only (--no-sd); it needs torch and diffusers importable
#                                                          -> NAME_torch.json
#   4. the comparison table (benchmarks/compare_torch.py)  -> NAME.md
#   5. with --sd-baseline path/to/torch_sd_pipeline.py, Stable Diffusion 1.5 on random weights:
#      a. diffusers' whole pipeline (512x512, 30 DPM-Solver++(2M) steps, guidance 7.5, batch 8,
#         bf16; eager and with the UNet under torch.compile), saving its folder (--save)
#                                                          -> NAME_sd_torch.json
#      b. diffusion_jax's pipeline on that same folder with the same settings, cuDNN attention
#         where it applies (benchmarks/sd_pipeline.py --torch-json prints the ratios)
#                                                          -> NAME_sd_pipeline.json
#      c. SD 1.5's UNet training step, bf16, batch 8, --attention auto (images/s, MFU)
#                                                          -> NAME_sd15_train.json
#      then a summary of the three (rates, ratios, MFU) at the end of the log and of NAME.md.
#      --sd-only runs this step alone (it takes most of a 10-minute slot by itself);
#      --sd-folder DIR keeps the saved folder there (default: a temporary one, deleted after).
#      Both sides need safetensors and tokenizers importable, the PyTorch side also diffusers
#      and transformers.
#   6. while --budget seconds (default 540, counted from the start) are not spent: the DDPM step
#      and sampling with cuDNN attention (--attention auto: its 256-wide head qualifies on
#      Hopper), the DDPM step with rbg dropout masks, and DiT-B/2 with cuDNN attention
#                                                          -> NAME_extra_*.json
# NAME is --name (default gpu_comparison); everything printed also goes to NAME.log, and
# --copy-to copies all of these files to a folder. Without --baseline, step 3 is skipped and the
# table has diffusion_jax's side only. --model, --train-batch, --sample-batch and --iterations
# change what steps 1 and 2 run (the smoke test runs the tiny model on a CPU); --sd-args "..."
# adds arguments to both SD pipeline scripts (the smoke test's --tiny), --sd-train-args "..."
# replaces step 5c's model and batch arguments. Every step runs $PYTHON (default python3).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
results="$here/results"
baseline="" copy_to="" budget=540 name=gpu_comparison model=ddpm_cifar10 train_batch=128 sample_batch=1024
iterations=()
sd_baseline="" sd_only="" sd_folder="" sd_args="" sd_train_args="--models sd15 --batch 8"
while [ $# -gt 0 ]; do
    case "$1" in
        --baseline) baseline="$2"; shift 2 ;;
        --copy-to) copy_to="$2"; shift 2 ;;
        --budget) budget="$2"; shift 2 ;;
        --name) name="$2"; shift 2 ;;
        --model) model="$2"; shift 2 ;;
        --train-batch) train_batch="$2"; shift 2 ;;
        --sample-batch) sample_batch="$2"; shift 2 ;;
        --iterations) iterations=(--iterations "$2"); shift 2 ;;
        --sd-baseline) sd_baseline="$2"; shift 2 ;;
        --sd-only) sd_only=1; shift ;;
        --sd-folder) sd_folder="$2"; shift 2 ;;
        --sd-args) sd_args="$2"; shift 2 ;;
        --sd-train-args) sd_train_args="$2"; shift 2 ;;
        -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
        *) echo "gpu_comparison.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ -n "$baseline" ] && [ ! -f "$baseline" ]; then
    echo "gpu_comparison.sh: --baseline $baseline: no such file (the PyTorch baseline script," \
         "torch_baseline.py)" >&2
    exit 2
fi
if [ -n "$sd_baseline" ] && [ ! -f "$sd_baseline" ]; then
    echo "gpu_comparison.sh: --sd-baseline $sd_baseline: no such file (the PyTorch Stable" \
         "Diffusion pipeline script, torch_sd_pipeline.py)" >&2
    exit 2
fi
if [ -n "$sd_only" ] && [ -z "$sd_baseline" ]; then
    echo "gpu_comparison.sh: --sd-only needs --sd-baseline path/to/torch_sd_pipeline.py" >&2
    exit 2
fi
if [ -n "$sd_folder" ] && [ -e "$sd_folder" ]; then
    echo "gpu_comparison.sh: --sd-folder $sd_folder exists; name a new folder" >&2
    exit 2
fi
if [ -n "$copy_to" ] && ! mkdir -p "$copy_to"; then
    echo "gpu_comparison.sh: cannot create --copy-to $copy_to" >&2
    exit 2
fi
# paths given relative to where the script was started, then run from the repository root
[ -n "$baseline" ] && baseline="$(cd "$(dirname "$baseline")" && pwd)/$(basename "$baseline")"
[ -n "$copy_to" ] && copy_to="$(cd "$copy_to" && pwd)"
absolute() {  # absolute PATH: the path of PATH, whose folder exists, from /
    echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
}
[ -n "$sd_baseline" ] && sd_baseline="$(absolute "$sd_baseline")"
if [ -n "$sd_folder" ]; then
    mkdir -p "$(dirname "$sd_folder")" && sd_folder="$(absolute "$sd_folder")"
fi
cd "$here/.."
mkdir -p "$results"
rm -f "$results/$name"_{train,sample,torch,sd_torch,sd_pipeline,sd15_train}.json \
    "$results/$name"_extra_*.json "$results/$name.md"
log="$results/$name.log"
py="${PYTHON:-python3}"  # the interpreter for every step (PYTHON=... to choose another)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step NAME LIMIT_SECONDS COMMAND...: run it under a time limit, note a failure
    local name="$1" limit="$2"
    shift 2
    echo "=== $name (limit ${limit}s, $((SECONDS - start))s so far)"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    [ $rc -eq 0 ] || { echo "=== $name failed (exit $rc)"; failed+=("$name"); }
}

sd_steps() {  # step 5: Stable Diffusion 1.5, PyTorch's pipeline and ours on the same folder
    local scratch folder torch_json=()
    scratch="$(mktemp -d)"
    folder="${sd_folder:-$scratch/sd15}"
    # shellcheck disable=SC2086  # $sd_args: words to split
    step sd_torch 420 env OUT="$scratch" "$py" "$sd_baseline" --save "$folder" $sd_args
    [ -f "$scratch/torch_sd_pipeline.json" ] && mv "$scratch/torch_sd_pipeline.json" \
        "$results/${name}_sd_torch.json"
    [ -f "$results/${name}_sd_torch.json" ] && \
        torch_json=(--torch-json "$results/${name}_sd_torch.json")
    if [ -f "$folder/model_index.json" ]; then
        # shellcheck disable=SC2086
        step sd_pipeline 300 "$py" benchmarks/sd_pipeline.py --folder "$folder" --attention auto \
            $sd_args "${torch_json[@]}" --name "${name}_sd_pipeline"
    else
        echo "=== sd_pipeline skipped: the PyTorch side saved no folder at $folder"
        failed+=(sd_pipeline)
    fi
    rm -rf "$scratch"  # the folder too, unless --sd-folder put it elsewhere
    # shellcheck disable=SC2086
    step sd15_train 300 "$py" benchmarks/train_throughput.py $sd_train_args --dtypes bfloat16 \
        --attention auto "${iterations[@]}" --name "${name}_sd15_train"
    echo "=== SD 1.5 summary"
    "$py" benchmarks/sd_pipeline.py --summarize "$results/${name}_sd_pipeline.json" \
        "${torch_json[@]}" --train-json "$results/${name}_sd15_train.json" \
        | tee -a "$results/$name.md"
}

run_all() {
    start=$SECONDS
    failed=()
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
        --format=csv,noheader
    if [ -n "$sd_only" ]; then
        sd_steps
        echo "=== done in $((SECONDS - start))s${failed[*]:+; failed: ${failed[*]}}"
        [ ${#failed[@]} -eq 0 ]
        return
    fi
    step train 300 "$py" benchmarks/train_throughput.py --models "$model" --dtypes bfloat16 \
        --batch "$train_batch" "${iterations[@]}" --plain --profile --name "${name}_train"
    step sample 150 "$py" benchmarks/sample_throughput.py --models "$model" --dtypes bfloat16 \
        --batch "$sample_batch" --name "${name}_sample"
    if [ -n "$baseline" ]; then
        # the baseline writes torch_baseline.json into $OUT
        local scratch
        scratch="$(mktemp -d)"
        step torch_baseline 300 env OUT="$scratch" "$py" "$baseline" --no-sd
        [ -f "$scratch/torch_baseline.json" ] && mv "$scratch/torch_baseline.json" \
            "$results/${name}_torch.json"
        rm -rf "$scratch"
    else
        echo "=== no --baseline: PyTorch's side of the table stays empty"
    fi
    step compare 30 "$py" benchmarks/compare_torch.py --torch "$results/${name}_torch.json" \
        --train "$results/${name}_train.json" --sample "$results/${name}_sample.json" \
        --out "$results/$name.md"
    if [ -n "$sd_baseline" ]; then
        [ -f "$results/$name.md" ] && echo >>"$results/$name.md"
        sd_steps
    fi
    if [ "$model" = ddpm_cifar10 ]; then
        local extra label script args remaining
        for extra in "ddpm_auto train_throughput.py --models ddpm_cifar10 --attention auto" \
                     "ddpm_sample_auto sample_throughput.py --models ddpm_cifar10 --attention auto --batch $sample_batch" \
                     "ddpm_rbg train_throughput.py --models ddpm_cifar10 --dropout-rng rbg" \
                     "dit_auto train_throughput.py --models dit_b2 --attention auto"; do
            read -r label script args <<<"$extra"
            remaining=$((budget - (SECONDS - start)))
            if [ "$remaining" -lt 120 ]; then
                echo "=== skipped $label: ${remaining}s of the ${budget}s budget left"
                continue
            fi
            # shellcheck disable=SC2086
            step "$label" "$remaining" "$py" "benchmarks/$script" $args \
                --dtypes bfloat16 --name "${name}_extra_$label"
        done
    fi
    echo "=== done in $((SECONDS - start))s${failed[*]:+; failed: ${failed[*]}}"
    [ ${#failed[@]} -eq 0 ]
}

run_all 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
if [ -n "$copy_to" ]; then
    for f in "$results/$name"_{train,sample,torch,sd_torch,sd_pipeline,sd15_train}.json \
             "$results/$name"_extra_*.json "$results/$name.md" "$log"; do
        [ -f "$f" ] && cp "$f" "$copy_to"/
    done
    echo "copied the results to $copy_to"
fi
exit "$rc"
