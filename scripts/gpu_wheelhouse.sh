#!/usr/bin/env bash
# Pack what a GPU machine without a package index lacks for benchmarks/gpu_check.sh: the wheels
# (onnxruntime-gpu, Ray and the few of their needs such an image does not hold) and the
# models/minilm bundle (git-ignored, 86 MB), as one archive split into parts small enough for one
# transfer each: gpu_carry/part-NN (at most PART_MIB MiB, default 60) plus gpu_carry/MANIFEST.
#
#   bash scripts/gpu_wheelhouse.sh cp312                     # the lent H100/H200 image: Python 3.12
#   bash scripts/gpu_wheelhouse.sh cp311 --have none         # every wheel, for a bare interpreter
#   bash scripts/gpu_wheelhouse.sh 3.12 --have "numpy pyarrow tokenizers"
#   PART_MIB=50 bash scripts/gpu_wheelhouse.sh cp312 --no-model
#
# --have LIST: packages the target already has (space or comma separated; "none" for none). The
# default is the set the lent machines' image holds (/work/.library/device/KINDS.md, 2026-11):
# only onnxruntime-gpu, ray, pydantic and jsonschema (with their small needs) travel then.
# Versions are those of this checkout's .venv, so the target runs what the tests here ran.
# It prints the run calls that ferry the parts, then the one that runs the check (benchmarks/GPU.md).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: $0 PYVER (cp312 | 3.12) [--have LIST|none] [--no-model]" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
PYVER=$1; shift
case "$PYVER" in
    cp3[0-9]*) PYDOT="3.${PYVER#cp3}" ;;
    3.[0-9]*) PYDOT=$PYVER ;;
    *) usage ;;
esac

# What the lent image already holds (KINDS.md's package list) among what we need.
HAVE="click filelock msgpack packaging protobuf pyyaml requests charset-normalizer idna urllib3
certifi attrs flatbuffers numpy pyarrow fsspec tokenizers huggingface-hub safetensors tqdm onnx
ml-dtypes"
WITH_MODEL=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --have) [[ $# -ge 2 ]] || usage; HAVE=$2; shift 2 ;;
        --no-model) WITH_MODEL=0; shift ;;
        *) usage ;;
    esac
done
[[ "$HAVE" == none ]] && HAVE=""
HAVE=" $(echo "$HAVE" | tr ',A-Z_' ' a-z-' | xargs) "

PY=${PY:-.venv/bin/python}
PART_MIB=${PART_MIB:-60}
OUT=gpu_carry
# Always: the runtime and Ray. Then their needs and the pipeline's, each skipped when the target
# has it. typing-extensions travels although the image has one: pydantic wants a recent one.
ALWAYS="onnxruntime-gpu ray pydantic pydantic-core annotated-types typing-inspection
typing-extensions jsonschema jsonschema-specifications referencing rpds-py"
COMMON="click filelock msgpack packaging protobuf pyyaml requests charset-normalizer idna urllib3
certifi attrs flatbuffers numpy pyarrow fsspec tokenizers huggingface-hub safetensors tqdm onnx
ml-dtypes"

specs=()
for name in $ALWAYS $COMMON; do
    if [[ " $ALWAYS " != *" $name "* && "$HAVE" == *" $name "* ]]; then
        continue
    fi
    version=$("$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$name")
    case "$name" in  # the versions the project pins, whatever .venv holds
        onnxruntime-gpu) version=1.31.1 ;;
        ray) version=2.60.0 ;;
    esac
    specs+=("$name${version:+==$version}")
done

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/gpu-wheelhouse.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/carry/wheels"
platforms=()
for tag in manylinux_2_39 manylinux_2_38 manylinux_2_35 manylinux_2_34 manylinux_2_31 \
           manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
echo "== downloading ${#specs[@]} wheels for CPython $PYDOT: ${specs[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --implementation cp \
    --python-version "$PYDOT" "${platforms[@]}" -d "$STAGE/carry/wheels" "${specs[@]}"

if [[ $WITH_MODEL == 1 ]]; then
    for f in bundle.yaml model.onnx tokenizer.json; do
        [[ -f models/minilm/$f ]] || { echo "error: models/minilm/$f is missing: run make models" >&2; exit 2; }
    done
    mkdir -p "$STAGE/carry/models/minilm"
    cp models/minilm/bundle.yaml models/minilm/model.onnx models/minilm/tokenizer.json \
        "$STAGE/carry/models/minilm/"
fi
(cd "$STAGE/carry" && ls -l wheels | awk 'NR > 1 {printf "   %6.1f MiB  %s\n", $5 / 1048576, $9}')

# Wheels are zip files already and float32 weights hardly compress: a plain tar is as small as
# xz would make it within a few per cent, and it unpacks in seconds there.
tar -C "$STAGE/carry" -cf "$STAGE/carry.tar" .
rm -rf "$OUT" && mkdir -p "$OUT"
split -b "${PART_MIB}m" -d -a 2 "$STAGE/carry.tar" "$OUT/part-"
{
    echo "# gpu_carry manifest: cat part-* in order | sha256sum must give the archive line"
    echo "archive $(sha256sum < "$STAGE/carry.tar" | cut -d' ' -f1) $(stat -c %s "$STAGE/carry.tar")"
    echo "python $PYDOT"
    (cd "$OUT" && for p in part-*; do echo "part $p $(sha256sum < "$p" | cut -d' ' -f1)"; done)
} > "$OUT/MANIFEST"

parts=("$OUT"/part-*)
total=$(stat -c %s "$STAGE/carry.tar")
printf "== %s: %d parts, %.1f MiB in all (archive of %s)\n" "$OUT" "${#parts[@]}" \
    "$(echo "$total / 1048576" | bc -l)" "$(cd "$STAGE/carry" && du -sh . | cut -f1)"
echo "== the run calls, one after the other with no pause (a machine idle for 30 s is given back,"
echo "   and the parts it held with it): each carries one part, the last one runs the check"
n=${#parts[@]}
for i in "${!parts[@]}"; do
    part=${parts[$i]}
    extra=""; [[ $i == 0 ]] && extra="\"$OUT/MANIFEST\", "
    if (( i == 0 )); then  # look before the rest travels: the GPU, the Python the wheels need
        cmd="nvidia-smi -L; python3 --version; python3 -m pip list 2>/dev/null | grep -iE \"^(onnxruntime|ray|torch|nvidia-cudnn) \"; ls -l $OUT"
    elif (( i + 1 < n )); then
        cmd="ls -l $OUT"
    else
        cmd="set -o pipefail; GPU_CARRY=1 bash benchmarks/gpu_check.sh 2>&1 | tee \$OUT/gpu_check.log"
    fi
    echo "   run(carry=[${extra}\"$part\"], timeout_s=$( (( i + 1 < n )) && echo 60 || echo 420 ), command='$cmd')"
done
