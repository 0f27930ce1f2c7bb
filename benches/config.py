"""Structured configs of the bench app, registered with Hydra's ConfigStore.

Every group in conf/ (impl, table, tt, workload, timing, mode, experiment) merges into these typed
nodes, so an unknown key or a value of the wrong type fails at composition with the key and the
value; enums list what is allowed. Range checks run in ``__post_init__`` when the config becomes
objects (:func:`to_objects`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

__all__ = ["BenchConfig", "register", "to_objects"]


class Impl(str, Enum):
    tt = "tt"
    t3nsor = "t3nsor"
    dense = "dense"
    tltorch = "tltorch"


class Backend(str, Enum):
    auto = "auto"
    torch = "torch"
    cpu = "cpu"
    cuda = "cuda"


class Init(str, Enum):
    uniform = "uniform"
    normal = "normal"
    sampled_gaussian = "sampled_gaussian"
    calibrated = "calibrated"


class Distribution(str, Enum):
    uniform = "uniform"
    zipf = "zipf"


class Mode(str, Enum):
    forward = "forward"
    train = "train"


class Optimizer(str, Enum):
    sgd = "sgd"
    adagrad = "adagrad"


class Pooling(str, Enum):
    sum = "sum"
    mean = "mean"


def _positive(section: str, **values: float) -> None:
    for key, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"{section}.{key}: got {value}; must be >= 1")


@dataclass
class ImplConfig:
    """Which embedding implementation; ``backend`` applies to tt, ``sparse`` to dense."""

    name: Impl = Impl.tt
    backend: Backend = Backend.auto
    sparse: bool = True


@dataclass
class TableConfig:
    name: str = "small"
    num_embeddings: int = 100_000
    embedding_dim: int = 16

    def __post_init__(self) -> None:
        _positive("table", num_embeddings=self.num_embeddings, embedding_dim=self.embedding_dim)


@dataclass
class TTConfig:
    """TT format: one rank for every bond, d cores, init scheme; shapes suggested when null."""

    rank: int = 32
    d: int = 3
    init: Init = Init.calibrated
    p_shapes: Optional[List[int]] = None
    q_shapes: Optional[List[int]] = None

    def __post_init__(self) -> None:
        _positive("tt", rank=self.rank)
        if self.d < 2:
            raise ValueError(f"tt.d: got {self.d}; TT needs d >= 2 cores")


@dataclass
class WorkloadConfig:
    distribution: Distribution = Distribution.uniform
    zipf_alpha: float = 1.05
    permute: bool = True
    batch_size: int = 2048
    pooling_factor: int = 1
    weighted: bool = False
    pooling: Pooling = Pooling.sum
    seed: int = 0

    def __post_init__(self) -> None:
        _positive("workload", batch_size=self.batch_size, pooling_factor=self.pooling_factor)


@dataclass
class TimingConfig:
    """Timing protocol (benches.timing.measure) and the fixed intra-op thread count."""

    warmup: int = 2
    min_repeats: int = 5
    max_repeats: int = 50
    target_time_s: float = 1.0
    threads: int = 2
    flush_l2: bool = False   # GPU only: overwrite the L2 before every timed call
    memory: bool = False     # also measure peak transient memory (CPU: a fresh child process)

    def __post_init__(self) -> None:
        _positive("timing", warmup=self.warmup, min_repeats=self.min_repeats, threads=self.threads)
        if self.max_repeats < self.min_repeats:
            raise ValueError(f"timing.max_repeats: got {self.max_repeats}; must be >= min_repeats={self.min_repeats}")


@dataclass
class ModeConfig:
    """forward: the lookup alone; train: forward + backward + optimizer step.

    fused: for impl tt, the optimizer runs inside backward on exactly the touched core slices
    (TTEmbeddingBag(optimizer=...)); otherwise torch.optim updates from autograd gradients.
    """

    name: Mode = Mode.forward
    optimizer: Optimizer = Optimizer.sgd
    lr: float = 0.01
    fused: bool = False


@dataclass
class BenchConfig:
    impl: ImplConfig = field(default_factory=ImplConfig)
    table: TableConfig = field(default_factory=TableConfig)
    tt: TTConfig = field(default_factory=TTConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    timing: TimingConfig = field(default_factory=TimingConfig)
    mode: ModeConfig = field(default_factory=ModeConfig)
    device: str = "cpu"
    seed: int = 0
    # Where the sweep's figure goes; relative paths are taken from the directory the app was started in.
    figures_dir: str = "reports/figures"


def register() -> None:
    """Register the schema under the name the root config's defaults list uses."""
    cs = ConfigStore.instance()
    cs.store(name="bench_schema", node=BenchConfig)


def _reject_unknown_keys(node: DictConfig, path: str = "") -> None:
    """``+key=value`` bypasses the schema (OmegaConf would drop the key silently): refuse it."""
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        allowed = [f.name for f in dataclasses.fields(schema)]
        for key in node.keys():
            if key not in allowed:
                raise ValueError(f"{path}{key}: got {node[key]!r}; not a key of {schema.__name__}, allowed: {allowed}")
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none():
            _reject_unknown_keys(child, f"{path}{key}.")


def to_objects(cfg: DictConfig) -> BenchConfig:
    """Instantiate the dataclasses, running their range checks; unknown keys are an error."""
    _reject_unknown_keys(cfg)
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, BenchConfig):
        raise TypeError("the bench config must compose onto bench_schema (is `- bench_schema` first in its defaults?)")
    return obj
