/* Preloaded into a PyTorch process by scripts/mkl-any-cpu.sh (benchmarks only, never linked
 * into cuattn). Intel's MKL asks this internal function whether it runs on an Intel CPU and,
 * when not, keeps to its AVX2 code paths even where the CPU has AVX-512. Answering yes lets a
 * PyTorch baseline on an AMD CPU with AVX-512 run the GEMM kernels it would run on an Intel
 * machine with AVX-512, which is the machine issue 17 was filed on. */
int mkl_serv_intel_cpu_true(void) { return 1; }
