"""SSD (Mamba-2 state-space duality) with Unified RoPE on B and C.

ssd_naive (definition, loop over tokens), ssd_chunked_reference (plain PyTorch chunked, CPU path),
rope_ssd (Triton forward + backward, CUDA path; None without triton), rope_ssd_decode_step (one token).
All share the signature documented in naive.py.
"""

from .decode import rope_ssd_decode_step
from .naive import ssd_naive
from .reference import ssd_chunked_reference
from .rope import apply_rope, rotate_half

from .launch import DEFAULT_LAUNCH, KernelOptions, LaunchConfig

try:  # the Triton kernels need triton; the references and the CPU path must import without it
    from .chunk import rope_ssd
    ROPE_SSD_IMPORT_ERROR = None
except ImportError as err:
    rope_ssd = None
    ROPE_SSD_IMPORT_ERROR = err   # the SS mixer reports it when a CUDA run needs the kernels

__all__ = ["ssd_naive", "ssd_chunked_reference", "rope_ssd", "rope_ssd_decode_step", "apply_rope", "rotate_half",
           "LaunchConfig", "KernelOptions", "DEFAULT_LAUNCH", "ROPE_SSD_IMPORT_ERROR"]
