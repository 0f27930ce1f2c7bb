"""ttrec: TT-Rec embedding bags (reference, native CPU, CUDA) and the baselines they are measured against."""

from .bags import Bags, make_bags
from .baselines import DenseEmbeddingBag, T3nsorEmbeddingBag
from .init import INIT_SCHEMES, expected_row_std, init_tt_cores, row_stats, target_row_std
from .reference import tt_embedding_bag, tt_rows, tt_to_dense
from .registry import IMPLEMENTATIONS, build_embedding
from .shapes import TTSpec, suggest_shape, suggest_tt_shapes
from .tt import TTEmbeddingBag, backend_status

__version__ = "0.1.0"

__all__ = [
    "Bags", "make_bags", "DenseEmbeddingBag", "T3nsorEmbeddingBag", "INIT_SCHEMES", "expected_row_std",
    "init_tt_cores", "row_stats", "target_row_std", "tt_embedding_bag", "tt_rows", "tt_to_dense",
    "IMPLEMENTATIONS", "build_embedding", "TTSpec", "suggest_shape", "suggest_tt_shapes", "TTEmbeddingBag",
    "backend_status",
]
