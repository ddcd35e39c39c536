#!/usr/bin/env bash
# Set up (idempotently, see scripts/setup.sh) and run the main job on the bundled sample:
#
#   bash scripts/demo.sh                  # writes ./upa-demo/
#   bash scripts/demo.sh --out /tmp/demo --weights dinov2_vits14_pretrain.pth
#
# Extra arguments go to `upsample-anything demo`. Without pretrained DINOv2 weights (no
# network, nothing in the Hugging Face cache, no --weights file) the demo says so in one
# line and runs its model-free part: stain maps of the image downsampled to the ViT patch
# grid and upsampled again, scored against the full-resolution truth.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
printf '\n==> [demo] .venv/bin/upsample-anything demo %s\n' "$*"
exec .venv/bin/upsample-anything demo "$@"
