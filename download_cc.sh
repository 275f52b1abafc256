#!/usr/bin/env bash
# Download Conceptual Captions images with img2dataset into parquet shards that prep_cc.py reads.
#
#   bash download_cc.sh <Train_GCC-training.tsv> <PATH_TO_RAW_SAVE>
#   PROCESSES=16 THREADS=64 IMAGE_SIZE=256 bash download_cc.sh Train_GCC-training.tsv data/cc_raw
#
# Google's TSV has no header and puts the caption first ("caption<TAB>url"). img2dataset finds its columns by
# name (--url_col url --caption_col caption), so this script writes a copy with the header line
# "caption<TAB>url" next to the output folder, unless the file already starts with a header naming both columns.
# Then it runs the design's command:
#
#   img2dataset --url_list <PATH_TO_TSV> --input_format "tsv" --url_col "url" --caption_col "caption" \
#     --output_format parquet --output_folder <PATH_TO_RAW_SAVE> --processes_count 32 --thread_count 128 \
#     --image_size 256 --resize_mode keep_ratio
#
# What to tune (environment variables):
#   PROCESSES   img2dataset --processes_count: one per CPU core is a good start (default 32)
#   THREADS     img2dataset --thread_count, download threads per process; network-bound (default 128).
#               At high totals a local caching DNS resolver (e.g. bind9 or knot-resolver) avoids DNS failures.
#   IMAGE_SIZE  img2dataset --image_size: keep_ratio resizes the SHORTER side to this (default 256); train at
#               this size or smaller (the dataset centre-crops to the model's img_size)
#   EXTRA_ARGS  anything else for img2dataset, e.g. "--retries 2 --timeout 20"
# Re-running the same command resumes: img2dataset's default --incremental_mode incremental skips finished
# shards. Then: python prep_cc.py --path_to_data_root <PATH_TO_RAW_SAVE> --path_to_save <PATH_TO_PROCESSED_SAVE> ...
# (README.md (Conceptual Captions section) has the whole data path with disk and time figures).
set -euo pipefail

if [ "$#" -ne 2 ]; then
    echo "usage: bash download_cc.sh <conceptual_captions.tsv> <output_folder>" >&2
    exit 2
fi
TSV_IN=$1
OUT=${2%/}
if [ -z "$OUT" ]; then
    echo "download_cc.sh: the output folder must not be empty or /" >&2
    exit 2
fi
PROCESSES=${PROCESSES:-32}
THREADS=${THREADS:-128}
IMAGE_SIZE=${IMAGE_SIZE:-256}
EXTRA_ARGS=${EXTRA_ARGS:-}
IMG2DATASET=${IMG2DATASET:-img2dataset}

if [ ! -f "$TSV_IN" ]; then
    echo "download_cc.sh: $TSV_IN not found (get Train_GCC-training.tsv from the Conceptual Captions download page)" >&2
    exit 2
fi

first_line=$(head -n 1 "$TSV_IN" | tr -d '\r')
if printf '%s\n' "$first_line" | tr '\t' '\n' | grep -qx url && printf '%s\n' "$first_line" | tr '\t' '\n' | grep -qx caption; then
    TSV=$TSV_IN  # already has a header naming "url" and "caption"
else
    TSV="$OUT.with_header.tsv"
    mkdir -p "$(dirname "$OUT")"  # the copy sits next to the output folder, whose parents may not exist yet
    # reuse the copy only when it holds exactly this input (a copy made from another TSV would be downloaded instead)
    if [ ! -f "$TSV" ] || ! tail -n +2 "$TSV" | cmp -s - "$TSV_IN"; then
        echo "writing $TSV (the input with a 'caption<TAB>url' header line)"
        { printf 'caption\turl\n'; cat "$TSV_IN"; } > "$TSV.partial"
        mv "$TSV.partial" "$TSV"
    fi
fi

# shellcheck disable=SC2086  # EXTRA_ARGS is a list of words on purpose
"$IMG2DATASET" --url_list "$TSV" \
    --input_format "tsv" \
    --url_col "url" \
    --caption_col "caption" \
    --output_format parquet \
    --output_folder "$OUT" \
    --processes_count "$PROCESSES" \
    --thread_count "$THREADS" \
    --image_size "$IMAGE_SIZE" \
    --resize_mode keep_ratio \
    $EXTRA_ARGS
