#!/usr/bin/env bash
# One script for a GPU machine: the train-step benchmark of ResNet-18 and ResNet-50 in
# bfloat16 at the largest batch of 512 / 256 / 128 that fits, then 300-step training runs
# on synthetic data through the real input pipeline of configs/resnet50_bf16.py and of
# Liu & Lu's recipe (configs/landmark_attention.py: VGG-16 with landmark-driven
# attention, float32, its batch of 16); prints images/s, TFLOP/s and MFU (where the GPU's
# peak is listed in deepfashion_jax/throughput.py) for each and the device, and writes
# step_resnet18.json, step_resnet50.json, end_to_end.json, landmark_attention.json and
# summary.json into OUT_DIR. Last, every backbone side by side (benchmarks/backbones.py:
# parameters, forward GFLOPs against the published figures, the train step's images/s at
# 224 px, batch 64, bfloat16) into backbones.json; a backbone that fails there keeps its row
# with its error, and the script exits with status 1 at its end. Last, each train step it
# timed beside its roofline projection (benchmarks/projection.py: roofline img/s, img/s at
# 40% MFU, measured img/s and MFU, measured / roofline; host cores to feed it when
# PIPELINE_JSON names benchmarks/input_pipeline.py's --json) into projection.json.
#
#   [PIPELINE_JSON=FILE] [BACKBONES=resnet50,vit_b16] benchmarks/gpu.sh [--shrink] [OUT_DIR]
#                                                (OUT_DIR: $OUT, else benchmarks/out/gpu)
#
# BACKBONES (comma-separated) limits the backbone table to those names; each compiles its own
# train step, so all of them take several minutes on a GPU.
#
# It runs the benchmarks as modules from the repository root (python -m benchmarks.X), so
# the package need not be installed on the GPU machine.
#
# --shrink makes everything tiny (64 px, batches of 8 / 4, a few steps; the backbone table
# ResNet-18 alone, its step at 32 px) so that the script itself is tested on a CPU
# (tests/test_benchmarks.py). Packages missing on the machine can travel as wheels in .whl/
# (for a machine without a package index): they are installed first.
set -euo pipefail
cd "$(dirname "$0")/.."

shrink=0
if [[ "${1:-}" == "--shrink" ]]; then shrink=1; shift; fi
out_dir="${1:-${OUT:-benchmarks/out/gpu}}"
mkdir -p "$out_dir"
python="${PYTHON:-python3}"

if compgen -G ".whl/*.whl" > /dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

if (( shrink )); then
  image_size=64; batches="8 4"; steps=2; warmup=1
  e2e=(--steps 6 --warmup 2 --image_size 64 --synthetic_images 48 --threads 2
       --processes 0)
  recipe_batch=(--batch_size 8)
  backbone_table=(--backbones resnet18 --image_size 32 --batch_size 2 --steps 1 --warmup 1)
else
  image_size=224; batches="512 256 128"; steps=20; warmup=3
  e2e=(--steps 300 --warmup 30 --synthetic_images 4096)
  recipe_batch=()
  backbone_table=(--image_size 224 --batch_size 64 --steps 10 --warmup 2)
fi
if [[ -n "${BACKBONES:-}" ]]; then backbone_table+=(--backbones "$BACKBONES"); fi

for backbone in resnet18 resnet50; do
  fitted=0
  for batch in $batches; do
    # A batch that does not fit fails its process (out of memory); the next is smaller.
    if "$python" -m benchmarks.train_step --backbone "$backbone" --batch_size "$batch" \
        --image_size "$image_size" --dtype bfloat16 --steps "$steps" --warmup "$warmup" \
        --no_torch --json "$out_dir/step_$backbone.json"; then
      fitted=$batch; break
    fi
    echo "gpu.sh: $backbone at batch $batch failed (out of memory?); trying a smaller batch"
  done
  if (( ! fitted )); then echo "gpu.sh: no batch of $batches ran for $backbone" >&2; exit 1; fi
done

