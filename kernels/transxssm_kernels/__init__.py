"""transxssm_kernels: compute kernels of TransXSSM. rope_ssd: SSD with Unified RoPE (references, Triton, decode);
swiglu, residual_norm (the backward of the residual + pre-norm), cross_entropy (the LM head's per-row loss and
gradient), adamw (the optimizer step that also writes the bf16 parameters): Triton kernels of the training step,
each checked against an eager PyTorch function."""
