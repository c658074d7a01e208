#!/usr/bin/env bash
# The whole GPU check in one command, offline, from a checkout (docs/gpu.md):
#
#   benchmarks/gpu_run.sh --download     # beforehand, with network: fill benchmarks/wheels
#   benchmarks/gpu_run.sh [OUTPUT_DIR]   # on the GPU machine; OUTPUT_DIR defaults to $OUT
#
# 1. install: a virtual environment over the machine's Python that sees every package already
#    installed there, plus the project (editable) and benchmarks/gpu_wheels.txt from the wheel
#    folder, with --no-index and every installed distribution pinned to its installed version:
#    torch, jax and cupy are used as they are, never replaced.
# 2. gpu_check: benchmarks/gpu_check.py (its JSON and log).
# 3. pytest: python -m pytest -m gpu (its log and JUnit XML), stopping itself within its budget.
# Each section runs under its share of the budget (GPU_RUN_BUDGET_S, default 560 s) and prints
# it with the time used; gpu_run.json sums it up. Without an NVIDIA GPU, gpu_check runs its CPU
# reduced plan and every GPU test case skips: that checks this script and the install, not a GPU.
set -u

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
WHEELS=${GPU_WHEELS:-$HERE/wheels}
REQUIREMENTS=$HERE/gpu_wheels.txt
PYTHON=${PYTHON:-python3}
TARGET_TAGS=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312)
for minor in 28 27 26 25 24 23 22 21 20 19 18 17; do
    TARGET_TAGS+=(--platform "manylinux_2_${minor}_x86_64")
done
TARGET_TAGS+=(--platform manylinux2014_x86_64)

if [ "${1:-}" = "--download" ]; then
    command=("$PYTHON" -m pip download -r "$REQUIREMENTS" -d "$WHEELS" "${TARGET_TAGS[@]}")
    echo "${command[*]}"
    exec "${command[@]}"
fi

OUT_DIR=${1:-${OUT:-}}
if [ -z "$OUT_DIR" ]; then
    echo "usage: $0 OUTPUT_DIR (or set \$OUT), or $0 --download" >&2
    exit 2
fi
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
BUDGET_S=${GPU_RUN_BUDGET_S:-560}
STARTED=$SECONDS
SECTIONS=()

if ls /dev/nvidia[0-9]* >/dev/null 2>&1 || ls /proc/driver/nvidia/gpus/* >/dev/null 2>&1; then
    PLAN=gpu
    nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1
else
    PLAN=cpu
    echo "no NVIDIA GPU: CPU reduced plan (gpu_check's CPU targets; every GPU test case skips)"
fi

# section NAME SHARE_PERCENT COMMAND...: runs COMMAND under min(its share of the budget, the
# time left), its output in $OUT_DIR/NAME.log; prints and records the budget and the time used.
section() {
    local name=$1 share=$2
    shift 2
    local left=$((BUDGET_S - (SECONDS - STARTED)))
    local budget=$((BUDGET_S * share / 100))
    [ "$budget" -gt "$left" ] && budget=$left
    [ "$budget" -lt 1 ] && budget=1
    echo "== $name: budget ${budget} s (of ${left} s left)"
    local begun=$SECONDS
    SECTION_BUDGET_S=$budget timeout --kill-after=10 "$budget" "$@" > "$OUT_DIR/$name.log" 2>&1
    local rc=$?
    local used=$((SECONDS - begun))
    tail -n 25 "$OUT_DIR/$name.log"
    local note=""
    [ $rc -eq 124 ] && note=" (budget exceeded, stopped)"
    echo "== $name: rc $rc, used ${used} s of ${budget} s$note"
    SECTIONS+=("\"$name\": {\"budget_s\": $budget, \"used_s\": $used, \"rc\": $rc}")
    return $rc
}

VENV=${GPU_RUN_VENV:-${TMPDIR:-/tmp}/asgo-gpu-run-venv}

install_offline() {
    rm -rf "$VENV"
    "$PYTHON" -m venv --without-pip "$VENV" || return
    local site
    site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return
    # The machine's site directories, .pth files included, after the environment's own.
    "$PYTHON" - "$site/_machine_site.pth" <<'PY' || return
import site, sys
directories = site.getsitepackages() + [site.getusersitepackages()]
with open(sys.argv[1], "w") as pth:
    pth.write("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in directories) + "\n")
PY
    # Every installed distribution stays at its version: pip fails rather than replace one.
    "$PYTHON" - > "$VENV/installed.txt" <<'PY' || return
from importlib import metadata
names = {d.metadata["Name"]: d.version for d in metadata.distributions() if d.metadata["Name"]}
print("\n".join(f"{name}=={version}" for name, version in sorted(names.items()) if name.lower() != "asgo"))
PY
    echo "python: $("$VENV/bin/python" -c 'import sys; print(sys.version)')"
    echo "installed distributions pinned: $(wc -l < "$VENV/installed.txt")"
    local pip=("$VENV/bin/python" -m pip --isolated --disable-pip-version-check)
    "${pip[@]}" install --no-compile --no-index --find-links "$WHEELS" --constraint "$VENV/installed.txt" \
        -r "$REQUIREMENTS" -e "$ROOT" || return
    "${pip[@]}" freeze > "$OUT_DIR/environment.txt"
}

run_gpu_check() {
    "$VENV/bin/python" "$ROOT/benchmarks/gpu_check.py" --json "$OUT_DIR/gpu_check.json"
}

# pytest stops itself 20 s before the section's budget, so its summary and XML are written.
run_pytest() {
    cd "$ROOT" && "$VENV/bin/python" -m pytest -m gpu -q -rfEs -p no:cacheprovider --timeout 150 \
        --session-timeout $((SECTION_BUDGET_S - 20)) --junitxml "$OUT_DIR/pytest_gpu.xml"
}

# The sections run under `timeout` in a child bash, which takes these from the environment.
export ROOT WHEELS REQUIREMENTS PYTHON OUT_DIR VENV
export -f install_offline run_gpu_check run_pytest

section install 15 bash -c install_offline
installed=$?
if [ $installed -eq 0 ]; then
    section gpu_check 55 bash -c run_gpu_check
    section pytest_gpu 100 bash -c run_pytest
fi

summary="{\"plan\": \"$PLAN\", \"budget_s\": $BUDGET_S, \"used_s\": $((SECONDS - STARTED)), "
summary+="\"sections\": {$(IFS=,; echo "${SECTIONS[*]}")}}"
echo "$summary" > "$OUT_DIR/gpu_run.json"
echo "== total: $((SECONDS - STARTED)) s of ${BUDGET_S} s ($PLAN plan); logs and JSON in $OUT_DIR"
[ $installed -eq 0 ] && grep -q '"rc": [1-9]' "$OUT_DIR/gpu_run.json" && exit 1
exit $installed
