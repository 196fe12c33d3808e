"""commrt.kernels: local compression transforms, each a Triton kernel beside its torch reference.

Public API (flat 1-D float tensors unless stated; see each module's docstring):

* ``topk_magnitude(x, k, exact=True)``, ``topk_blocks(x, block_size, k, exact=True)``
  -> ``(values, indices)``  (``topk``)
* ``topk_error_feedback(grad, residual, k, exact=True, block_size=None)``  (``error_feedback``)
* ``pack_sparse``, ``unpack_sparse``, ``packed_nbytes``, ``scatter_add_``,
  ``scatter_add_packed_``  (``sparse_pack``)
* ``quantize``, ``dequantize``, ``quantized_nbytes``, ``QuantizedTensor``  (``quantize``)
* ``dct_chunks``, ``idct_chunks``, ``dct_chunk_size``, ``dct_basis``  (``dct``)

Each public function dispatches (``dispatch.use_triton``): Triton for CUDA tensors, the
torch reference otherwise; ``COMMRT_KERNELS=triton|torch|auto`` forces either. The
explicit ``*_torch`` / ``*_triton`` variants skip the dispatch.
"""
from .dispatch import ENV_VAR, mode, triton_available, use_triton
from .topk import (APPROX_EPS, approx_cap, topk_blocks, topk_blocks_torch, topk_blocks_triton,
                   topk_magnitude, topk_magnitude_torch, topk_magnitude_triton)
from .error_feedback import (topk_error_feedback, topk_error_feedback_torch,
                             topk_error_feedback_triton)
from .sparse_pack import (HEADER_BYTES, index_width, pack_sparse, pack_sparse_torch,
                          pack_sparse_triton, packed_nbytes, scatter_add_, scatter_add_packed_,
                          scatter_add_torch_, scatter_add_triton_, unpack_sparse,
                          unpack_sparse_torch, unpack_sparse_triton)
from .quantize import (QuantizedTensor, dequantize, dequantize_torch, dequantize_triton,
                       quantize, quantize_torch, quantize_triton, quantized_nbytes)
from .dct import dct_basis, dct_chunk_size, dct_chunks, idct_chunks

__all__ = [
    "ENV_VAR", "mode", "triton_available", "use_triton",
    "APPROX_EPS", "approx_cap", "topk_magnitude", "topk_magnitude_torch", "topk_magnitude_triton",
    "topk_blocks", "topk_blocks_torch", "topk_blocks_triton",
    "topk_error_feedback", "topk_error_feedback_torch", "topk_error_feedback_triton",
    "HEADER_BYTES", "index_width", "packed_nbytes", "pack_sparse", "pack_sparse_torch",
    "pack_sparse_triton", "unpack_sparse", "unpack_sparse_torch", "unpack_sparse_triton",
    "scatter_add_", "scatter_add_torch_", "scatter_add_triton_", "scatter_add_packed_",
    "QuantizedTensor", "quantize", "quantize_torch", "quantize_triton", "dequantize",
    "dequantize_torch", "dequantize_triton", "quantized_nbytes",
    "dct_basis", "dct_chunk_size", "dct_chunks", "idct_chunks",
]
