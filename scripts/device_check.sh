#!/bin/bash
# The CUDA paths of what CI tests on CPU, in one run on a machine with one GPU and PyTorch installed
# (packages it lacks may travel as wheels in .whl/): training in bf16 on a world of one with NCCL,
# checkpoints, resume, export, a stop signal with async checkpoints, a non-finite step, FSDP CPU
# offload, and the checkpoint benchmark with the state on the GPU.
#
#   bash scripts/device_check.sh [checkpoints|kernels|vs]   # logs and benchmark JSON under $OUT (default /tmp/distrain-device)
#
# `checkpoints`: only the async-save runs (a stop, a resume, exact losses) and the checkpoint benchmark.
# `kernels`: the MoE kernel benchmark (scripts/bench/moe_kernels.py, with the fused layer's kernel profile at 16k) and 15 steps of a GPU-sized
# qwen3_moe_debug with moe.kernel=triton against moe.kernel=torch (losses, tokens/s).
# `vs`: scripts/bench/vs_transformers.py on one GPU (a ~1B MoE, bf16): tokens/s and MFU against transformers.
set -uo pipefail
OUT=${OUT:-/tmp/distrain-device}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 WANDB_SILENT=true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"

train() {  # train NAME [key=value ...]: whole log appended to $OUT/runs.log; prints its key lines and exit status
    local name=$1; shift
    local start=$SECONDS
    timeout "${TRAIN_TIMEOUT:-600}" python3 -m distrain train recipe=qwen3_moe_debug data.cache_dir=/tmp/distrain-cache "$@" >/tmp/run.log 2>&1
    local status=$?
    { echo "===== $name: $*"; cat /tmp/run.log; } >>"$OUT/runs.log"
    echo "== $name: exit $status in $((SECONDS - start)) s"
    grep -E "^step (1|10|20|30|40|50)/|resuming|scratch|stopped|non-finite|exported|Error|error" /tmp/run.log | grep -v "Writing" | tail -12
}

PART=${1:-all}
if [ "$PART" = checkpoints ]; then
    # async saves every 5 steps (host copies reused), a resume from the step-20 one: losses equal an uninterrupted run's
    train cuda_reference train.steps=25 checkpoint.interval=0 eval.interval=0 checkpoint.export=false run.dir=/tmp/ref
    DISTRAIN_FAULT="signal@step:step=21:signal=SIGTERM" train cuda_async train.steps=25 checkpoint.interval=5 checkpoint.async=true eval.interval=0 run.dir=/tmp/ra
    train cuda_async_resumed train.steps=25 checkpoint.interval=5 checkpoint.async=true eval.interval=0 checkpoint.export=false run.dir=/tmp/ra
    python3 - <<'EOF'
import json
ref = {r["step"]: r["loss"] for r in map(json.loads, open("/tmp/ref/metrics.jsonl"))}
run = [json.loads(l) for l in open("/tmp/ra/metrics.jsonl")]
print("steps once each:", [r["step"] for r in run] == list(range(1, 26)),
      "max |loss - reference|:", max(abs(r["loss"] - ref[r["step"]]) for r in run))
EOF
fi
if [ "$PART" = all ]; then
train cuda_train train.steps=40 checkpoint.interval=20 eval.interval=20 run.dir=/tmp/r1
train cuda_resume train.steps=50 checkpoint.interval=20 eval.interval=0 run.dir=/tmp/r1
DISTRAIN_FAULT="signal@step:step=15:signal=SIGTERM" train cuda_sigterm_async train.steps=30 checkpoint.interval=10 checkpoint.async=true run.dir=/tmp/r2
train cuda_after_sigterm train.steps=30 checkpoint.interval=10 checkpoint.async=true run.dir=/tmp/r2
DISTRAIN_FAULT="nan@loss:step=5" train cuda_nan train.steps=8 checkpoint.interval=0 eval.interval=0 checkpoint.export=false run.dir=/tmp/r3
train cuda_cpu_offload train.steps=10 parallel.cpu_offload=true checkpoint.export=false run.dir=/tmp/r4
python3 - <<'EOF'
import json
for run in ("/tmp/r1", "/tmp/r2"):
    steps = [json.loads(l)["step"] for l in open(f"{run}/metrics.jsonl")]
    print(run, "steps logged once each:", steps == list(range(1, len(steps) + 1)), "last", steps[-1])
