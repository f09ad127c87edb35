"""transxssm_kernels: compute kernels of TransXSSM. rope_ssd: SSD with Unified RoPE (references, Triton, decode)."""
