#!/usr/bin/env bash
# On the GPU machine, from a checkout of gemma-chat: bash gpu_device.sh FOLDER (made by
# bench/gpu_pack.py). Unpacks what FOLDER holds into /tmp/gpu, keeping model parts from earlier
# calls, and once every part is there runs bench/gpu.py (results in $OUT, else bench/results).
set -euo pipefail
FOLDER=${1:-.gpu}
G=/tmp/gpu
OUT=${OUT:-bench/results}
mkdir -p "$G/parts" "$G/site" "$OUT"
cp -n "$FOLDER"/parts/part.* "$G/parts/" 2>/dev/null || true
if [ ! -d "$G/site/llama_cpp" ] && [ -f "$FOLDER/llama_cpp.tar.xz" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$G/site" "$FOLDER"/whl/*.whl
  tar xJf "$FOLDER/llama_cpp.tar.xz" -C "$G/site"
fi
ls -la "$G/parts"
[ "${GPU_RUN:-0}" = 1 ] || exit 0

# What an install's package-dir mapping would provide: the templates inside the package.
mkdir -p gemmachat/builtin_templates && cp templates/*.toml gemmachat/builtin_templates/
cat "$G"/parts/part.* > "$G/model.gguf"
sha256sum "$G/model.gguf"
export PYTHONPATH="$G/site:$PWD" PYTHONUNBUFFERED=1
# The CUDA runtime and cuBLAS (13.x) of the machine's toolkit or its Python packages; never bundled.
LIBS=""
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia; print(" ".join(p + "/cu13/lib" for p in nvidia.__path__))' 2>/dev/null); do
  [ -e "$d/libcublas.so.13" ] && LIBS="$LIBS:$d"
done
export LD_LIBRARY_PATH="$G/site/llama_cpp/lib$LIBS:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 120 python3 -m gemmachat --cli -m "$G/model.gguf" -ngl 999 -p "The capital of France is" -n 24 --temp 0 \
  --verbose 2>"$OUT/first.log" || echo "first run: exit $?"
grep -E "loaded .* backend|offloaded|no GPU" "$OUT/first.log" | head
GEMMA_CHAT_NATIVE_BIN="$G/site/llama_cpp/lib" timeout 480 python3 bench/gpu.py --model "$G/model.gguf" --out "$OUT" \
  --reps "${REPS:-5}" 2>&1 | tee "$OUT/gpu.log"
