#!/usr/bin/env bash
# benchmarks/gpu_speed.py on the lent GPU machine (issue 18's "Measure"), in one call of the device tool:
#
#   run(command="bash benchmarks/gpu_device.sh", carry=[".whl"], timeout_s=600)
#
# That machine has torch, transformers, peft, accelerate, pandas, pyarrow, xxhash, pyyaml and tqdm but
# no network, so the rest travels in the ignored folder .whl: the wheels tunesmith's training path and
# TRL need, and SmolLM2's tokenizer files (.whl/tokenizer; the weights are not needed: the models are
# random weights of the benchmark's shapes). Make that folder here first, once per checkout:
#
#   bash benchmarks/gpu_device.sh prepare
#
# Extra arguments go to gpu_speed.py (e.g. --shapes 1b); results land in $OUT/gpu_speed.json and
# $OUT/gpu_speed.log. Runs that would start after --deadline-s are skipped, so the summary is printed
# well inside the device's 10-minute limit.
set -o pipefail
cd "$(dirname "$0")/.." || exit 2

WHEELS="pydantic==2.14.4 pydantic-core==2.50.5 typing-inspection==0.4.5 annotated-types==0.8.0
typing-extensions==4.16.0 platformdirs==4.14.9 trl==1.16.0 datasets==5.2.0 dill==0.4.1
multiprocess==0.70.19 fsspec==2026.9.0 bitsandbytes==0.50.2"

prepare() {
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo /.whl/ >> .git/info/exclude; }
    mkdir -p .whl/tokenizer
    # shellcheck disable=SC2086  # one argument per wheel
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d .whl $WHEELS || exit 1
    slim_bitsandbytes .whl/bitsandbytes-*.whl || exit 1
    local src
    src=$(.venv/bin/python -c 'from tunesmith.models.resolve import resolve_model as r; print(r("smollm2-135m-instruct"))') \
        || exit 1
    for f in tokenizer.json tokenizer_config.json chat_template.jinja special_tokens_map.json; do
        [ -f "$src/$f" ] && cp "$src/$f" .whl/tokenizer/
    done
    ls -la .whl .whl/tokenizer && du -sh .whl
}

# bitsandbytes ships one library per CUDA/ROCm/XPU version (120 MB unpacked); the machine's torch is
# built for CUDA 13.0, so only the CUDA 13 and CPU libraries are kept (the wheel drops from 41 to ~3 MiB).
slim_bitsandbytes() {
    python3 - "$1" <<'EOF'
import re, sys, zipfile
from pathlib import Path

path = Path(sys.argv[1])
drop = re.compile(r"bitsandbytes/libbitsandbytes_(?!cuda13\d|cpu)\w+\.so$")
with zipfile.ZipFile(path) as src:
    items = [(i, src.read(i)) for i in src.infolist() if not drop.search(i.filename)]
tmp = path.with_suffix(".tmp")
with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
    for info, data in items:
        if info.filename.endswith(".dist-info/RECORD"):  # the dropped files leave the record too
            data = b"".join(l for l in data.splitlines(True) if not drop.search(l.split(b",")[0].decode()))
        out.writestr(info, data)
tmp.replace(path)
EOF
}

if [ "$1" = prepare ]; then
    prepare
    exit
fi

OUT=${OUT:-/tmp/gpu-speed-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pip list 2>/dev/null | grep -iE '^(torch|transformers|peft|accelerate|pyarrow|pandas|huggingface.hub|xxhash) '
# A missing or clashing package shows here in seconds, with its traceback (the benchmark still runs what it can).
python3 -c 'import pydantic, datasets, trl, bitsandbytes, tunesmith.train.trainer; print("imports ok")' 2>&1 | tail -5
python3 benchmarks/gpu_speed.py --tokenizer .whl/tokenizer --deadline-s 420 --json-out "$OUT/gpu_speed.json" "$@" 2>&1 \
    | tee "$OUT/gpu_speed.log"
