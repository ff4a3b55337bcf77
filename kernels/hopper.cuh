/* Hopper (sm_90a) building blocks: one-instruction inline-PTX wrappers for the warpgroup MMA's
 * operand descriptors and fences, mbarriers, TMA loads, register reallocation and named
 * barriers. docs/kernels/attention-hopper.md explains each and why the kernel needs it.
 *
 * Everything here compiles only into the sm_90a image (`__CUDA_ARCH_FEAT_SM90_ALL`); the same
 * translation unit's sm_80 image gets trapping stubs, and the host launches these kernels only
 * on compute capability 9.0. */
#pragma once
#include <cstdint>
#include "common.cuh"
#include <cuda.h> /* CUtensorMap: a 128-byte opaque tensor map, passed as a __grid_constant__ */

#define HOPPER_DEV __device__ __forceinline__

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define CUATTN_HOPPER 1

using cuattn::smem_addr; /* common.cuh: the 32-bit shared-window address PTX operands want */

/* ---- wgmma operand descriptors -------------------------------------------------------------
 * A 64-bit word per shared-memory operand: bits 0-13 start address / 16, bits 16-29 the
 * leading-dimension byte offset / 16, bits 32-45 the stride-dimension byte offset / 16, bits
 * 62-63 the swizzle mode (1 = 128-byte swizzle). Tiles are 1024-byte aligned, so the base-offset
 * field (bits 49-51) stays 0. */
HOPPER_DEV uint64_t desc_field(uint32_t bytes) { return (uint64_t)((bytes & 0x3FFFF) >> 4); }
HOPPER_DEV uint64_t smem_desc_sw128(uint32_t addr, uint32_t lead_bytes, uint32_t stride_bytes) {
    return desc_field(addr) | (desc_field(lead_bytes) << 16) | (desc_field(stride_bytes) << 32) |
           (1ull << 62);
}

/* Orders this thread's earlier register writes before the next wgmma reads them. */
HOPPER_DEV void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
/* Closes the wgmmas issued so far into one group. */
HOPPER_DEV void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
/* Waits until at most N committed groups are still running. */
template <int N> HOPPER_DEV void wgmma_wait() {
    static_assert(N >= 0 && N <= 7, "wgmma.wait_group takes 0..7");
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
/* A compiler-only barrier on one register: keeps ordinary reads and writes of an accumulator
 * from being moved into the window where an asynchronous wgmma owns it. */
HOPPER_DEV void hold(float &r) { asm volatile("" : "+f"(r)::"memory"); }
HOPPER_DEV void hold(uint32_t &r) { asm volatile("" : "+r"(r)::"memory"); }
template <int N> HOPPER_DEV void hold_all(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) hold(r[i]);
}
template <int N> HOPPER_DEV void hold_all(uint32_t (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) hold(r[i]);
}
/* Makes ordinary shared-memory stores visible to the async proxy (wgmma operand reads). */
HOPPER_DEV void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

/* ---- mbarriers ------------------------------------------------------------------------------ */
HOPPER_DEV void mbar_init(uint64_t *bar, uint32_t arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(arrivals)
                 : "memory");
}
HOPPER_DEV void mbar_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
/* One arrival that also announces `bytes` of TMA traffic the phase must wait for. */
HOPPER_DEV void mbar_expect_bytes(uint64_t *bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)),
                 "r"(bytes)
                 : "memory");
}
HOPPER_DEV void mbar_arrive(uint64_t *bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
/* Spins until the phase of parity `parity` has completed. */
HOPPER_DEV void mbar_wait(uint64_t *bar, uint32_t parity) {
    asm volatile("{\n.reg .pred done;\n"
                 "WAIT_%=:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra WAIT_%=;\n}\n" ::"r"(smem_addr(bar)),
                 "r"(parity)
                 : "memory");
}

/* ---- TMA ------------------------------------------------------------------------------------ */
HOPPER_DEV void tma_prefetch_map(const CUtensorMap *map) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
/* A 4-D box load (coordinates in elements, innermost first) whose bytes complete on `bar`. */
HOPPER_DEV void tma_load_4d(void *dst, const CUtensorMap *map, uint64_t *bar, int c0, int c1,
                            int c2, int c3) {
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%3, %4, %5, %6}], [%2];\n" ::"r"(smem_addr(dst)),
                 "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1),
                 "r"(c2), "r"(c3)
                 : "memory");
}

/* ---- warp specialisation -------------------------------------------------------------------- */
template <uint32_t R> HOPPER_DEV void regs_grow() {
    static_assert(R >= 24 && R <= 256 && R % 8 == 0, "setmaxnreg takes 24..256 in steps of 8");
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R));
}
template <uint32_t R> HOPPER_DEV void regs_shrink() {
    static_assert(R >= 24 && R <= 256 && R % 8 == 0, "setmaxnreg takes 24..256 in steps of 8");
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R));
}
/* Named barriers (id 0 is __syncthreads'); `threads` is a multiple of 32. */
HOPPER_DEV void bar_sync(uint32_t id, uint32_t threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
HOPPER_DEV void bar_arrive(uint32_t id, uint32_t threads) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

#endif /* sm_90a */
