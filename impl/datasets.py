"""The Criteo datasets' embedding tables: rows per categorical feature and embedding dimension.

Kaggle (DLRM preprocessing, 26 tables, dim 16, 33,762,577 rows, 2.16 GB in fp32) and Terabyte
(MLPerf, index range capped at 10M, 26 tables, dim 64, 12.58 GB in fp32), the sizes the paper's
Table 2 and Figure 5 are computed from. Used by the model-size analysis and the DLRM configs.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Dataset", "DATASETS", "KAGGLE", "TERABYTE"]


@dataclass(frozen=True)
class Dataset:
    name: str
    table_rows: tuple[int, ...]  # in feature order
    embedding_dim: int

    def largest(self, k: int) -> list[int]:
        """Feature positions of the ``k`` largest tables, largest first."""
        if not 0 <= k <= len(self.table_rows):
            raise ValueError(f"k: got {k}; must be in [0, {len(self.table_rows)}] for {self.name}")
        order = sorted(range(len(self.table_rows)), key=lambda i: -self.table_rows[i])
        return order[:k]

    @property
    def dense_bytes(self) -> int:
        """Bytes of all tables uncompressed, fp32."""
        return sum(self.table_rows) * self.embedding_dim * 4


KAGGLE = Dataset("kaggle", (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
                            14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572), 16)
TERABYTE = Dataset("terabyte", (9980333, 36084, 17217, 7378, 20134, 3, 7112, 1442, 61, 9758201, 1333352, 313829, 10,
                                2208, 11156, 122, 4, 970, 14, 9994222, 7267859, 9946608, 415421, 12420, 101, 36), 64)
DATASETS = {d.name: d for d in (KAGGLE, TERABYTE)}
