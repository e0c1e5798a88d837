#!/usr/bin/env bash
# Set up .venv if needed, then run the main job on the shipped defaults:
# segment and score the assembled sample field with the shipped model.
#
# Headless (no $DISPLAY): writes the per-cell table and maps to out/demo/ and
# a screenshot of napari with the result layers to out/demo/demo.png (through
# xvfb-run). With a display: opens napari with the result layers.
# Extra arguments go to `napari-supn demo` (for example --sample giemsa).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

sample=fluorescence
previous=""
for argument in "$@"; do
    if [ "$previous" = "--sample" ]; then sample="$argument"; fi
    case "$argument" in --sample=*) sample="${argument#--sample=}" ;; esac
    previous="$argument"
done

if [ -n "${DISPLAY:-}" ]; then
    exec .venv/bin/napari-supn demo "$@"
fi

mkdir -p out/demo
.venv/bin/napari-supn score "src/napari_supn/sample_data/${sample}_field.png" \
    --model "$sample" --out out/demo
xvfb-run -a .venv/bin/napari-supn demo --screenshot out/demo/demo.png "$@"
echo "Results in out/demo/: ${sample}_field_cells.csv (ranked cells), label and map TIFFs, demo.png"
