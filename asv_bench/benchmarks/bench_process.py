"""The benchmark process itself: the thread counts it ran with (pinned in ``_common``), so a
result file shows whether its timings were taken with the documented settings."""
from ._common import THREADS, blas_threads


class BenchmarkProcess:
    unit = "threads"

    def track_blas_threads(self):
        """Smallest thread count over the loaded BLAS / OpenMP libraries (expected: ``THREADS``)."""
        import numpy  # noqa: F401  (loads the BLAS)

        counts = blas_threads()
        return min(counts.values()) if counts else THREADS

    def track_qnref_chunk_threads(self):
        """Threads of qnref's chunked CPU passes (``QNREF_NUM_THREADS``)."""
        from qnref.nn import chunks

        return chunks.num_threads()
