#!/usr/bin/env bash
# Plants known bugs in copies of kernels/*.cu, one at a time, and checks that the CPU emulation
# (kernels/tests/emulation.rs) catches each: a test of the tests. Not part of CI (a few minutes);
# run it after changing the emulation or the harnesses:  kernels/tests/emu/mutants.sh [head_dim]
# (MUTANTS_ONLY=fp8 runs only the mutants whose name contains "fp8").
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
kernels="$(cd "$here/../.." && pwd)"
dim="${1:-128}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
survived=0

# mutant NAME FILE HARNESS OLD NEW: replaces the first OLD in FILE by NEW and expects a failure.
# MUTANT_DIM overrides the head dim for a mutant that only matters at some head dims.
mutant() {
    local name="$1" file="$2" harness="$3" old="$4" new="$5"
    [[ "$name" == *"${MUTANTS_ONLY:-}"* ]] || return 0
    rm -rf "$work/k" && mkdir -p "$work/k/tests/emu"
    cp "$here"/*.h "$here"/*.cpp "$work/k/tests/emu/" && cp "$kernels"/*.cu "$work/k/"
    python3 - "$work/k/$file" "$old" "$new" <<'PY'
import sys
path, old, new = sys.argv[1:]
text = open(path).read()
if old not in text:
    sys.exit(f"mutant no longer applies, pattern not found: {old!r}")
open(path, "w").write(text.replace(old, new, 1))
PY
    g++ -std=c++17 -O1 -g -fno-strict-aliasing -fsanitize=address,undefined -fno-sanitize-recover=all \
        -I "$work/k/tests/emu" -DARB_HEAD_DIM="${MUTANT_DIM:-$dim}" "$work/k/tests/emu/$harness" -o "$work/m"
    if ASAN_OPTIONS=detect_leaks=0 "$work/m" >"$work/out" 2>&1; then
        echo "SURVIVED  $name"
        survived=$((survived + 1))
    else
        echo "caught    $name: $(grep -m1 -o 'FAIL.*\|AddressSanitizer: [a-z-]*\|emulation: [^(]*' "$work/out" | cut -c1-70)"
    fi
}

A=attention.cu; AH=attention_emu.cpp; N=norm.cu; E=elementwise.cu; RH=rowwise_emu.cpp; F=fp8.cu; FH=fp8_emu.cpp
mutant "causal mask off by one" $A $AH 'if (kpos > (e < 2 ? qpos0 : qpos1))' 'if (kpos >= (e < 2 ? qpos0 : qpos1))'
mutant "mask only on the last warp row" $A $AH 'kbase + BN - 1 > warp_q_min' 'kbase + BN - 1 > warp_q_max'
mutant "P fragment registers swapped" $A $AH 'p[n / 2][(n % 2) * 2 + 0] = pack_bf16(top);' 'p[n / 2][(n % 2) * 2 + 1] = pack_bf16(top);'
mutant "ldmatrix row mapping" $A $AH 'const int v_row = (mat & 1) * 8 + (lane & 7);' 'const int v_row = (mat >> 1) * 8 + (lane & 7);'
mutant "GQA head mapping" $A $AH 'const int g = h / (heads / kv_heads);' 'const int g = h % kv_heads;'
mutant "one key past the tile" $A $AH 'const int kv_limit = q0 + m_rows;' 'const int kv_limit = q0 + m_rows + 1;'
mutant "waits for the wrong cp.async group" $A $AH 'cp_async_wait<1>();  //' 'cp_async_wait<2>();  //'
mutant "no barrier after the loads" $A $AH '        __syncthreads();

        const int kbase' '
        const int kbase'
mutant "no barrier before the next prefetch" $A $AH '__syncthreads();  // the stage read here' ';  // the stage read here'
mutant "softmax rescale skipped" $A $AH 'o[n][0] *= alpha0;' 'o[n][0] *= 1.0f;'
mutant "partial-tile store unchecked" $A $AH 'if (r1 < m_rows)
                *reinterpret_cast' 'if (true)
                *reinterpret_cast'
mutant "16-byte path skips the zero fill" $A $AH '*reinterpret_cast<uint4*>(d) = make_uint4(0u, 0u, 0u, 0u);' ';'
# Padding channels exist only when D is not a multiple of 16.
MUTANT_DIM=17 mutant "element path reads padding channels" $A $AH '(r < valid && c < D) ? qkv' '(r < valid) ? qkv'
mutant "norm: no barrier after a reduction" $N $RH '    __syncthreads();
    return total;' '    return total;'
mutant "norm: one-pass variance" $N $RH 'const float d = row[c] - mean;
        sq += d * d;' 'sq += row[c] * row[c] - mean * mean;'
mutant "norm: row stride" $N $RH 'c < hidden; c += ARB_NORM_THREADS) sum += row[c];' 'c < hidden; c += 2 * ARB_NORM_THREADS) sum += row[c];'
mutant "rope: sign" $E $RH 'x[i] = __float2bfloat16_rn(a * c - b * s);' 'x[i] = __float2bfloat16_rn(a * c + b * s);'
mutant "rope: one pair too many" $E $RH 'for (int i = threadIdx.x; i < half; i += blockDim.x) {' 'for (int i = threadIdx.x; i <= half; i += blockDim.x) {'
mutant "swiglu: tail unchecked" $E $RH 'if (r >= rows || j >= ffn) return;' 'if (r >= rows) return;'
mutant "fp8: no scale floor (zero rows)" $F $FH 'return fmaxf(absmax / kE4m3Max, kMinScale);' 'return absmax / kE4m3Max;'
mutant "fp8: reciprocal instead of division" $F $FH 'codes[c] = e4m3(value(c) / s);' 'codes[c] = e4m3(value(c) * (1.0f / s));'
mutant "fp8: no barrier before reading the warps' maxima" $F $FH '    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float m = 0.0f;' '    if (lane == 0) scratch[warp] = v;
    float m = 0.0f;'
mutant "fp8: row stride of the max" $F $FH 'c < cols; c += ARB_FP8_THREADS) m = fmaxf' 'c < cols; c += 2 * ARB_FP8_THREADS) m = fmaxf'
mutant "fp8: swiglu reads gate as up" $F $FH 'silu(__bfloat162float(row[c])) * __bfloat162float(row[cols + c])' 'silu(__bfloat162float(row[c])) * __bfloat162float(row[c])'
mutant "fp8: norm scale of row 0" $F $FH 'codes + base, scales + r, hidden);' 'codes + base, scales, hidden);'
mutant "fp8: subnormal decode" $F $FH 'static_cast<float>(m) * (1.0f / 512.0f)' 'static_cast<float>(m) * (1.0f / 256.0f)'
mutant "fp8: epilogue column scale by row" $F $FH 'row_scale[r] * col_scale[c]' 'row_scale[r] * col_scale[r % cols]'
mutant "fp8: quantize row guard" $F $FH '    const int r = blockIdx.x;
    if (r >= rows) return;
    const size_t base' '    const int r = blockIdx.x;
    const size_t base'

if [ "$survived" -gt 0 ]; then
    echo "$survived mutant(s) survived"
    exit 1
fi
echo "all mutants caught (head dim $dim)"