# End to end at the batch the ResNet-50 step ran at, so that the two compare.
"$python" -m benchmarks.end_to_end --config configs/resnet50_bf16.py "${e2e[@]}" \
    --batch_size "$fitted" --json "$out_dir/end_to_end.json"
# Liu & Lu's recipe as published: its own batch and precision.
"$python" -m benchmarks.end_to_end --config configs/landmark_attention.py "${e2e[@]}" \
    "${recipe_batch[@]}" --json "$out_dir/landmark_attention.json"

"$python" - "$out_dir" <<'EOF'
import json, os, sys
out = sys.argv[1]
read = lambda name: json.load(open(os.path.join(out, name)))
r18, r50, e2e = read('step_resnet18.json'), read('step_resnet50.json'), read('end_to_end.json')
recipe = read('landmark_attention.json')
rows = [('ResNet-18 train step', r18, r18['jax_img_s']),
        ('ResNet-50 train step', r50, r50['jax_img_s']),
        ('ResNet-50 end to end', e2e, e2e['end_to_end_img_s']),
        ('Liu & Lu end to end', recipe, recipe['end_to_end_img_s'])]
print(f"device: {r50['device']} x {r50['device_count']}, bfloat16 ({recipe['dtype']} for "
      f"Liu & Lu's recipe), {r50['image_size']} px")
# TFLOP/s: the step's FLOPs (XLA's count) at that rate; MFU against the device's dense
# peak for the dtype (deepfashion_jax/throughput.py; '-' where the peak is not listed).
print(f"{'measure':<24}{'batch':>7}{'img/s':>10}{'TFLOP/s':>10}{'MFU':>8}")
for name, result, value in rows:
  tflops = f"{result['tflops_per_sec']:.2f}" if 'tflops_per_sec' in result else '-'
  mfu = f"{result['mfu']:.1%}" if 'mfu' in result else '-'
  print(f"{name:<24}{result['batch_size']:>7}{value:>10.1f}{tflops:>10}{mfu:>8}")
ratio = e2e['end_to_end_img_s'] / r50['jax_img_s']
print(f"end to end / step alone (ResNet-50): {ratio:.2f}"
      + ('' if e2e['batch_size'] == r50['batch_size'] else
         f" (batches differ: {e2e['batch_size']} vs {r50['batch_size']})"))
summary = dict(device=r50['device'], resnet18_step_img_s=r18['jax_img_s'],
               resnet18_batch=r18['batch_size'], resnet50_step_img_s=r50['jax_img_s'],
               resnet50_batch=r50['batch_size'], end_to_end_img_s=e2e['end_to_end_img_s'],
               end_to_end_batch=e2e['batch_size'], end_to_end_over_step=ratio,
               landmark_attention_img_s=recipe['end_to_end_img_s'],
               landmark_attention_batch=recipe['batch_size'])
for prefix, (_, result, _) in zip(('resnet18_step', 'resnet50_step', 'end_to_end',
                                   'landmark_attention'), rows):
  summary.update({f'{prefix}_{key}': result[key]
                  for key in ('flops_per_step', 'tflops_per_sec', 'mfu') if key in result})
json.dump(summary, open(os.path.join(out, 'summary.json'), 'w'), indent=1)
EOF

# Every backbone (all of models/backbones.BACKBONES): its rows print as they come.
backbones_failed=0
if ! "$python" -m benchmarks.backbones "${backbone_table[@]}" --dtype bfloat16 \
    --json "$out_dir/backbones.json"; then
  echo "gpu.sh: a backbone failed in benchmarks/backbones.py (its row says why)" >&2
  backbones_failed=1
fi

# Last, every step timed above beside its roofline projection (benchmarks/projection.py:
# from XLA's FLOPs and bytes of the very step timed, nothing compiled again), on this
# device's peaks, an H200's where throughput.py does not list them.
pipeline=()
if [[ -n "${PIPELINE_JSON:-}" ]]; then pipeline=(--pipeline_json "$PIPELINE_JSON"); fi
"$python" -m benchmarks.projection --measured "$out_dir" "${pipeline[@]}" \
    --json "$out_dir/projection.json"
exit "$backbones_failed"
