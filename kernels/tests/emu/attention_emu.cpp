// Runs the real kernels/attention.cu (compiled for the host against the emulation in
// cuda_bf16.h next to this file) on packed variable-length batches and compares every output with
// a float64 reference computed here from the same bf16 inputs. Built and run by
// kernels/tests/attention_emulation.rs with -DARB_HEAD_DIM=<d>, under AddressSanitizer.
//
// For each block the harness poisons (ASan) every byte of qkv the block must not read, i.e. all
// but the query columns of its head for its tile's rows and the key/value columns of its KV head
// for the rows 0..=last query of its sequence (for a segment continuing a shared prefix: the
// prefix's rows, then its own up to its last query), and every byte of out but its own rows and
// head. A read past a sequence, of a future key, of another segment's rows, of another head's
// columns, or a write outside the block's output, stops the run with an ASan report.
//
// Exit status 0 when every case is within tolerance, 1 otherwise; one line per case on stdout.
#include "cuda_bf16.h"

#include <math.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

// The dynamic shared memory `extern __shared__ smem_raw[]` of the kernel resolves to this array.
alignas(16) unsigned char smem_raw[256 * 1024];

#include "../../attention.cu"

namespace {

constexpr int kD = ARB_HEAD_DIM;

struct Case {
    std::string name;
    std::vector<int> lens;
    int heads;
    int kv_heads;
    int extra_cols;  // qkv_width = (heads + 2 kv_heads) D + extra_cols (breaks 16-byte alignment)
    bool reverse_tiles;
    // Per segment, the earlier segment whose rows are its shared prefix, or -1 (empty: none).
    std::vector<int> parents = {};
    // Per segment, how many of its parent's rows it continues, or -1 for all of them (empty: all).
    // A per-turn branch sees its conversation only up to its turn's end.
    std::vector<int> seen = {};
    // Gemma 2: logit soft-cap and sliding window (0: none).
    float softcap = 0.0f;
    int window = 0;
};

bool poison_exact() {
    // ASan poisons in 8-byte granules: column ranges start on a granule when D and the width are
    // multiples of 4 bf16. Otherwise only whole rows are poisoned.
    return kD % 4 == 0;
}

void poison(const void* p, size_t bytes) {
#if EMU_ASAN
    __asan_poison_memory_region(p, bytes);
#else
    (void)p;
    (void)bytes;
#endif
}
void unpoison(const void* p, size_t bytes) {
#if EMU_ASAN
    __asan_unpoison_memory_region(p, bytes);
#else
    (void)p;
    (void)bytes;
#endif
}

int run_case(const Case& c, std::mt19937& rng) {
    const int heads = c.heads, kv_heads = c.kv_heads;
    const int width = (heads + 2 * kv_heads) * kD + c.extra_cols;
    std::vector<int> cu{0};
    for (int len : c.lens) cu.push_back(cu.back() + len);
    const int tokens = cu.back();
    // Shared prefixes as the host passes them: per segment (first row, rows) of its prefix.
    std::vector<int> prefix(2 * c.lens.size(), 0);
    for (size_t s = 0; s < c.parents.size(); ++s) {
        if (c.parents[s] >= 0) {
            prefix[2 * s] = cu[c.parents[s]];
            const bool part = s < c.seen.size() && c.seen[s] >= 0;
            prefix[2 * s + 1] = part ? c.seen[s] : c.lens[c.parents[s]];
        }
    }
    // Packed row of position j of segment s's full sequence.
    auto key_row = [&](size_t s, int j) {
        const int p = prefix[2 * s + 1];
        return static_cast<size_t>(j < p ? prefix[2 * s] + j : cu[s] + j - p);
    };

    // Tile list as the host builds it: ARB_BLOCK_M query rows per tile.
    std::vector<int> tile_seq, tile_start;
    for (size_t s = 0; s < c.lens.size(); ++s) {
        for (int start = 0; start < c.lens[s]; start += ARB_BLOCK_M) {
            tile_seq.push_back(static_cast<int>(s));
            tile_start.push_back(start);
        }
    }
    if (c.reverse_tiles) {
        std::reverse(tile_seq.begin(), tile_seq.end());
        std::reverse(tile_start.begin(), tile_start.end());
    }
    const int n_tiles = static_cast<int>(tile_seq.size());

    // Inputs: exactly-sized heap buffers (ASan redzones right after them).
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const size_t qkv_elems = static_cast<size_t>(tokens) * width;
    __nv_bfloat16* qkv = static_cast<__nv_bfloat16*>(aligned_alloc(16, ((qkv_elems * 2 + 15) / 16) * 16));
    for (size_t i = 0; i < qkv_elems; ++i) qkv[i] = __float2bfloat16_rn(normal(rng) * 1.5f);
    const size_t out_width = static_cast<size_t>(heads) * kD;
    const size_t out_elems = static_cast<size_t>(tokens) * out_width;
    std::vector<__nv_bfloat16> out_storage(out_elems, __nv_bfloat16{0x7fc1});  // NaN: unwritten
    __nv_bfloat16* out = out_storage.data();
    const float scale = 1.0f / sqrtf(static_cast<float>(kD));

    const size_t qkv_bytes = qkv_elems * 2;
    const size_t out_bytes = out_elems * 2;
    auto before = [&](emu::Dim3 b) {
        const int tile = static_cast<int>(b.x), h = static_cast<int>(b.y);
        const int s = tile_seq[tile], start = tile_start[tile];
        const int len = c.lens[s];
        const int m_rows = std::min(ARB_BLOCK_M, len - start);
        const int g = h / (heads / kv_heads);
        poison(qkv, qkv_bytes);
        poison(out, out_bytes);
        const int col_q = h * kD, col_k = (heads + g) * kD, col_v = (heads + kv_heads + g) * kD;
        for (int j = 0; j < prefix[2 * s + 1]; ++j) {
            const size_t row = key_row(s, j);
            if (!poison_exact()) {
                unpoison(qkv + row * width, width * 2);
                continue;
            }
            unpoison(qkv + row * width + col_k, kD * 2);
            unpoison(qkv + row * width + col_v, kD * 2);
        }
        for (int r = 0; r < start + m_rows; ++r) {
            const size_t row = static_cast<size_t>(cu[s] + r);
            if (!poison_exact()) {
                unpoison(qkv + row * width, width * 2);
                if (r >= start) unpoison(out + row * out_width, out_width * 2);
                continue;
            }
            unpoison(qkv + row * width + col_k, kD * 2);
            unpoison(qkv + row * width + col_v, kD * 2);
            if (r >= start) {
                unpoison(qkv + row * width + col_q, kD * 2);
                unpoison(out + row * out_width + static_cast<size_t>(h) * kD, kD * 2);
            }
        }
    };
    auto after = [&](emu::Dim3) {
        unpoison(qkv, qkv_bytes);
        unpoison(out, out_bytes);
    };

    const size_t smem = ARB_ATTN_SMEM(kD);
    unpoison(smem_raw, sizeof smem_raw);
    poison(smem_raw + smem, sizeof smem_raw - smem);
    const int* cu_p = cu.data();
    const int* pre_p = prefix.data();
    const int* ts_p = tile_seq.data();
    const int* st_p = tile_start.data();
    emu::launch(
        emu::Dim3{static_cast<unsigned>(n_tiles), static_cast<unsigned>(heads), 1},
        emu::Dim3{ARB_ATTN_THREADS, 1, 1}, smem_raw, smem,
        [&] {
            flash_attn_varlen(qkv, out, cu_p, pre_p, ts_p, st_p, n_tiles, heads, kv_heads, width, scale, c.softcap,
                              c.window);
        },
        before,
        after);
    unpoison(smem_raw, sizeof smem_raw);

    // float64 reference on the same bf16 values; error per the metric, per sequence:
    // max |got - ref| / max(max |ref|, 1e-3).
    double worst = 0.0;
    int unwritten = 0;
    for (size_t s = 0; s < c.lens.size(); ++s) {
        double max_err = 0.0, max_ref = 0.0;
        for (int h = 0; h < heads; ++h) {
            const int g = h / (heads / kv_heads);
            const int pl = prefix[2 * s + 1];
            for (int i = 0; i < c.lens[s]; ++i) {
                const size_t qi = static_cast<size_t>(cu[s] + i);
                const int n_keys = pl + i + 1;
                std::vector<double> p(n_keys);
                double mx = -INFINITY;
                for (int j = 0; j < n_keys; ++j) {
                    const size_t kj = key_row(s, j);
                    double dot = 0.0;
                    for (int d = 0; d < kD; ++d)
                        dot += static_cast<double>(__bfloat162float(qkv[qi * width + h * kD + d])) *
                               __bfloat162float(qkv[kj * width + (heads + g) * kD + d]);
                    p[j] = dot * scale;
                    if (c.softcap > 0.0f) p[j] = tanh(p[j] / c.softcap) * c.softcap;
                    // Keys at or before (position - window) are hidden.
                    if (c.window > 0 && j <= pl + i - c.window) p[j] = -INFINITY;
                    mx = std::max(mx, p[j]);
                }
                double sum = 0.0;
                for (int j = 0; j < n_keys; ++j) sum += (p[j] = exp(p[j] - mx));
                for (int d = 0; d < kD; ++d) {
                    double ref = 0.0;
                    for (int j = 0; j < n_keys; ++j)
                        ref += p[j] * __bfloat162float(qkv[key_row(s, j) * width + (heads + kv_heads + g) * kD + d]);
                    ref /= sum;
                    const float got = __bfloat162float(out[qi * out_width + static_cast<size_t>(h) * kD + d]);
                    if (isnan(got)) {
                        ++unwritten;
                        continue;
                    }
                    max_err = std::max(max_err, fabs(got - ref));
                    max_ref = std::max(max_ref, fabs(ref));
                }
            }
        }
        worst = std::max(worst, max_err / std::max(max_ref, 1e-3));
    }
    free(qkv);
    // bf16 output rounding alone is 2^-9 relative; P in bf16 adds about as much. An off-by-one in
    // the mask or a wrong GQA head moves short rows by O(1).
    const double tol = 1e-2;
    const bool ok = unwritten == 0 && worst <= tol;
    printf("%-4s D=%-3d %-34s tiles=%-3d max rel err %.3e (tol %.0e) unwritten %d\n", ok ? "ok" : "FAIL", kD,
           c.name.c_str(), n_tiles, worst, tol, unwritten);
    return ok ? 0 : 1;
}

}  // namespace

