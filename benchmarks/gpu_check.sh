#!/usr/bin/env bash
# The GPU checks of issue 10, in one call (about 5 minutes on one recent GPU; each part has its own
# timeout so the whole stays under 8 minutes):
#   1. the CUDA tests (pytest -k cuda: regularizer on CUDA, GradScaler fp16 with SGD and fused AdamW,
#      Lightning 16-mixed, finetune --amp fp16/bf16);
#   2. regularizer_overhead.py on CUDA: ResNet-50, batch 256 x 3 x 224 x 224, bf16 and fp16 autocast
#      (goal: median per-pair step-time ratio <= 1.01);
#   3. fine-tune throughput of ResNet-50 with AMP (bf16), batch 256, with and without the regularizer
#      (examples/s of the last epoch, from the metrics JSON);
#   4. a 1-GPU torchrun run of `wssi_audit finetune` (NCCL).
# Results go to $OUT_DIR (default $OUT, else gpu_check_out): logs, JSON figures and summary.md.
#
# Usage (repository root):  bash benchmarks/gpu_check.sh [OUT_DIR]
# CPU dry run of the script itself (small sizes, no CUDA):  GPU_CHECK_SMALL=1 bash benchmarks/gpu_check.sh /tmp/x
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if [[ "${GPU_CHECK_SMALL:-0}" == 1 ]]; then
  DEVICE=cpu MODEL=resnet18 BATCH=8 IMAGE=32 COUNT=80 EPOCHS=2 STEPS=3 WARMUP=1 WORKERS=2
  AMPS=(off) FT_AMP=off
else
  DEVICE=cuda MODEL=resnet50 BATCH=256 IMAGE=224 COUNT=2560 EPOCHS=3 STEPS=30 WARMUP=5 WORKERS=8
  AMPS=(bf16 fp16) FT_AMP=bf16
fi
STATUS=0
run() {  # run NAME SECONDS COMMAND...: log to $OUT_DIR/NAME.log, remember failures, never stop the script
  local name=$1 seconds=$2
  shift 2
  echo "== $name"
  local started=$SECONDS
  timeout "$seconds" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - started))s" | tee -a "$OUT_DIR/status.txt"
  tail -n 5 "$OUT_DIR/$name.log"
  [[ $rc == 0 ]] || STATUS=1
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"; } \
  >"$OUT_DIR/card.txt"
"$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))" \
  >>"$OUT_DIR/card.txt" 2>&1
cat "$OUT_DIR/card.txt"

# 1. CUDA tests (skipped, so counted as passing, without CUDA).
run cuda_tests 150 "$PY" -m pytest -q -p no:warnings -rs -k cuda tests/test_regularizer.py tests/test_attach.py \
  tests/test_finetune.py tests/test_integrations.py

# 2. Overhead of attach on a training step.
for amp in "${AMPS[@]}"; do
  run "overhead_$amp" 100 "$PY" benchmarks/regularizer_overhead.py --device "$DEVICE" --model "$MODEL" \
    --batch-size "$BATCH" --image-size "$IMAGE" --amp "$amp" --steps "$STEPS" --warmup "$WARMUP" \
    --json "$OUT_DIR/overhead_$amp.json"
done

# 3. Fine-tune throughput: random images in a .pt (in memory), loaded by DataLoader workers.
DATA="$OUT_DIR/images.pt"
WEIGHTS="$OUT_DIR/$MODEL.pt"
run make_data 120 "$PY" -c "
import torch, torchvision
g = torch.Generator().manual_seed(0)
torch.save({'x': torch.rand($COUNT, 3, $IMAGE, $IMAGE, generator=g), 'y': torch.randint(0, 10, ($COUNT,), generator=g)}, '$DATA')
torch.manual_seed(0)
torch.save(torchvision.models.$MODEL().state_dict(), '$WEIGHTS')
"
for strength in 2e-3 0; do
  run "finetune_strength_$strength" 150 "$PY" -m wssi_audit finetune "$WEIGHTS" --arch "torchvision.models:$MODEL" \
    --data "$DATA" --epochs "$EPOCHS" --batch-size "$BATCH" --lr 0.01 --amp "$FT_AMP" --workers "$WORKERS" \
    --device "$DEVICE" --strength "$strength" -o "$OUT_DIR/finetune_$strength/model.pt"
done

# 4. torchrun with one process on the GPU (NCCL; gloo in the CPU dry run).
run torchrun_1gpu 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m wssi_audit finetune \
  "$WEIGHTS" --arch "torchvision.models:$MODEL" --data "$DATA" --epochs 1 --batch-size "$BATCH" --amp "$FT_AMP" \
  --workers "$WORKERS" --device "$DEVICE" -o "$OUT_DIR/torchrun/model.pt"
rm -f "$DATA"

"$PY" - "$OUT_DIR" <<'EOF' | tee "$OUT_DIR/summary.md"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("| check | figure |\n|---|---|")
print(f"| card | {' / '.join(out.joinpath('card.txt').read_text().split(chr(10))[:2])} |")
for path in sorted(out.glob("overhead_*.json")):
    f = json.loads(path.read_text())
    print(
        f"| overhead {f['model']} {f['batch']} amp {f['amp']} | median pair ratio {f['median_pair_ratio']:.4f}, "
        f"ratio of medians {f['ratio_of_medians']:.4f}, step {f['median_step_ms']['weight_decay']:.1f} ms vs "
        f"{f['median_step_ms']['attach']:.1f} ms, hook {f['median_hook_ms']:.2f} ms |"
    )
for path in sorted(out.glob("finetune_*/model.pt.metrics.json")):
    m = json.loads(path.read_text())
    rates = [round(h["examples_per_second"]) for h in m["history"]]
    print(f"| finetune strength {m['config']['strength']} amp {m['config']['amp']} | examples/s per epoch {rates} |")
for path in out.glob("torchrun/model.pt.metrics.json"):
    m = json.loads(path.read_text())
    print(f"| torchrun 1 process | {m['distributed']}, {m['device']}, {round(m['throughput']['examples_per_second'])} ex/s |")
print("| status | " + "; ".join(out.joinpath("status.txt").read_text().split(chr(10))[:-1]) + " |")
EOF
exit $STATUS
