"""The PyTorch references of the ReGLA kernels: `naive` (the token-by-token recurrence, the test
oracle) and `chunk_torch` (the chunked path, the CPU and fallback backend)."""
