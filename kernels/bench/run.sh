#!/usr/bin/env bash
# The GPU benchmark, on a machine with a GPU, CUDA 13 and PyTorch but no Rust:
#   bash gpu-bench/run.sh            (after `cargo xtask gpu-bench` packaged the folder)
# Runs our kernels (gpu-bench: correctness check, then CUDA-event medians) and PyTorch's
# paths plus the card's ceilings (pytorch_squares.py), then prints the table. Results go
# to $OUT when set (this workplace's device tool brings that folder back), else to
# gpu-bench/out. Pass --quick for fewer repetitions.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${OUT:-$here/out}"
mkdir -p "$out"
quick=()
if [[ "${1:-}" == "--quick" ]]; then quick=(--quick); fi
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
export LD_LIBRARY_PATH="${nvrtc_dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" | tee "$out/env.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv \
    2>&1 | tee -a "$out/env.txt" || true

status=0
"$here/gpu-bench" --out "$out/ours.json" "${quick[@]}" 2>&1 | tee "$out/ours.log" || status=1
PYTHONUNBUFFERED=1 "$python" "$here/pytorch_squares.py" measure --out "$out/torch.json" \
    "${quick[@]}" 2>&1 | tee "$out/torch.log" || status=1
if [[ -s "$out/ours.json" && -s "$out/torch.json" ]]; then
    "$python" "$here/pytorch_squares.py" table "$out/ours.json" "$out/torch.json" \
        | tee "$out/table.md" || status=1
fi
exit "$status"