EOF

fi

if [ "$PART" = kernels ]; then
    # each part under its own time limit, so one slow part leaves the others their turn
    # KERNEL_BENCH=0 skips the benchmark, FP32_REF=0 the fp32 run (a short lease: the end-to-end pair alone)
    if [ "${KERNEL_BENCH:-1}" = 1 ]; then
        timeout "${BENCH_TIMEOUT:-330}" python3 scripts/bench/moe_kernels.py --profile 16384 --out "$OUT" 2>&1 | grep -v -i warn | tee "$OUT/moe_kernels.log"
    fi
    # two layers of Qwen3-30B-A3B's MoE shapes (1.2B parameters): 16k tokens a step in two micro-batches
    size="++model.config.hidden_size=2048 ++model.config.moe_intermediate_size=768 ++model.config.num_experts=128 ++model.config.num_experts_per_tok=8 ++model.config.num_hidden_layers=2 ++model.config.num_attention_heads=16 ++model.config.num_key_value_heads=4 train.seq_len=2048 train.global_batch_size=8 train.micro_batch_size=4"
    # bf16 with each kernel, and the torch path in fp32 as the reference both bf16 runs are measured against
    common="train.steps=15 optim.lr=3e-4 checkpoint.interval=0 eval.interval=0 checkpoint.export=false"
    # shellcheck disable=SC2086
    TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-110} train moe_kernel_torch $size $common moe.kernel=torch run.dir=/tmp/k_torch
    # shellcheck disable=SC2086
    TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-110} train moe_kernel_triton $size $common moe.kernel=triton run.dir=/tmp/k_triton
    if [ "${FP32_REF:-1}" = 1 ]; then
        # shellcheck disable=SC2086
        TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-110} train moe_kernel_fp32 $size $common moe.kernel=torch train.mixed_precision=fp32 run.dir=/tmp/k_fp32
    fi
    python3 - <<'EOF'
import json, os, statistics
runs = {k: [json.loads(l) for l in open(f"/tmp/k_{k}/metrics.jsonl")] for k in ("torch", "triton", "fp32") if os.path.exists(f"/tmp/k_{k}/metrics.jsonl")}
for k, records in runs.items():
    print(f"{k:7s} losses", " ".join(f"{r['loss']:.4f}" for r in records))
    print(f"{k:7s} median tokens/s (steps 5-15): {statistics.median(r['tokens_per_s'] for r in records[4:]):.0f}")
for a, b in (("triton", "torch"), ("torch", "fp32"), ("triton", "fp32")):
    if a in runs and b in runs:
        print(f"max |loss {a} - {b}|: {max(abs(x['loss'] - y['loss']) for x, y in zip(runs[a], runs[b])):.4f}")
EOF
    exit 0
fi

if [ "$PART" = vs ]; then
    # issue 12 on one GPU: distrain's train step against transformers' plain loop on a ~1B MoE, bf16
    # (tokens/s, MFU with the same FLOPs per token); the same losses on both sides
    timeout "${BENCH_TIMEOUT:-480}" python3 scripts/bench/vs_transformers.py --device cuda --size 1b --layouts single \
        --rounds "${ROUNDS:-2}" --steps 15 --out "$OUT" 2>&1 | grep -v -i "warn\|Writing" | tee "$OUT/vs_transformers.log"
    exit 0
fi

echo "== checkpoint benchmark (state on the GPU)"
python3 scripts/bench/checkpoint.py --rounds 3 --steps 16 --interval 4 --out "$OUT" \
    ++model.config.hidden_size=2048 ++model.config.intermediate_size=5632 ++model.config.num_hidden_layers=8 \
    ++model.config.num_attention_heads=16 ++model.config.num_key_value_heads=8 train.global_batch_size=8 train.micro_batch_size=8 \
    data.cache_dir=/tmp/distrain-cache 2>&1 | grep -v Writing | tee "$OUT/bench.log"
