"""Structured configs of the bench app, registered with Hydra's ConfigStore.

Every group in conf/ (impl, table, tt, workload, timing, mode, experiment) merges into these typed
nodes, so an unknown key or a value of the wrong type fails at composition with the key and the
value; enums list what is allowed. Range checks, and checks of keys that must agree, run in
``__post_init__`` when the config becomes objects (:func:`to_objects`, which also refuses settings
a timed point would not act on).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

__all__ = ["BenchConfig", "check_output_dirs", "check_override_keys", "register", "to_objects"]

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


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
    hot_set = "hot_set"  # controlled hit rate (ttrec.workloads)
    criteo = "criteo"    # a Criteo text file's categorical feature (ttrec.criteo)


class PoolingDistribution(str, Enum):
    fixed = "fixed"
    normal = "normal"
    uniform = "uniform"


class CriteoMapping(str, Enum):
    hash = "hash"
    dictionary = "dictionary"


class CacheUpdate(str, Enum):
    auto = "auto"          # fused when mode.fused, else autograd
    fused = "fused"        # mode.optimizer runs on the cached rows inside backward
    autograd = "autograd"  # cache rows get a sparse gradient; torch.optim steps them


class CacheCounter(str, Enum):
    auto = "auto"
    exact = "exact"
    bounded = "bounded"


class Task(str, Enum):
    time = "time"                      # time one point (benches.app.measure_point)
    topk_stability = "topk_stability"  # top-k change over a stream (benches.cache_experiments)
    tt_shapes = "tt_shapes"            # Table 2: shapes, parameters, memory reduction (benches.analytic)
    model_size = "model_size"          # Figure 5: whole-model embedding size (benches.analytic)
    init_distribution = "init_distribution"  # Figure 3: reconstructed entries per init (benches.analytic)
    paper = "paper"                    # every paper experiment in turn (benches.paper)
    train_dlrm = "train_dlrm"          # train a DLRM end to end: time and accuracy (benches.training)
    training = "training"              # every end-to-end training experiment in turn (benches.paper)


class DLRMDataset(str, Enum):
    kaggle = "kaggle"
    terabyte = "terabyte"


class ClickSource(str, Enum):
    synthetic = "synthetic"  # planted ground truth, real table cardinalities (ttrec.synthetic_clicks)
    criteo = "criteo"        # Criteo text files (ttrec.criteo)


class DenseInit(str, Enum):  # paper Table 1 (ttrec.dlrm.DENSE_INITS)
    uniform = "uniform"          # U(-1/sqrt(n), 1/sqrt(n)), DLRM's
    gauss_1 = "gauss_1"          # N(0, 1)
    gauss_1_2 = "gauss_1_2"      # N(0, 1/2)
    gauss_1_8 = "gauss_1_8"      # N(0, 1/8)
    gauss_1_3n = "gauss_1_3n"    # N(0, 1/(3n))
    gauss_1_9n2 = "gauss_1_9n2"  # N(0, 1/(9n^2))


class CompareTo(str, Enum):
    none = "none"
    uncompressed = "uncompressed"  # the same DLRM with every table nn.EmbeddingBag
    tt = "tt"                      # the same TT model without its cache


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
    """Which embedding implementation; ``backend`` applies to tt, ``sparse`` to dense (the others
    have neither: setting them for another implementation is an error, not silently ignored)."""

    name: Impl = Impl.tt
    backend: Backend = Backend.auto
    sparse: bool = True

    def __post_init__(self) -> None:
        if self.name != Impl.tt and self.backend != Backend.auto:
            runs = {Impl.t3nsor: "the torch reference", Impl.dense: "PyTorch's own kernel (aten)",
                    Impl.tltorch: "tensorly-torch"}[self.name]
            raise ValueError(f"impl.backend: got {self.backend.value!r} with impl.name={self.name.value}; only "
                             f"impl.name=tt has backends ({', '.join(b.value for b in Backend)}), {self.name.value} "
                             f"always runs {runs}: leave impl.backend=auto (device= chooses CPU or GPU)")
        if self.name != Impl.dense and not self.sparse:
            raise ValueError(f"impl.sparse: got false with impl.name={self.name.value}; only impl.name=dense "
                             f"(nn.EmbeddingBag) has a sparse/dense gradient choice: leave impl.sparse=true")


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
        for name in ("p_shapes", "q_shapes"):
            shapes = getattr(self, name)
            if shapes is not None and len(shapes) != self.d:
                raise ValueError(f"tt.{name}: got {list(shapes)} ({len(shapes)} factors) with tt.d={self.d}; "
                                 f"give d factors, or set tt.d={len(shapes)}")


def _shown(value):
    """A config value as the command line writes it (an enum by its value)."""
    return value.value if isinstance(value, Enum) else value


def _refuse_unread(group: str, node, selector: str, readers: dict, preset=lambda value: "") -> None:
    """Keys of ``node`` that only one value of its ``selector`` field reads (``readers``: key -> that
    value), set away from their defaults under another value: a ValueError naming the key, its value
    and its reader, not a setting silently ignored (workload.distribution's, dlrm.source's keys)."""
    current = getattr(node, selector)
    defaults = {f.name: f.default for f in dataclasses.fields(node)}
    for name, reader in readers.items():
        value = getattr(node, name)
        if current != reader and value != defaults[name]:
            raise ValueError(f"{group}.{name}: got {_shown(value)} with {group}.{selector}={current.value}; only "
                             f"{selector}={reader.value} reads it: set {group}.{selector}={reader.value}"
                             f"{preset(reader.value)}, or leave {name} at its default {_shown(defaults[name])}")


# synthetic-workload keys that distribution=criteo does not read (WorkloadConfig rejects them set)
_SYNTHETIC_ONLY = ("pooling_factor", "pooling_sigma", "pooling_distribution", "reuse_fraction")
_DISTRIBUTION_ONLY = {"zipf_alpha": Distribution.zipf, "permute": Distribution.zipf,  # the key: the one reader
                      "hit_rate": Distribution.hot_set, "hot_fraction": Distribution.hot_set,
                      "criteo_path": Distribution.criteo, "criteo_feature": Distribution.criteo,
                      "criteo_mapping": Distribution.criteo}
_WORKLOAD_PRESETS = ("uniform", "zipf")  # conf/workload/*.yaml


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
    # spread of bag sizes, a controlled hit rate and reuse between batches (ttrec.workloads.Workload);
    # reuse acts on batches 1, 2, ...: a timed point (batch 0) refuses it without a cache or a stream of
    # timed batches (to_objects)
    pooling_sigma: float = 0.0
    pooling_distribution: PoolingDistribution = PoolingDistribution.fixed
    hit_rate: float = 0.9
    hot_fraction: float = 0.001
    reuse_fraction: float = 0.0
    # distribution=criteo: batches of one categorical feature (0..25) of a Criteo text file
    criteo_path: Optional[str] = None
    criteo_feature: int = 0
    criteo_mapping: CriteoMapping = CriteoMapping.hash

    def __post_init__(self) -> None:
        _positive("workload", batch_size=self.batch_size, pooling_factor=self.pooling_factor)
        if self.weighted and self.pooling != Pooling.sum:
            raise ValueError(f"workload.weighted: got true with workload.pooling={self.pooling.value}; per-sample "
                             f"weights need workload.pooling=sum (as in nn.EmbeddingBag), or set workload.weighted=false")
        if self.distribution == Distribution.criteo:
            if self.weighted:
                raise ValueError("workload.weighted: got true with workload.distribution=criteo; a Criteo feature "
                                 "has no per-sample weights: set workload.weighted=false")
            if not self.criteo_path:
                raise ValueError("workload.criteo_path: got None; distribution=criteo needs the path of a "
                                 "Criteo text file (train.txt or day_N)")
            if not 0 <= self.criteo_feature < 26:
                raise ValueError(f"workload.criteo_feature: got {self.criteo_feature}; must be in [0, 26)")
            # the synthetic generator's bag and reuse settings: a Criteo feature has one lookup per
            # sample and no reuse, so a key set away from its default would be silently ignored
            for f in dataclasses.fields(self):
                if f.name in _SYNTHETIC_ONLY and getattr(self, f.name) != f.default:
                    value = getattr(self, f.name)
                    raise ValueError(f"workload.{f.name}: got {_shown(value)} with workload.distribution=criteo; a "
                                     f"Criteo feature gives one lookup per sample and no reuse, so the synthetic "
                                     f"workload's {f.name} does not apply: leave it at its default {_shown(f.default)} "
                                     f"or use a synthetic distribution (uniform, zipf, hot_set)")
        else:
            self.record()  # the record's checks name the key, the value and what is allowed
        # one distribution's keys set away from their defaults under another would be silently ignored
        # (their result columns stay empty): Zipf's under uniform, the hot set's under zipf, ...
        _refuse_unread("workload", self, "distribution", _DISTRIBUTION_ONLY,
                       preset=lambda d: f" (workload={d})" if d in _WORKLOAD_PRESETS else "")

    def record(self):
        """The synthetic workload as a ttrec.workloads.Workload (not for distribution=criteo)."""
        from ttrec.workloads import Workload

        return Workload(distribution=self.distribution.value, zipf_alpha=self.zipf_alpha, permute=self.permute,
                        batch_size=self.batch_size, pooling_factor=self.pooling_factor, weighted=self.weighted,
                        seed=self.seed, hit_rate=self.hit_rate, hot_fraction=self.hot_fraction,
                        pooling_sigma=self.pooling_sigma, pooling_distribution=self.pooling_distribution.value,
                        reuse_fraction=self.reuse_fraction)


MAX_STREAM_LOOKUPS = 1 << 28  # timing.stream_lookups' bound: 268M lookups, about 4 GiB of batches at pooling 1
MAX_STREAM_BATCHES = 1 << 17  # and the most batches it may take (at the workload's nominal lookups per batch)


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
    # 0: every call (warm-up and timed) replays the workload's batch 0. N > 0: the calls take distinct
    # batches in turn, batches 0, 1, ... of the workload stream, as many as hold N lookups (ceil(N / lookups
    # of batch 0)), all drawn before the warm-up (benches.app.timed_batches): a training run's steps each see a
    # new batch. A replayed batch keeps the rows it touches in the CPU's caches from one call to the next,
    # which can flatter an uncompressed table (nn.EmbeddingBag's rows) and not the TT cores (cached either
    # way). Memory: about 16 bytes per lookup at pooling 1 (indices, offsets), plus each batch's own tensors.
    stream_lookups: int = 0

    def __post_init__(self) -> None:
        _positive("timing", warmup=self.warmup, min_repeats=self.min_repeats, threads=self.threads)
        if isinstance(self.stream_lookups, bool) or not isinstance(self.stream_lookups, int) or not (
                0 <= self.stream_lookups <= MAX_STREAM_LOOKUPS):
            raise ValueError(f"timing.stream_lookups: got {self.stream_lookups!r}; must be an int in [0, "
                             f"{MAX_STREAM_LOOKUPS:,}] (0: replay batch 0; N: a stream of distinct batches holding N "
                             "lookups, about 16 bytes each)")
        if self.max_repeats < self.min_repeats:
            raise ValueError(f"timing.max_repeats: got {self.max_repeats}; must be >= min_repeats={self.min_repeats}")
        if not self.target_time_s >= 0:
            raise ValueError(f"timing.target_time_s: got {self.target_time_s}; must be >= 0 (seconds)")


@dataclass
class ModeConfig:
    """forward: the lookup alone; train: forward + backward + optimizer step.

    fused: for impl tt, the optimizer runs inside backward on exactly the touched core slices
    (TTEmbeddingBag(optimizer=...)); other implementations have no fused update and use torch.optim
    either way (the result rows' ``fused`` column records which ran).
    """

    name: Mode = Mode.forward
    optimizer: Optimizer = Optimizer.sgd
    lr: float = 0.01
    fused: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.lr < math.inf:  # (inf: torch.optim's steps would write inf/NaN into what they time)
            raise ValueError(f"mode.lr: got {self.lr}; must be a finite number > 0")


@dataclass
class CacheConfig:
    """LFU cache of hot rows in front of impl=tt (ttrec.cache.CachedTTEmbeddingBag); off by default.

    The app trains warmup_iters batches of the workload stream with the TT cores alone, populates
    the cache, measures the hit ratio on eval_batches further batches, then times the point's batch
    (batch 0 of the stream, never seen during warm-up). compare: also time the TT module without
    cache and nn.EmbeddingBag on the same batch, in the same process. stability_*: task=topk_stability.
    """

    enabled: bool = False
    fraction: float = 0.001
    warmup_iters: int = 10
    refresh_every: int = 0
    update: CacheUpdate = CacheUpdate.auto
    counter: CacheCounter = CacheCounter.auto
    counter_slots: Optional[int] = None
    write_back_steps: int = 0
    eval_batches: int = 4
    compare: bool = False
    stability_batches: int = 198
    stability_windows: int = 33

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"cache.fraction: got {self.fraction}; must be in (0, 1] (the paper: 0.0001 to 0.1)")
        for key in ("warmup_iters", "refresh_every", "write_back_steps", "eval_batches"):
            if getattr(self, key) < 0:
                raise ValueError(f"cache.{key}: got {getattr(self, key)}; must be >= 0")
        _positive("cache", counter_slots=self.counter_slots, stability_batches=self.stability_batches,
                  stability_windows=self.stability_windows)
        if self.stability_windows > self.stability_batches:
            raise ValueError(f"cache.stability_windows: got {self.stability_windows}; must be <= "
                             f"stability_batches={self.stability_batches}")


@dataclass
class AnalysisConfig:
    """The computed (untimed) experiments: Table 2 (ranks), Figure 5 (datasets x TT tables, at
    tt.rank) and Figure 3 (init schemes; entries sampled from a table of table.num_embeddings rows)."""

    ranks: List[int] = field(default_factory=lambda: [16, 32, 64])
    datasets: List[str] = field(default_factory=lambda: ["kaggle", "terabyte"])
    tt_tables: List[int] = field(default_factory=lambda: [0, 3, 5, 7])
    inits: List[Init] = field(default_factory=lambda: list(Init))
    samples: int = 200_000
    bins: int = 101

    def __post_init__(self) -> None:
        from ttrec.datasets import DATASETS

        for name in self.datasets:
            if name not in DATASETS:
                raise ValueError(f"analysis.datasets: got {name!r}; allowed: {sorted(DATASETS)}")
        for k in self.tt_tables:
            if not 0 <= k <= 26:
                raise ValueError(f"analysis.tt_tables: got {k}; each must be in [0, 26] (tables in TT format)")
        _positive("analysis", samples=self.samples, bins=self.bins, **{f"ranks[{i}]": r for i, r in enumerate(self.ranks)})


@dataclass
class DLRMConfig:
    """End-to-end DLRM training (task=train_dlrm, benches.training; the paper's Figures 6, 7, 10, Table 1).

    The model is MLPerf-DLRM's for ``dataset`` (ttrec.dlrm.ARCHS) with its ``tt_tables`` largest
    tables in TT format (rank, init and d from ``tt.*``; an LFU cache from ``cache.*`` when
    ``cache.enabled``). Data: ``synthetic`` (real cardinalities divided by ``scale_down``, Zipf ids,
    labels from a planted model) or ``criteo`` (``criteo_path``; held out: ``criteo_eval_path`` or
    the file's first ``eval_samples`` samples). ``batch_size``/``lr`` null: the MLPerf reference's
    (Kaggle 128 / 0.1, Terabyte 2048 / 0.1). ``timing_warmup`` iterations train but are not timed.
    ``compare_to``: also train the uncompressed model (or the TT model without cache) on the same
    batches, interleaved, for paired time and accuracy ratios.
    """

    dataset: DLRMDataset = DLRMDataset.kaggle
    tt_tables: int = 0
    source: ClickSource = ClickSource.synthetic
    criteo_path: Optional[str] = None
    criteo_eval_path: Optional[str] = None
    criteo_mapping: CriteoMapping = CriteoMapping.hash
    scale_down: int = 1
    zipf_alpha: float = 1.05
    iterations: int = 200
    timing_warmup: int = 10
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    dense_init: DenseInit = DenseInit.uniform
    eval_samples: int = 65536
    eval_batch_size: int = 16384
    compare_to: CompareTo = CompareTo.none

    def __post_init__(self) -> None:
        _positive("dlrm", scale_down=self.scale_down, iterations=self.iterations, batch_size=self.batch_size,
                  eval_samples=self.eval_samples, eval_batch_size=self.eval_batch_size)
        if not 0 <= self.tt_tables <= 26:
            raise ValueError(f"dlrm.tt_tables: got {self.tt_tables}; must be in [0, 26] (tables in TT format)")
        if self.timing_warmup < 0 or self.timing_warmup >= self.iterations:
            raise ValueError(f"dlrm.timing_warmup: got {self.timing_warmup}; must be in [0, dlrm.iterations="
                             f"{self.iterations}) (untimed iterations before the timed ones)")
        if self.lr is not None and not 0 < self.lr < math.inf:
            raise ValueError(f"dlrm.lr: got {self.lr}; must be a finite number > 0 (or null: the MLPerf reference's 0.1)")
        if not self.zipf_alpha > 0:
            raise ValueError(f"dlrm.zipf_alpha: got {self.zipf_alpha}; must be > 0")
        if self.source == ClickSource.criteo and not self.criteo_path:
            raise ValueError("dlrm.criteo_path: got None; source=criteo needs a Criteo text file "
                             "(Kaggle train.txt or Terabyte day_N)")
        # one source's keys set away from their defaults under the other would be silently ignored
        _refuse_unread("dlrm", self, "source", _SOURCE_ONLY)
        if self.compare_to == CompareTo.tt and self.tt_tables == 0:
            raise ValueError("dlrm.compare_to: got 'tt' with dlrm.tt_tables=0; there is no TT model to compare to")


def existing_file(key: str, path: str) -> str:
    """``path`` (a data file named by config key ``key``), or a ValueError naming the key when there
    is no such file: checked by the job that reads it, before any reading, and by :func:`check_point`
    (the config itself does not look at the file system)."""
    if not Path(path).is_file():
        where = "" if Path(path).is_absolute() else f" (a relative path is read from {Path.cwd()}, where the run started)"
        what = "no such file" if not Path(path).exists() else "not a regular file"  # (/dev/null, a directory)
        raise ValueError(f"{key}: got {path!r}; {what}{where}. It names a Criteo text file (Kaggle train.txt "
                         f"or Terabyte day_N)")
    return path


_SOURCE_ONLY = {"criteo_path": ClickSource.criteo, "criteo_eval_path": ClickSource.criteo,  # the key: its reader
                "criteo_mapping": ClickSource.criteo, "zipf_alpha": ClickSource.synthetic}


@dataclass
class ScaleConfig:
    """Sizes of the paper experiments (conf/scale/*.yaml), read by the experiment presets through
    interpolation (``${scale.ranks}``). Lists are comma-separated sweep values.

    smoke: seconds (the tests); default: all of experiment=paper in about 5 minutes on a quiet 2-core
    CPU; paper: the paper's table sizes (Kaggle's largest table; batch 65,536, ours: the paper gives
    no kernel batch size).
    """

    name: str = "default"
    table_rows: int = 100_000          # fig11, fig12, fig10: the table timed
    batch_size: int = 4096             # lookups per batch at pooling 1 (fig11, fig8)
    ranks: str = "8,16,32,64"          # fig11
    poolings: str = "1,10,100"         # fig11
    rows: str = "10000,100000,1000000"  # fig8: table rows
    fig12_ranks: str = "16,32,64"
    fig12_poolings: str = "1,10"
    hit_rates: str = "0,0.25,0.5,0.75,0.9,0.95,0.99"
    cache_batch_size: int = 2048       # fig12, fig10
    cache_fractions: str = "0.0001,0.001,0.01,0.1"
    warmup_iters: str = "1,4,16,64"
    stability_batches: int = 198       # fig9
    stability_windows: int = 33
    stability_batch_size: int = 8192
    init_samples: int = 200_000        # fig3
    # end-to-end training (fig7, table1, fig6, fig10_training): synthetic Kaggle-shaped clicks
    train_scale_down: int = 1000       # table rows = ceil(Kaggle's / this)
    train_batch_size: Optional[int] = 128  # null: the dataset's MLPerf mini-batch (Kaggle 128, Terabyte 2048)
    train_iterations: int = 600
    fig7_iterations: int = 200         # fig7 measures time only
    train_timing_warmup: int = 20
    train_eval_samples: int = 65536
    train_tt_tables: str = "3,5,7"     # fig7, fig6
    train_ranks: str = "8,16,32,64"    # fig7
    fig6_tt_tables: str = "0,3,7"
    fig6_ranks: str = "8,32"
    fig6_inits: str = "uniform,normal,sampled_gaussian,calibrated"
    train_cache_fractions: str = "0.0001,0.01"
    train_cache_warmups: str = "60,180,300"  # iterations (10%, 30%, 50% of train_iterations)
    warmup: int = 2                    # timing of the timed experiments
    min_repeats: int = 5
    max_repeats: int = 50
    target_time_s: float = 0.3


SEED_MAX = 2**32 - 1  # seed: torch's generators take < 2**64, offsets per table and init scheme are added


@dataclass
class BenchConfig:
    impl: ImplConfig = field(default_factory=ImplConfig)
    table: TableConfig = field(default_factory=TableConfig)
    tt: TTConfig = field(default_factory=TTConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    timing: TimingConfig = field(default_factory=TimingConfig)
    mode: ModeConfig = field(default_factory=ModeConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    dlrm: DLRMConfig = field(default_factory=DLRMConfig)
    task: Task = Task.time
    device: str = "cpu"
    # A job whose directory already holds results of the same point is skipped; redo=true measures
    # it again (the old results file is kept, renamed, never overwritten).
    redo: bool = False
    seed: int = 0
    # Where results go: <results_root>/<scale>/<experiment> for a preset, <results_root>/runs|sweeps/<time>
    # otherwise (conf/bench.yaml); relative paths are taken from the directory the app was started in.
    results_root: str = "outputs"
    # Where the sweep's figure goes; relative paths are taken from the directory the app was started in.
    figures_dir: str = "reports/figures/latest"  # git-ignored; reports/figures/ keeps the committed reference run

    def __post_init__(self) -> None:
        if not 0 <= self.seed <= SEED_MAX:
            raise ValueError(f"seed: got {self.seed}; must be in [0, {SEED_MAX}] (2**32 - 1: it seeds torch's and "
                             f"numpy's generators, offset per table and init scheme)")
        if (self.mode.name == Mode.train and self.mode.fused and self.impl.name == Impl.tt
                and self.impl.backend == Backend.torch):
            raise ValueError("mode.fused: got true with impl.backend=torch (impl=tt_reference sets it); the fused "
                             "sparse update runs in the native kernels only: use impl.backend=auto, cpu or cuda, "
                             "or mode.fused=false")
        if self.cache.enabled and self.task == Task.time:
            self._check_timed_cache()
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device: got {self.device!r}; allowed: cpu, cuda, cuda:N")
        from ttrec.tt import check_device  # the library's: CUDA only where there is a GPU

        check_device(self.device)
        if self.task == Task.train_dlrm and self.device != "cpu":  # its timing has no CUDA synchronization
            raise ValueError(f"device: got {self.device!r}; task=train_dlrm trains on the CPU only; use device=cpu")
        if self.timing.flush_l2 and not self.device.startswith("cuda"):
            raise ValueError(f"timing.flush_l2: got true with device={self.device}; it flushes a GPU's L2 cache "
                             f"(device=cuda), the CPU protocol flushes nothing")
        if self.timing.stream_lookups:
            self._check_stream()

    def _check_stream(self) -> None:
        """timing.stream_lookups > 0: where a stream of timed batches is measured as it says."""
        n, w = self.timing.stream_lookups, self.workload
        why = None
        if self.task != Task.time:
            why = f"with task={self.task.value}; only a timed point (task=time) takes a stream of batches"
        elif self.cache.enabled:
            why = ("with cache.enabled=true; a cached point records the hit ratio of batch 0 and warms its cache on the "
                   "batches after it, so a stream of timed batches is not supported with a cache")
        elif w.distribution == Distribution.criteo:
            why = ("with workload.distribution=criteo; a Criteo file is read again from its start when it ends, without "
                   "notice, so a stream longer than the file would time repeated batches as distinct ones")
        elif _stream_batches(self) > MAX_STREAM_BATCHES:
            why = (f"with workload.batch_size={w.batch_size} x pooling_factor={w.pooling_factor}: that is "
                   f"{_stream_batches(self):,} batches, more than {MAX_STREAM_BATCHES:,} (each batch costs its own "
                   f"tensors and drawing time)")
        if why is not None:
            raise ValueError(f"timing.stream_lookups: got {n} {why}: set timing.stream_lookups=0")


    def _check_timed_cache(self) -> None:
        """A timed point's cache (benches.cache_experiments): settings it would never act on are errors."""
        c, train = self.cache, self.mode.name == Mode.train
        if self.impl.name != Impl.tt:  # the cache wraps TT cores
            raise ValueError(f"cache.enabled: true needs impl=tt, got impl={self.impl.name.value}; use impl=tt (or "
                             f"tt_cpu, tt_reference), or cache=none (cache.compare=true also times nn.EmbeddingBag)")
        if c.refresh_every:  # eval-mode forwards never refresh; the timed training steps repeat one batch
            raise ValueError(f"cache.refresh_every: got {c.refresh_every}; a timed point never refreshes usefully (its "
                             f"timed forwards run in eval mode, and its timed training steps repeat one batch, which a "
                             f"refreshing cache would learn): allowed with task=time: 0 (task=train_dlrm refreshes)")
        if train and self.mode.fused and c.update == CacheUpdate.autograd:
            raise ValueError("cache.update: got autograd with mode.fused=true; a fused training step runs no torch "
                             "optimizer, so the cached rows would not train: allowed with mode.fused=true: fused, auto "
                             "(or set mode.fused=false)")


def output_dir(root: str, kind: str, experiment: str | None, scale: str, stamp: str) -> str:
    """The output directory of a run or sweep (resolver ``ttrec_output_dir`` in conf/bench.yaml):
    ``<root>/<scale>/<experiment>`` for an experiment preset, so that running it again resumes it;
    ``<root>/<kind>/<stamp>`` for anything else."""
    if experiment in (None, "", "None", "null"):
        return f"{root}/{kind}/{stamp}"
    return f"{root}/{scale}/{experiment}"


def register() -> None:
    """Register the schema under the name the root config's defaults list uses, and the resolver
    that names output directories."""
    cs = ConfigStore.instance()
    cs.store(name="bench_schema", node=BenchConfig)
    if not OmegaConf.has_resolver("ttrec_output_dir"):
        OmegaConf.register_new_resolver("ttrec_output_dir", output_dir)


def check_override_keys(args: list[str]) -> str | None:
    """Why a command-line override names a key the schema does not have (with the keys allowed
    there and the closest one), or an option its config group does not have (``scale=smokee``), or
    None. Hydra's own message for a misspelt key (``tt.rnak=16``) names neither, and suggests
    ``+tt.rnak=16``, which :func:`to_objects` then refuses; for a misspelt option it adds its search
    path and a traceback hint. ``hydra...`` keys, ``+``/``~`` overrides, glob sweeps of options, the
    options of a user's own config directories and syntax errors are left to Hydra."""
    groups = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")
    # (config directories of the user's own, where group options may lie outside conf/: left to Hydra)
    elsewhere = any(a.startswith(("--config-dir", "-cd", "--config-path", "-cp")) or "searchpath" in a for a in args)
    for o in _parse_overrides(args):
        key = o.key_or_group
        if o.is_add() or o.is_force_add() or o.is_delete() or o.package or "/" in key or key.split(".")[0] == "hydra":
            continue
        if key in groups and not elsewhere:  # an option of a config group: conf/<group>/<option>.yaml
            options = sorted(p.stem for p in (CONF_DIR / key).glob("*.yaml"))
            try:
                values = list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()]
            except Exception:  # (a glob or interval sweep: Hydra expands or refuses it)
                continue
            for value in values:
                if isinstance(value, str) and value not in options:
                    close = difflib.get_close_matches(value, options, n=1)
                    hint = f"; did you mean '{key}={close[0]}'?" if close else ""
                    return f"{o.input_line}: '{value}' is not an option of '{key}'; allowed: {', '.join(options)}{hint}"
            continue
        schema, parts = BenchConfig, key.split(".")
        for i, part in enumerate(parts):
            if not dataclasses.is_dataclass(schema):
                break  # inside a plain value: Hydra's type check speaks
            hints = typing.get_type_hints(schema)
            if part not in hints:
                allowed = sorted(hints) + (groups if i == 0 else [])
                where = f"'{'.'.join(parts[:i])}' ({schema.__name__})" if i else f"the config ({schema.__name__})"
                close = difflib.get_close_matches(part, allowed, n=1)
                hint = f"; did you mean '{'.'.join(parts[:i] + close)}'?" if close else ""
                return (f"{o.input_line}: '{part}' is not a key of {where}; allowed: {', '.join(dict.fromkeys(allowed))}"
                        f"{hint}")
            schema = hints[part]
    return None


def _parse_overrides(args: list[str]) -> list:
    """The command line's overrides as Hydra parses them; [] on a syntax error (Hydra reports it
    with its position)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith("-")])
    except Exception:
        return []


_PLAIN = re.compile(r"[\w.+\-/:]*")  # a value that reads back the same as an override's text


def check_values(args: list[str]) -> str | None:
    """Why the config that the command line composes is refused by :func:`to_objects` (its range
    checks: ``tt.rank=0``, ``workload.batch_size=-5``) or by the job's own :func:`check_point`, or None;
    run before Hydra creates a run or
    sweep directory, so that a bad value is one message and exit 2 rather than a failed job's
    directory (a sweep: one per job). Each value of a command-line sweep (``tt.rank=0,4``) is
    checked, the other sweeps at their first value; the sweeps an experiment preset defines are
    its own. Anything this check cannot compose (syntax, unknown groups, values that do not read
    back as plain text) is left to Hydra and the job."""
    from hydra import compose, initialize_config_dir

    overrides = [o for o in _parse_overrides(args) if o.key_or_group.split(".")[0].split("/")[0] != "hydra"]
    choices: list[list[str]] = []
    here = _chosen(args, "hydra/launcher") in LOCAL_LAUNCHERS

    def text(v) -> str | None:  # the value as override text that reads back the same, or None
        if isinstance(v, (str, int, float, bool)) and _PLAIN.fullmatch(str(v)):
            return str(v)
        if isinstance(v, list) and all(isinstance(x, (str, int)) and _PLAIN.fullmatch(str(x)) for x in v):
            return "[" + ",".join(map(str, v)) + "]"  # (tt.p_shapes=[..], analysis.inits=[..])
        return None

    try:
        for o in overrides:
            values = [text(v) for v in (o.sweep_iterator() if o.is_sweep_override() else [o.value()])]
            if o.is_delete() or None in values:
                return None
            prefix = o.input_line.split("=", 1)[0]
            choices.append([f"{prefix}={v}" for v in values])
    except Exception:  # (an interval or other sweep without values)
        return None
    combos = [[c[0] for c in choices]]
    combos += [[*combos[0][:i], v, *combos[0][i + 1:]] for i, c in enumerate(choices) for v in c[1:]]
    register()
    for combo in combos:
        try:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose(config_name="bench", overrides=combo)
        except Exception:
            return None
        try:
            check_point(to_objects(cfg), _chosen(combo, "experiment"), here=here)
        except ValueError as exc:
            return str(exc)
        except Exception:
            return None
    return None


# launchers whose jobs run on the machine the command is typed on (conf/hydra/launcher; basic: Hydra's)
LOCAL_LAUNCHERS = (None, "basic", "cpu_pool")


def _chosen(overrides: list[str], group: str) -> str | None:
    """The option a list of overrides chooses for ``group`` (the last ``group=``, e.g. ``experiment``,
    ``hydra/launcher``), or None: the default (no experiment; Hydra's basic launcher)."""
    chosen = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+") == group]
    return chosen[-1] if chosen else None


# command-line keys naming directories the run creates (Hydra creates the run/sweep directory before
# the job starts, so a file in the way is a bare Hydra traceback unless caught here)
OUTPUT_DIR_KEYS = ("results_root", "figures_dir", "hydra.run.dir", "hydra.sweep.dir")


def check_output_dirs(args: list[str]) -> str | None:
    """Why a directory the command line names (:data:`OUTPUT_DIR_KEYS`) cannot be created: an
    existing file at that path or above it; or None. Relative paths are taken from the current
    directory, as the app takes them."""
    given = {o.key_or_group: o for o in _parse_overrides(args)}  # the last override of a key wins, as in Hydra
    for o in given.values():
        if o.key_or_group not in OUTPUT_DIR_KEYS or o.is_delete():
            continue
        for value in (o.sweep_iterator() if o.is_sweep_override() else [o.value()]):
            value = str(getattr(value, "text", value))  # a quoted string's text
            if not value.strip():  # ("results_root=": the run would go under the filesystem's root, /runs/...)
                return (f"{o.key_or_group}: got {value!r}; {o.key_or_group} must name a directory (relative paths are "
                        "taken from the current directory, e.g. outputs)")
            if "${" in value:  # an interpolation: resolved later
                continue
            blocker = next((p for p in (Path(value), *Path(value).parents) if p.exists()), None)
            if blocker is not None and not blocker.is_dir():
                what = "which" if blocker == Path(value) else f"but {str(blocker)!r}"
                return (f"{o.key_or_group}: got {value!r}, {what} is a file, not a directory; "
                        f"{o.key_or_group} must be a directory or a path that does not exist yet (it is created)")
    return None


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


def _reject_unread_by_timed_point(cfg: BenchConfig) -> None:
    """Settings of the command line a timed point would never act on. A timed point times batch 0
    of its workload stream, which has no batch before it: ``workload.reuse_fraction`` changes the
    batches after it only (a cache's warm-up and held-out batches, task=topk_stability's stream, the
    timed batches of ``timing.stream_lookups``).
    Checked here, not in ``__post_init__``: cache.compare's comparison points (the same stream
    without the cache, built from the cached point's config) do keep it."""
    w = cfg.workload
    if cfg.task == Task.time and not cfg.cache.enabled and _stream_batches(cfg) < 2 and w.reuse_fraction != 0:
        raise ValueError(f"workload.reuse_fraction: got {w.reuse_fraction} with cache.enabled=false and "
                         f"timing.stream_lookups={cfg.timing.stream_lookups}; a timed point times batch 0 of the workload "
                         f"stream, which has no batch before it to repeat lookups of, so the measurement would not "
                         f"change: reuse acts on the batches after it (a cache's warm-up, cache=lfu; task=topk_stability; "
                         f"a stream of two timed batches or more, timing.stream_lookups > batch_size x pooling_factor = "
                         f"{w.batch_size * w.pooling_factor}): leave workload.reuse_fraction at 0.0")


def _stream_batches(cfg: BenchConfig) -> int:
    """How many batches ``timing.stream_lookups`` takes at the workload's nominal batch_size x pooling_factor
    lookups per batch (benches.app.stream_length counts batch 0's, which a spread of bag sizes moves)."""
    return max(1, -(-cfg.timing.stream_lookups // (cfg.workload.batch_size * cfg.workload.pooling_factor)))


def _as_override_keys(message: str) -> str:
    """A library message's argument names as the command line's keys (tt_p_shapes -> tt.p_shapes ...)."""
    for arg, key in (("tt_p_shapes", "tt.p_shapes"), ("tt_q_shapes", "tt.q_shapes"), ("tt_ranks", "tt.rank")):
        message = re.sub(rf"\b{arg}\b", key, message)
    return message


def check_point(cfg: BenchConfig, experiment: str | None, here: bool = True) -> None:
    """What a job of this config (under ``experiment``, None or "none" without one) would refuse before
    measuring, as a ValueError: a scale without an experiment; for a timed point of a TT implementation,
    a TT format that cannot be made (shapes, ranks: ttrec.tt.tt_spec's checks); and with ``here`` (the
    jobs run on this machine) what this machine cannot give it: the cores' memory, a backend
    (impl.backend=cuda without CUDA, =cpu without the native kernel or for a format it does not support),
    the Criteo file of dlrm.source=criteo. Called by the job and, before Hydra makes any directory, by
    :func:`check_values` (one message, exit 2, instead of a failed job per point), whose ``here`` is false
    for a launcher that runs the jobs elsewhere (a SLURM login node need not have the compute nodes'
    compiler, memory or files)."""
    if experiment in (None, "none") and cfg.scale.name != "default":
        raise ValueError(f"scale: got {cfg.scale.name!r} without an experiment; scale= sizes the experiment "
                         f"presets (experiment=default, the default sweep, or experiment=NAME). A single point "
                         f"takes its sizes from table.num_embeddings=, workload.batch_size= etc.")
    if here and cfg.task == Task.train_dlrm and cfg.dlrm.source == ClickSource.criteo:  # (every job reads it)
        existing_file("dlrm.criteo_path", cfg.dlrm.criteo_path)
        if cfg.dlrm.criteo_eval_path is not None:
            existing_file("dlrm.criteo_eval_path", cfg.dlrm.criteo_eval_path)
    if cfg.task != Task.time or cfg.impl.name == Impl.dense:
        return
    from ttrec import init as tt_init
    from ttrec.cpu import ops as cpu_ops
    from ttrec.tt import backend_status, tt_spec

    t = cfg.tt
    given = (f"tt.rank={t.rank}, tt.d={t.d}, tt.p_shapes={t.p_shapes}, tt.q_shapes={t.q_shapes}, table.num_embeddings="
             f"{cfg.table.num_embeddings}, table.embedding_dim={cfg.table.embedding_dim}")
    try:
        spec = tt_spec(cfg.table.num_embeddings, cfg.table.embedding_dim, t.rank, t.p_shapes, t.q_shapes, t.d)
        if here:
            tt_init.check_memory(spec, 4)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{_as_override_keys(str(exc))} (from {given})") from None
    backend = cfg.impl.backend
    if here and cfg.impl.name == Impl.tt and backend in (Backend.cpu, Backend.cuda):
        reason = backend_status(backend.value)
        if reason is None and backend == Backend.cpu:
            reason = cpu_ops.spec_unsupported(spec)
        if reason is not None:
            raise ValueError(f"impl.backend: got {backend.value!r}, which cannot run here ({given}): {reason}; "
                             f"impl.backend=auto takes the fastest backend that can")


def to_objects(cfg: DictConfig) -> BenchConfig:
    """Instantiate the dataclasses, running their range checks; unknown keys, and settings a timed
    point would not act on, are errors."""
    _reject_unknown_keys(cfg)
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, BenchConfig):
        raise TypeError("the bench config must compose onto bench_schema (is `- bench_schema` first in its defaults?)")
    _reject_unread_by_timed_point(obj)
    return obj
