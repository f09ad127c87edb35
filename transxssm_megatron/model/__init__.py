"""TransXSSM on megatron-core: Unified RoPE, SS/SA mixers, residual sub-layers, specs and the model builder.

Layout: rope.py (tables), norms.py (fp32 RMSNorm), ss_mixer.py, sa_mixer.py, layers.py (skip-weighted
sub-layers, SwiGLU), stack.py (HybridStack subclass), specs.py (ModuleSpecs + pattern), builder.py (entry points).
"""

from .builder import TransXSSMModel, build_model, build_transformer_config

__all__ = ["TransXSSMModel", "build_model", "build_transformer_config"]
