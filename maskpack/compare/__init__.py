"""Storage comparison: a task's binary masks against the fine-tuned fp32 weights of the same tensors.

The paper's Appendix C compresses the bit-packed masks and the fine-tuned fp32 weights with
general-purpose codecs. This package does the same and adds the strongest lossless fp32
baselines we know of, so the comparison is honest:

* ``bytegroup+zstd-19``: split the fp32 stream into its 4 byte planes and compress each with
  zstd -19 (the ZipNN idea: the exponent bytes are very compressible, the mantissa bytes are not);
* ``xor+zstd-19`` and ``xor+bytegroup+zstd-19``: XOR the fine-tuned bits with the backbone's bits
  first (the decoder has the backbone, as it has for the masks), so unchanged sign, exponent and
  high mantissa bits become zeros.

Every method is checked to round-trip exactly; sizes, reductions and encode/decode speeds come
back as :class:`Row` objects inside a :class:`BenchResult` (``to_dict()`` for JSON). Two headline
ratios, both over the same tensors on both sides (the paper's definition):

* ``paper``: lzma -9 on both sides (the paper: up to 79x);
* ``honest``: the best method on each side (the ``ans`` mask coder against the best fp32 method).

The whole-checkpoint ratio also counts what else a task needs: the fine-tune's other tensors
(BatchNorm weights and statistics, the head), compressed with the same method, against the
``.mask`` file as :func:`maskpack.save` writes it (masks, head and BN statistics, header), with
the file's bytes by part. A LOSSY reference beside it: the whole fine-tune rounded to bfloat16
(no longer the model that was evaluated), with its best method.

Example:
    >>> from maskpack import compare
    >>> result = compare.compare_files("runs/m/task.mask", "runs/f/model.safetensors")  # doctest: +SKIP
    >>> result.ratios["honest"]                                                      # doctest: +SKIP
"""

from .core import (
    BF16_METHODS,
    MASK_CODEC,
    PAPER_CODEC,
    check_pair,
    compare,
    compare_files,
    default_workers,
    fp32_jobs,
    fp32_rows,
    mask_jobs,
    mask_rows,
    run_jobs,
)
from .methods import FP32_DEFAULT, GENERAL, byte_group, byte_ungroup, fp32_methods, xor_bytes
from .pair import PairConfig, read_metrics, train_pair
from .plot import plot
from .result import BenchResult, Row

__all__ = ["BF16_METHODS", "FP32_DEFAULT", "GENERAL", "MASK_CODEC", "PAPER_CODEC", "BenchResult",
           "PairConfig", "Row",
           "byte_group", "byte_ungroup", "check_pair", "compare", "compare_files", "default_workers",
           "fp32_jobs", "fp32_methods", "fp32_rows", "mask_jobs", "mask_rows", "plot", "read_metrics",
           "run_jobs", "train_pair", "xor_bytes"]
