#!/usr/bin/env bash
# Build llama.cpp's own benchmark tools (llama-bench, llama-batched-bench), its plain command-line generator
# (llama-completion) and its HTTP server (llama-server) into .llama.cpp/bin, from the llama.cpp source vendored by the llama-cpp-python release
# pinned in constraints.txt: the same llama.cpp the tests load GGUF files with. `python -m benchmarks
# generate` and `python -m benchmarks serve` run these beside penwright. Needs cmake and a C++ compiler; ~10 min on 2 cores.
#
#   scripts/build_llama_cpp.sh [DEST]      (default DEST: .llama.cpp)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=$(realpath -m "${1:-.llama.cpp}")
version=$(sed -n 's/^llama[-_]cpp[-_]python==//p' constraints.txt)
[ -n "$version" ] || { echo "constraints.txt pins no llama-cpp-python version" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "[llama.cpp] fetching the llama-cpp-python $version source release" >&2
python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
tar xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
generator=(); command -v ninja >/dev/null && generator=(-G Ninja)
cpu=(-DGGML_NATIVE=ON)  # llama.cpp's default: every instruction set this CPU has
if grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then
    # ggml's AMX matrix kernels crash (SIGSEGV in ggml_backend_amx_mul_mat) on q8_0/q4_0 on such a machine:
    # the same instruction sets without AMX, so quantized models run on llama.cpp's AVX-512 kernels, repacked
    cpu=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
    for flag in avx512f:AVX512 avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
        grep -qw "${flag%%:*}" /proc/cpuinfo && cpu+=("-DGGML_${flag#*:}=ON")
    done
fi
cmake -S "$src" -B "$work/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON "${cpu[@]}" >&2
echo "[llama.cpp] compiling (${cpu[*]})" >&2
cmake --build "$work/build" --config Release -j "$(nproc)" --target llama-bench llama-batched-bench llama-completion llama-server >&2
mkdir -p "$dest/bin"
cp "$work"/build/bin/llama-bench "$work"/build/bin/llama-batched-bench "$work"/build/bin/llama-completion \
    "$work"/build/bin/llama-server "$dest/bin/"
echo "$version" > "$dest/VERSION"
echo "[llama.cpp] $dest/bin: $(ls "$dest/bin" | tr '\n' ' ')" >&2
