#!/usr/bin/env bash
# One GPU session in one call: environment, then the named parts in order, logs under $OUT.
#   bash bench/gpu_session.sh "gpu-tests tune bench kernel-tests" [extra memzoo-bench step args...]
#   bash bench/gpu_session.sh "train zo memory"   (then memzoo-bench plot OUT/train_60m_a.json a.png locally)
# Runs from the repository root. Wheels of packages the machine lacks (bitsandbytes, and the
# baselines lion-pytorch, galore-torch and apollo-torch) are installed from .whl/ when that folder exists.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/memzoo-out}
mkdir -p "$OUT"
parts=${1:-gpu-tests bench kernel-tests}
shift || true

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
# The repository root is the memzoo package: expose it under that name without installing.
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/memzoo
export PYTHONPATH=/tmp/pkg${PYTHONPATH:+:$PYTHONPATH}

exec > >(tee -a "$OUT/session.log") 2>&1  # everything below also lands in $OUT/session.log
python3 - <<'EOF'
import platform, torch, triton
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__)
print("device", torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, "SMs")
try:
    import bitsandbytes
    print("bitsandbytes", bitsandbytes.__version__)
except Exception as exc:
    print("bitsandbytes missing:", exc)
EOF

bench() {  # bench NAME ARGS...: one memzoo-bench command, its table to stdout and $OUT/NAME.*
    local name=$1; shift
    echo "### memzoo-bench $*"
    python3 -m memzoo.bench "$@" --json "$OUT/$name.json" 2>&1 | grep -v '^USDT'
}

for part in $parts; do
    case $part in
    gpu-tests)
        timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_multi_tensor.py \
            > "$OUT/pytest_gpu.log" 2>&1
        echo "pytest -m gpu: exit $?"; tail -25 "$OUT/pytest_gpu.log" ;;
    tune)  # the GEMM tiles; the best are used by the parts after this one
        python3 -m memzoo.bench.tune --kernels "${TUNE_KERNELS:-galore}" 2>&1 | tee "$OUT/tune.log"
        export MEMZOO_GALORE_PROJECT_TILES=$(awk '/^BEST PROJECT_TILES/ {print $3}' "$OUT/tune.log")
        export MEMZOO_GALORE_APPLY_TILES=$(awk '/^BEST APPLY_TILES/ {print $3}' "$OUT/tune.log")
        echo "tiles: project $MEMZOO_GALORE_PROJECT_TILES apply $MEMZOO_GALORE_APPLY_TILES" ;;
    bench)  # ours against the baselines
        bench step_lion step --optimizer lion --baseline lion_pytorch,lion_pytorch_triton,bnb_lion8bit "$@"
        bench step_lion_bf16m step --optimizer lion --set momentum_dtype=bf16 "$@"
        bench step_galore_triton step --optimizer galore_adamw,natural_galore --backend triton "$@"
        bench step_galore_torch step --optimizer galore_adamw,natural_galore --backend torch --baseline galore_torch "$@"
        bench step_apollo step --optimizer apollo,apollo_mini,frugal --backend triton \
            --baseline apollo_torch,apollo_mini_torch "$@"
        bench step_cosmos step --optimizer cosmos --backend triton "$@"
        bench step_cosmos_torch step --optimizer cosmos --backend torch "$@"
        bench step_zo step --optimizer mezo,sparse_mezo,qzo --backend triton --baseline mezo_official "$@"
        bench step_zo_bf16 step --optimizer mezo,sparse_mezo --backend triton --baseline mezo_official --dtype bf16 "$@"
        bench kernels kernels --no-compile ;;
    bench-ours)  # ours only, steady state and refresh
        bench step_lion step --optimizer lion "$@"
        bench step_lion_bf16m step --optimizer lion --set momentum_dtype=bf16 "$@"
        bench step_galore_triton step --optimizer galore_adamw,natural_galore --backend triton "$@"
        bench step_apollo step --optimizer apollo,apollo_mini,frugal --backend triton "$@"
        bench step_zo step --optimizer mezo,sparse_mezo,qzo --backend triton "$@"
        bench kernels kernels --no-compile ;;
    train)  # issue 7's bars: 60m, equal steps, best of 3 lrs (AdamW always included)
        bench train_60m_a train --preset 60m --optimizer lion,apollo,apollo_mini,frugal "$@"
        bench train_60m_b train --preset 60m --optimizer galore_adamw,natural_galore,cosmos "$@" ;;
    zo)  # zeroth-order fine-tuning of the cached 60m checkpoint (pretrained here on first use)
        bench zo_60m zo --preset 60m --cache-dir /tmp/memzoo-cache "$@" ;;
    memory)
        bench memory_350m memory --preset 350m --layerwise "$@"
        bench memory_1b memory --preset 1b --dtype bf16 "$@" ;;
    kernel-tests)  # one process per kernel: a CUDA error poisons its process, not the others' results
        for function in $(python3 -c "from memzoo.bench.kernel_cases import KERNELS; print(' '.join(p.function for p in KERNELS.values()))"); do
            timeout "${KERNEL_TEST_TIMEOUT:-120}" python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
                -k "$function" > "$OUT/pytest_kernels_$function.log" 2>&1
            echo "pytest kernels $function: exit $?"; tail -3 "$OUT/pytest_kernels_$function.log"
        done
        timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_random.py > "$OUT/pytest_random.log" 2>&1
        echo "pytest random: exit $?"; tail -3 "$OUT/pytest_random.log"
        timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_zeroth_order.py > "$OUT/pytest_zo.log" 2>&1
        echo "pytest zeroth-order: exit $?"; tail -3 "$OUT/pytest_zo.log" ;;
    *) echo "unknown part $part"; exit 2 ;;
    esac
done
