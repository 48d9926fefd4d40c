#!/usr/bin/env bash
# One prepared GPU check (one H100/H200, < 8 minutes): the bf16 LoRA training step of the full-size architecture
# (random weights) cycling through four bucket shapes as training does, with this issue's speed items on and off,
# then a profile of the compiled step. Writes gpu_check/table.md (rows to paste into benchmarks/RESULTS.md) and
# gpu_check/profile.txt.
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]        # default OUT_DIR: ./gpu_check
#
# Rows (each its own process, so compile caches and peak memory are its own):
#   eager  + checkpointed loss     the step before this issue's changes
#   eager  + fused loss            item 5 (logit gradient in the loss forward)
#   compiled (dynamic) + fused     item 2 (compile_layers, dynamic=True): its compiled-layer counters are printed
#   compiled + fused + window blocks  item 4 (encoder attention by window blocks; matters for the 20 and 30 s shapes)
#   compiled + liger / cut_cross_entropy  train.loss_backend, only if that optional package is installed
# Trimming after EOS (item 3) removes 1-10 positions per clip in the data and is exact; it is not a kernel change,
# so it is not timed here (random batches).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check}"
mkdir -p "$OUT"
SHAPES="6,12,20,30"
COMMON=(--modes lora --batch 8 --seconds 30 --shapes "$SHAPES" --warmup 1 --steps 8)  # ~1-1.5 min per row  # warm-up: 1 step per shape
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"

run() {  # label, extra arguments...
  local label="$1"; shift
  echo "== $label: python benchmarks/gpu_mfu.py ${COMMON[*]} $*" | tee -a "$OUT/log.txt"
  timeout 150 python benchmarks/gpu_mfu.py "${COMMON[@]}" "$@" 2>&1 | grep -v -i warning | tee "$OUT/$label.txt" \
    | tee -a "$OUT/log.txt" || echo "$label: failed or timed out (see $OUT/$label.txt)" | tee -a "$OUT/log.txt"
}

run eager_checkpointed_loss --checkpointed-loss
run eager_fused_loss
run compiled_fused_loss --compile
run compiled_fused_loss_window_blocks --compile --window-blocks
# Item 5's optional backends (train.loss_backend), only where their package is installed (never required).
LABELS="eager_checkpointed_loss eager_fused_loss compiled_fused_loss compiled_fused_loss_window_blocks"
for backend in liger:liger_kernel cut_cross_entropy:cut_cross_entropy; do
  if python -c "import ${backend#*:}" 2>/dev/null; then
    run "compiled_${backend%%:*}" --compile --loss-backend "${backend%%:*}"
    LABELS="$LABELS compiled_${backend%%:*}"
  fi
done

# A profile of the compiled step on the same shapes: the top kernels by CUDA time.
timeout 150 python - "$SHAPES" > "$OUT/profile.txt" 2>&1 <<'EOF' || echo "profile failed (see $OUT/profile.txt)"
import sys
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, "benchmarks")
import gpu_mfu
from voxtral_train import flops
from voxtral_train.compiled import compile_layers
from voxtral_train.config import PeftSettings
from voxtral_train.streaming_lm import StreamingLM, unwrap_peft
from voxtral_train.trainable import apply_trainable_policy

device = torch.device("cuda")
model = apply_trainable_policy(gpu_mfu.build("full", device, torch.bfloat16), PeftSettings(mode="lora"))
stats = compile_layers(model)
config = unwrap_peft(model).config
lm = StreamingLM(model, pad_id=0, chunk_positions=gpu_mfu.CHUNK_POSITIONS)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, fused=True)
batches = []
for seconds in map(float, sys.argv[1].split(",")):
    p = flops.positions_for_clip(seconds)
    batches.append(gpu_mfu.random_batch(config, max(1, round(8 * 424 / p)), p, device, torch.bfloat16))
for batch in batches:  # compile every shape first
    gpu_mfu.train_step(lm, optimizer, batch)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for batch in batches:
        gpu_mfu.train_step(lm, optimizer, batch)
    torch.cuda.synchronize()
print("compiled layers:", stats.metrics())
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
EOF

{
  echo "| row (\`benchmarks/gpu_check.sh\`, shapes $SHAPES s, bf16 LoRA r16) | positions/s | real audio-s/s | MFU | HFU | peak GiB |"
  echo "|---|---|---|---|---|---|"
  for label in $LABELS; do
    line=$(grep -E '^lora +sdpa' "$OUT/$label.txt" | head -1 || true)
    if [ -z "$line" ]; then echo "| $label | failed | | | | |"; continue; fi
    echo "$line" | awk -v label="$label" '{
      for (i = 1; i <= NF; i++) {
        if ($(i + 1) == "pos/s") pos = $i; if ($(i + 1) == "audio-s/s") audio = $i;
        if ($i == "MFU") mfu = $(i + 1); if ($i == "HFU") hfu = $(i + 1); if ($i == "peak") peak = $(i + 1);
      }
      printf "| %s | %s | %s | %s %% | %s %% | %s |\n", label, pos, audio, mfu, hfu, peak }'
  done
  grep -h "compiled layers" "$OUT"/compiled_*.txt || true
} | tee "$OUT/table.md"
