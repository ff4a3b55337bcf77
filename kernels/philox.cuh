// Philox4x32-10, the counter-based generator behind dropout. The Rust twin is src/rng.rs; both
// implement the same stream layout, so CPU and GPU masks agree bit for bit:
//   key = (seed lo, seed hi); counter = (block lo, block hi, offset lo, offset hi), block = i / 4;
//   element i takes word i % 4 of the block.
// Ten rounds of two 32x32->64 multiplies (__umulhi + a plain multiply) and XORs with a Weyl key
// schedule; no state, so any thread can produce any element.
#pragma once

#include <stdint.h>

namespace cuattn {

struct Philox4 {
    uint32_t x, y, z, w;
};

__device__ __forceinline__ Philox4 philox4x32_10(Philox4 c, uint32_t k0, uint32_t k1) {
    constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
    constexpr uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += W0;
            k1 += W1;
        }
        const uint32_t hi0 = __umulhi(M0, c.x), lo0 = M0 * c.x;
        const uint32_t hi1 = __umulhi(M1, c.z), lo1 = M1 * c.z;
        c = Philox4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    }
    return c;
}

// The four words for elements 4*block .. 4*block + 3 of stream (seed, offset).
__device__ __forceinline__ Philox4 philox_block(uint64_t seed, uint64_t offset, uint64_t block) {
    return philox4x32_10(Philox4{(uint32_t)block, (uint32_t)(block >> 32), (uint32_t)offset,
                                 (uint32_t)(offset >> 32)},
                         (uint32_t)seed, (uint32_t)(seed >> 32));
}

}  // namespace cuattn
