"""commrt.kernels: local compression transforms, each a Triton kernel beside its torch reference.

Public API (flat 1-D float tensors unless stated; see each module's docstring):

* ``topk_magnitude(x, k, exact=True)``, ``topk_blocks(x, block_size, k, exact=True)``
  -> ``(values, indices)``; ``above_threshold(rows, thresholds)`` -> ``(values, indices)``
  of the entries at or above a per-row threshold  (``topk``)
* ``topk_error_feedback(grad, residual, k, exact=True, block_size=None)``  (``error_feedback``)
* ``pack_sparse``, ``unpack_sparse``, ``packed_nbytes``, ``scatter_add_``,
  ``scatter_add_packed_``  (``sparse_pack``)
* ``quantize``, ``quantize_`` (in place: x becomes its quantization error), ``dequantize``,
  ``quantized_nbytes``, ``QuantizedTensor``  (``quantize``)
* ``dct_chunks``, ``idct_chunks``, ``dct_chunk_size``, ``dct_basis``  (``dct``)

Each public function dispatches (``dispatch.backend``): Triton for CUDA tensors, the fast
CPU implementation for CPU tensors (top-k, above_threshold, error feedback, sparse pack,
quantize, DCT), the torch reference otherwise; ``COMMRT_KERNELS=auto|triton|cpu|torch``
forces one. The explicit ``*_triton`` / ``*_cpu`` / ``*_torch`` variants skip the dispatch.
"""
from .dct import (
    dct_basis,
    dct_chunk_size,
    dct_chunks,
    dct_chunks_cpu,
    dct_chunks_torch,
    idct_chunks,
    idct_chunks_cpu,
    idct_chunks_torch,
)
from .dispatch import ENV_VAR, backend, mode, triton_available
from .error_feedback import (
    topk_error_feedback,
    topk_error_feedback_cpu,
    topk_error_feedback_torch,
    topk_error_feedback_triton,
)
from .quantize import (
    QuantizedTensor,
    dequantize,
    dequantize_cpu,
    dequantize_torch,
    dequantize_triton,
    quantize,
    quantize_,
    quantize_cpu,
    quantize_cpu_,
    quantize_torch,
    quantize_torch_,
    quantize_triton,
    quantize_triton_,
    quantized_nbytes,
)
from .sparse_pack import (
    HEADER_BYTES,
    index_width,
    pack_sparse,
    pack_sparse_cpu,
    pack_sparse_torch,
    pack_sparse_triton,
    packed_nbytes,
    scatter_add_,
    scatter_add_cpu_,
    scatter_add_packed_,
    scatter_add_torch_,
    scatter_add_triton_,
    unpack_sparse,
    unpack_sparse_cpu,
    unpack_sparse_torch,
    unpack_sparse_triton,
)
from .topk import (
    APPROX_EPS,
    above_threshold,
    above_threshold_cpu,
    above_threshold_torch,
    approx_cap,
    topk_blocks,
    topk_blocks_cpu,
    topk_blocks_torch,
    topk_blocks_triton,
    topk_magnitude,
    topk_magnitude_cpu,
    topk_magnitude_torch,
    topk_magnitude_triton,
)

__all__ = [
    "ENV_VAR", "backend", "mode", "triton_available",
    "APPROX_EPS", "approx_cap", "topk_magnitude", "topk_magnitude_cpu", "topk_magnitude_torch",
    "topk_magnitude_triton", "topk_blocks", "topk_blocks_cpu", "topk_blocks_torch",
    "topk_blocks_triton", "above_threshold", "above_threshold_cpu", "above_threshold_torch",
    "topk_error_feedback", "topk_error_feedback_cpu",
    "topk_error_feedback_torch", "topk_error_feedback_triton",
    "HEADER_BYTES", "index_width", "packed_nbytes", "pack_sparse", "pack_sparse_cpu",
    "pack_sparse_torch", "pack_sparse_triton", "unpack_sparse", "unpack_sparse_cpu",
    "unpack_sparse_torch", "unpack_sparse_triton", "scatter_add_", "scatter_add_cpu_",
    "scatter_add_torch_", "scatter_add_triton_", "scatter_add_packed_",
    "QuantizedTensor", "quantize", "quantize_cpu", "quantize_torch", "quantize_triton",
    "quantize_", "quantize_cpu_", "quantize_torch_", "quantize_triton_",
    "dequantize", "dequantize_cpu", "dequantize_torch", "dequantize_triton", "quantized_nbytes",
    "dct_basis", "dct_chunk_size", "dct_chunks", "dct_chunks_cpu", "dct_chunks_torch",
    "idct_chunks", "idct_chunks_cpu", "idct_chunks_torch",
]
