"""Measurement prototype, not part of the package: the fused SGD step with its autograd node in C++.

What it answers: how much of the fused training step is Python and autograd that a C++ autograd node
(a torch extension) would remove. The node here calls the same native kernel (``tt_forward`` keeping its
plan, ``tt_backward`` with the SGD update) through the kernel library's function pointers, on a batch
checked by ``make_bags``, and nothing else: none of the guards of ``ttrec.cpu.ops._TTBagCPU`` (cores or
batch changed between forward and backward, a second backward, the kept plan's epoch, the module's lock,
stats, the CI gate's planted slowdown), so it must not be used for training. It first checks that three of
its steps leave the cores bitwise equal to three steps of the module, then times both steps in the suite's
interleaved rounds (benches.cpu_kernel.interleaved: blocks of about 0.15 s taking turns, each round probed).

    PYTHONPATH=. python reports/cpu_kernel/cxx_node_prototype.py --batches 65536 8192 2048 512 --rounds 30

Builds the extension with torch.utils.cpp_extension (about a minute) into
``$TTREC_CACHE_DIR/cxx_node_prototype`` (default ``~/.cache/ttrec``). Kaggle's largest table, R = 32,
Zipf(1.05) lookups, 2 threads (benches.cpu_kernel's paper scale).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch

SOURCE = r"""
#include <torch/extension.h>
typedef int (*fwd_t)(const void*, const float* const*, const int64_t*, const int64_t*, int64_t, const float*, int, float*,
                     int, int64_t, int, void*, void**);
typedef int (*bwd_t)(const void*, const float* const*, const int64_t*, const int64_t*, int64_t, const float*, int,
                     const float*, float* const*, uint8_t* const*, int, int64_t, void*, void*, int, float, float,
                     float* const*);
typedef void (*free_t)(void*);
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ptrs: int64 addresses of the 3 cores, 3 zero gradient scratch tensors and 3 touched masks
struct FusedBag : public torch::autograd::Function<FusedBag> {
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor anchor, torch::Tensor idx, torch::Tensor offs,
                               torch::Tensor ptrs, int64_t shape, int64_t fwd, int64_t bwd, int64_t release,
                               int64_t threads, double lr, int64_t D) {
    const int64_t n_bags = offs.numel() - 1;
    auto out = torch::empty({n_bags, D});
    void* plan = nullptr;
    const int64_t* p = ptrs.data_ptr<int64_t>();
    const int rc = ((fwd_t)fwd)((const void*)shape, (const float* const*)p, idx.data_ptr<int64_t>(),
                                offs.data_ptr<int64_t>(), n_bags, nullptr, 0, out.data_ptr<float>(), (int)threads,
                                (int64_t)128 << 20, 1, nullptr, &plan);
    TORCH_CHECK(rc == 0, "tt_forward failed with code ", rc);
    ctx->saved_data["idx"] = idx;
    ctx->saved_data["offs"] = offs;
    ctx->saved_data["ptrs"] = ptrs;
    ctx->saved_data["plan"] = (int64_t)plan;
    ctx->saved_data["shape"] = shape;
    ctx->saved_data["bwd"] = bwd;
    ctx->saved_data["release"] = release;
    ctx->saved_data["threads"] = threads;
    ctx->saved_data["lr"] = lr;
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto idx = ctx->saved_data["idx"].toTensor(), offs = ctx->saved_data["offs"].toTensor();
    auto ptrs = ctx->saved_data["ptrs"].toTensor();
    void* plan = (void*)ctx->saved_data["plan"].toInt();
    const int64_t* p = ptrs.data_ptr<int64_t>();
    auto g = grads[0].contiguous();
    const int rc = ((bwd_t)ctx->saved_data["bwd"].toInt())(
        (const void*)ctx->saved_data["shape"].toInt(), (const float* const*)p, idx.data_ptr<int64_t>(),
        offs.data_ptr<int64_t>(), offs.numel() - 1, nullptr, 0, g.data_ptr<float>(), (float* const*)(p + 3),
        (uint8_t* const*)(p + 6), (int)ctx->saved_data["threads"].toInt(), (int64_t)128 << 20, nullptr, plan, 1,
        (float)ctx->saved_data["lr"].toDouble(), 0.f, nullptr);
    ((free_t)ctx->saved_data["release"].toInt())(plan);
    TORCH_CHECK(rc == 0, "tt_backward failed with code ", rc);
    return variable_list(11);
  }
};

