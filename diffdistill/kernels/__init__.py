"""Attention backends and diffusers attention processors (opt-in).

``attention(q, k, v, backend="auto", mask=None)`` runs one attention call on the chosen backend (``sdpa``,
``math``, ``triton``, ``triton_jvp``, ``block_sparse``, ``xformers``; see :mod:`.backends`);
``use_attention(model, backend)`` routes a whole diffusers model through it (:mod:`.processor`). The Triton
kernels (:mod:`.flash`, :mod:`.block_sparse`) are imported only when a Triton backend is first used; on CPU
they run under ``TRITON_INTERPRET=1`` set before that import.
"""

from .backends import BACKENDS, NAMES, attention, available_backends
from .processor import KernelAttnProcessor, use_attention

__all__ = ["BACKENDS", "NAMES", "KernelAttnProcessor", "attention", "available_backends", "use_attention"]
