// CPU emulation of the small part of CUDA the TT-Rec kernels use, so the literal .cu sources compile
// with g++ and run on a machine without a GPU (tests/test_cuda_emulated.py):
//
//   g++ -std=c++20 -x c++ -include impl/cuda/emulation.h -I impl/include -I impl/cuda -c tt_forward.cu
//
// What it provides:
//   - __global__/__device__/__host__/__forceinline__ as plain C++; __shared__ as `static` (blocks run
//     one at a time, so a function-static array is the block's shared memory);
//   - threadIdx/blockIdx (thread_local) and blockDim/gridDim; 1-D launches only;
//   - dynamic shared memory (TT_DYN_SMEM) as a per-launch buffer, filled with NaN bytes before every
//     block (reading memory the block did not write shows up as NaN) and followed by a guard zone
//     checked after every block (writing past the bytes the launch asked for fails the launch);
//   - __syncthreads as a std::barrier over the block's threads: each CUDA thread is a std::thread, so
//     threads of a block really run concurrently and interleave at any point, as on a GPU;
//   - atomicAdd(T*, T) through std::atomic_ref;
//   - ttemu::run_grid(grid, block, smem, body): runs the grid block after block.
//
// What it does not model: warps and their lock-step execution (the kernels use no warp primitives),
// the GPU memory model beyond the barrier's and atomics' ordering, memory coalescing, occupancy,
// register and shared-memory limits other than the requested size, and speed.
#ifndef TTREC_CUDA_EMULATION_H
#define TTREC_CUDA_EMULATION_H

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#define TTREC_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline dim3 blockDim;
inline dim3 gridDim;

namespace ttemu {

constexpr std::size_t kGuardBytes = 256;
constexpr unsigned char kPoison = 0xFF;  // as float: NaN
constexpr unsigned char kGuard = 0xA5;

inline std::barrier<>* sync_barrier = nullptr;
inline unsigned char* dynamic_smem = nullptr;

enum Status : int {
  kOk = 0,
  kBadBlock = 1,        // block size outside 1..1024 or not 1-D
  kBadGrid = 2,         // grid size outside 1..2^31-1 or not 1-D
  kSmemTooLarge = 3,    // more dynamic shared memory than any GPU offers (227 KiB)
  kSmemOverflow = 4,    // a block wrote past the dynamic shared memory it was given
};

// Runs body() as every thread of every block of the grid; blocks run one after another.
inline int run_grid(dim3 grid, dim3 block, std::size_t smem_bytes, const std::function<void()>& body) {
  if (block.x < 1 || block.x > 1024 || block.y != 1 || block.z != 1) return kBadBlock;
  if (grid.x < 1 || grid.x > 0x7fffffffu || grid.y != 1 || grid.z != 1) return kBadGrid;
  if (smem_bytes > 227 * 1024) return kSmemTooLarge;
  std::vector<long long> storage((smem_bytes + kGuardBytes) / sizeof(long long) + 1);
  unsigned char* smem = reinterpret_cast<unsigned char*>(storage.data());
  auto poison = [&] {
    std::memset(smem, kPoison, smem_bytes);
    std::memset(smem + smem_bytes, kGuard, kGuardBytes);
  };
  bool overflow = false;
  auto between_blocks = [&]() noexcept {
    for (std::size_t i = 0; i < kGuardBytes; ++i) overflow |= smem[smem_bytes + i] != kGuard;
    poison();
  };
  poison();
  blockDim = block;
  gridDim = grid;
  dynamic_smem = smem;
  std::barrier<> sync(block.x);
  std::barrier<decltype(between_blocks)> block_end(block.x, between_blocks);
  sync_barrier = &sync;
  std::vector<std::thread> threads;
  threads.reserve(block.x);
  for (unsigned int t = 0; t < block.x; ++t)
    threads.emplace_back([&, t] {
      threadIdx = uint3{t, 0, 0};
      for (unsigned int b = 0; b < grid.x; ++b) {
        blockIdx = uint3{b, 0, 0};
        body();
        block_end.arrive_and_wait();
      }
    });
  for (auto& th : threads) th.join();
  sync_barrier = nullptr;
  dynamic_smem = nullptr;
  return overflow ? kSmemOverflow : kOk;
}

}  // namespace ttemu

inline void __syncthreads() { ttemu::sync_barrier->arrive_and_wait(); }

template <class T>
inline T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}

#define TT_DYN_SMEM(T, name) T* name = reinterpret_cast<T*>(ttemu::dynamic_smem)

#endif  // TTREC_CUDA_EMULATION_H