torch::Tensor fused_bag(torch::Tensor anchor, torch::Tensor idx, torch::Tensor offs, torch::Tensor ptrs, int64_t shape,
                        int64_t fwd, int64_t bwd, int64_t release, int64_t threads, double lr, int64_t D) {
  return FusedBag::apply(anchor, idx, offs, ptrs, shape, fwd, bwd, release, threads, lr, D);
}
"""


def build_extension():
    from torch.utils.cpp_extension import load_inline

    from ttrec.cpu.build import _cache_dir  # the kernel's cache directory ($TTREC_CACHE_DIR)

    directory = _cache_dir() / "cxx_node_prototype"
    directory.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ext = load_inline(name="ttrec_cxx_node_prototype", cpp_sources=SOURCE, functions=["fused_bag"],
                      extra_cflags=["-O2"], build_directory=str(directory))
    print(f"[prototype] extension ready in {time.perf_counter() - t0:.1f} s ({directory})")
    return ext


def measure(ext, kernel: tuple[int, int, int], batch_size: int, rounds: int) -> str:
    """One batch size: the cores' bitwise check, then alternating rounds of the two steps."""
    from benches.app import build_point
    from benches.cpu_kernel import SCALES, _cfg, interleaved, round_states
    from ttrec.bags import make_bags
    from ttrec.cpu import ops

    cfg = _cfg(SCALES["paper"], "native", rank=32, pooling=1, batch=batch_size, mode="train", fused=True,
               distribution="zipf", threads=2)
    module, batch, _ = build_point(cfg)
    twin = build_point(cfg)[0]  # the same seed: the same cores, stepped by the C++ node
    cores = list(twin.tt_cores._parameters.values())
    spec = twin.spec
    scratch = [torch.zeros_like(c.detach()) for c in cores]
    touched = [torch.zeros(p, dtype=torch.uint8) for p in spec.tt_p_shapes]
    ptrs = torch.tensor([t.data_ptr() for t in cores + scratch + touched], dtype=torch.int64)
    shape = ops._shape(spec)
    anchor = torch.zeros((), requires_grad=True)
    threads = ops.threads_for(batch_size)

    def cxx_step(grad_out):
        bags = make_bags(batch.indices, batch.offsets, None, num_embeddings=spec.num_embeddings, mode="sum")
        ext.fused_bag(anchor, bags.indices, bags.offsets, ptrs, ctypes.addressof(shape), *kernel, threads,
                      module.learning_rate, spec.embedding_dim).backward(grad_out)

    def python_step(grad_out):
        module(batch.indices, batch.offsets).backward(grad_out)

    for k in range(3):  # the same work: the cores stay bitwise equal
        grad_out = torch.randn(batch_size, spec.embedding_dim, generator=torch.Generator().manual_seed(k))
        python_step(grad_out)
        cxx_step(grad_out)
    if not all(torch.equal(a, b) for a, b in zip(module.tt_cores, twin.tt_cores)):
        raise SystemExit(f"batch {batch_size}: the C++ node's steps left other cores than the module's")
    grad_out = torch.randn(batch_size, spec.embedding_dim, generator=torch.Generator().manual_seed(9))
    states: list = []  # the suite's interleaved rounds: blocks of calls taking turns, each round probed
    times = interleaved({"python": lambda: python_step(grad_out), "cxx": lambda: cxx_step(grad_out)}, rounds,
                        SCALES["paper"]["block_s"], states)
    ratios = [c / p for c, p in zip(times["cxx"], times["python"])]
    q = statistics.quantiles(ratios, n=4)
    by_state = {k: [r for r, st in zip(ratios, round_states(states)) if st == k] for k in ("near", "far")}
    return (f"batch {batch_size:,}: module step {1e3 * statistics.median(times['python']):.3f} ms, C++ node step "
            f"{1e3 * statistics.median(times['cxx']):.3f} ms, time ratio {statistics.median(ratios):.3f} "
            f"[{q[0]:.3f}-{q[2]:.3f}] over {rounds} interleaved rounds ("
            + ", ".join(f"{k} {statistics.median(v):.3f} in {len(v)}" for k, v in by_state.items() if v)
            + "; cores bitwise equal after 3 steps)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[65536, 512], help="lookups per batch (pooling 1)")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds per batch size (benches.cpu_kernel)")
    args = parser.parse_args()

    from benches.environment import steady_heap
    from ttrec.cpu import ops

    ext = build_extension()
    torch.set_num_threads(2)
    steady_heap()
    lib = ops.library()
    kernel = tuple(ctypes.cast(f, ctypes.c_void_p).value for f in (lib.tt_forward, lib.tt_backward, lib.tt_state_free))
    for batch_size in args.batches:
        print(measure(ext, kernel, batch_size, args.rounds), flush=True)


if __name__ == "__main__":
    main()
