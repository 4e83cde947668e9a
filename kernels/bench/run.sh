#!/usr/bin/env bash
# The GPU benchmark, on a machine with a GPU, CUDA 13 and PyTorch but no Rust:
#   bash gpu-bench/run.sh            (after `cargo xtask gpu-bench` packaged the folder)
# First the GPU tests (kernels against the f64 reference, the fisher backend against the
# CPU one), plain and then under compute-sanitizer's memcheck and racecheck when the
# machine has it; a test that prints "skipped" fails the run here, as it means no GPU.
# Then our kernels (gpu-bench: correctness checks, then CUDA-event medians) and PyTorch's
# paths plus the card's ceilings (pytorch_squares.py), and the table. Results go to $OUT
# when set (this workplace's device tool brings that folder back), else to gpu-bench/out.
# Pass --quick for fewer repetitions; --tests-only to stop after the tests.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${OUT:-$here/out}"
mkdir -p "$out"
quick=()
tests_only=0
for arg in "$@"; do
    case "$arg" in
        --quick) quick=(--quick) ;;
        --tests-only) tests_only=1 ;;
        *) echo "run.sh: unknown argument $arg (--quick, --tests-only)" >&2; exit 2 ;;
    esac
done
python="$(command -v python3)"

# The kernels are compiled at run time by NVRTC: use the toolkit's libnvrtc or the one
# PyTorch's pip wheels ship (nvidia/cu13/lib or nvidia/cuda_nvrtc/lib).
nvrtc_dirs="$("$python" - <<'PY'
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
found = []
for r in roots:
    for pattern in ("nvidia/*/lib/libnvrtc.so*", "nvidia/cuda_nvrtc/lib/libnvrtc.so*"):
        found += glob.glob(os.path.join(r, pattern))
print(":".join(sorted({os.path.dirname(f) for f in found})))
PY
)"
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [[ -d "$d" ]] && nvrtc_dirs="${nvrtc_dirs:+$nvrtc_dirs:}$d"
done
export LD_LIBRARY_PATH="${nvrtc_dirs:+$nvrtc_dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" | tee "$out/env.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv \
    2>&1 | tee -a "$out/env.txt" || true

status=0
# Runs one test executable (name, then arguments), its output to $out/tests-<label>.log;
# fails on a failed test and on any "skipped:" line (no GPU, no NVRTC).
run_tests() {
    local label="$1"; shift
    local log="$out/tests-$label.log"
    # lib/: OpenBLAS and its runtime for the fisher tests (the machine may have none),
    # for the tests only, not for PyTorch below.
    if ! LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$@" 2>&1 \
        | tee "$log"; then
        echo "run.sh: $label failed" >&2; status=1
    fi
    if grep -q 'skipped: ' "$log"; then
        echo "run.sh: $label skipped GPU tests (see $log)" >&2; status=1
    fi
}
sanitizer="$(command -v compute-sanitizer || true)"
[[ -z "$sanitizer" && -x /usr/local/cuda/bin/compute-sanitizer ]] \
    && sanitizer=/usr/local/cuda/bin/compute-sanitizer
for t in "$here"/tests/*; do
    name="$(basename "$t")"
    # --nocapture: the logs keep what the tests print (seeds, ptxas's report).
    run_tests "$name" "$t" --test-threads 1 --nocapture
    if [[ -n "$sanitizer" ]]; then
        # memcheck: out-of-bounds and misaligned accesses, on every test but the 1,000
        # launches of the bit-for-bit test (minutes under the tool). racecheck
        # (shared-memory hazards, slower still) on the small shapes of the block-level
        # test: several samples per block, both reductions, both modes.
        run_tests "$name-memcheck" "$sanitizer" --tool memcheck --error-exitcode 3 \
            "$t" --test-threads 1 --skip repeated_launches_give_identical_bits
        if [[ "$name" == kernels-gpu ]]; then
            run_tests "$name-racecheck" "$sanitizer" --tool racecheck --error-exitcode 3 \
                "$t" --test-threads 1 --exact several_samples_per_block
        fi
    else
        echo "run.sh: no compute-sanitizer on this machine; tests ran without it" \
            | tee -a "$out/env.txt"
    fi
done
if [[ "$tests_only" == 1 ]]; then exit "$status"; fi

"$here/gpu-bench" --out "$out/ours.json" "${quick[@]}" 2>&1 | tee "$out/ours.log" || status=1
PYTHONUNBUFFERED=1 "$python" "$here/pytorch_squares.py" measure --out "$out/torch.json" \
    "${quick[@]}" 2>&1 | tee "$out/torch.log" || status=1
if [[ -s "$out/ours.json" && -s "$out/torch.json" ]]; then
    "$python" "$here/pytorch_squares.py" table "$out/ours.json" "$out/torch.json" \
        | tee "$out/table.md" || status=1
fi
exit "$status"
