"""C++ sources of the fused CPU step (built at first use by lowbit.optim._cpu_kernel)."""
