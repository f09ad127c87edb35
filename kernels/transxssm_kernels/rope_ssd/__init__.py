"""SSD (Mamba-2 state-space duality) with Unified RoPE on B and C.

ssd_naive (definition, loop over tokens), ssd_chunked_reference (plain PyTorch chunked, CPU path),
rope_ssd (Triton forward + backward, CUDA path; absent until chunk.py exists), rope_ssd_decode_step (one token).
All share the signature documented in naive.py.
"""

from .decode import rope_ssd_decode_step
from .naive import ssd_naive
from .reference import ssd_chunked_reference
from .rope import apply_rope, rotate_half

try:  # the Triton kernel lives in chunk.py (another module's owner); the package must import without it
    from .chunk import rope_ssd
except ImportError:
    rope_ssd = None

__all__ = ["ssd_naive", "ssd_chunked_reference", "rope_ssd", "rope_ssd_decode_step", "apply_rope", "rotate_half"]