int main() {
    std::mt19937 rng(1234 + kD);
    const std::vector<Case> cases = {
        {"gqa2 lens 1,2,3,17,64,65,130", {1, 2, 3, 17, 64, 65, 130}, 4, 2, 0, false},
        {"mha lens 70,1 reversed tiles", {70, 1}, 2, 2, 0, true},
        {"mqa (6 heads, 1 kv) lens 5,128", {5, 128}, 6, 1, 0, false},
        {"unaligned width (+4) lens 33,80", {33, 80}, 4, 2, 4, false},
        // Shared prefixes: branches whose key tiles straddle the prefix's end (prefix 100 is not
        // a multiple of a key tile), a prefix shorter than a tile, a one-token branch, and a
        // plain sequence between them.
        {"shared prefix 100: 1,70,130 + 5", {100, 1, 70, 130, 5}, 4, 2, 0, false, {-1, 0, 0, 0, -1}},
        {"shared prefix 7, reversed: 64,3 + 20", {20, 7, 64, 3}, 4, 1, 4, true, {-1, -1, 1, 1}},
        // Per-turn branches: a 300-row conversation and branches of 1-3 closing tokens that see
        // only its first 1, 63, 64, 65, 130 and 299 rows (ASan poisons the rows they must not
        // read); the whole conversation's own queries sit between them.
        {"per-turn: 300 seen 1,63,64,65,130,299", {300, 1, 2, 3, 1, 2, 3}, 4, 2, 0, false, {-1, 0, 0, 0, 0, 0, 0},
         {-1, 1, 63, 64, 65, 130, 299}},
        {"per-turn, reversed, unaligned: seen 7,70", {90, 3, 1}, 4, 1, 4, true, {-1, 0, 0}, {-1, 7, 70}},
        // Gemma 2: a window of 16 (lengths around it and well past it, so whole key tiles are
        // skipped), soft-capping at 5 (scores of this input reach about 10), and a window that
        // reaches back into a shared prefix.
        {"window 16 softcap 5", {1, 15, 16, 17, 65, 200}, 2, 1, 0, false, {}, {}, 5.0f, 16},
        {"softcap 2 mha reversed", {70, 1}, 2, 2, 0, true, {}, {}, 2.0f, 0},
        {"window 20 + shared prefix 100", {100, 1, 70}, 2, 1, 0, false, {-1, 0, 0}, {}, 0.0f, 20},
    };
    int failures = 0;
    for (const Case& c : cases) failures += run_case(c, rng);
    return failures == 0 ? 0 : 1;
}
