// C ABI over the CPU-emulated kernels, for tests/test_cuda_emulated.py (ctypes).
//
// Built with impl/cuda/emulation.h force-included and linked with the .cu files compiled the same
// way. ttemu_launch takes its arguments like cuLaunchKernel: an array of pointers to the argument
// values, in the order of the kernel's prototype in impl/cuda/tt_kernels.cuh.
#include <cstring>
#include <type_traits>
#include <utility>

#include "tt_kernels.cuh"

namespace {

template <class... P, std::size_t... I>
void call_packed(void (*kernel)(P...), void** args, std::index_sequence<I...>) {
  kernel(*static_cast<std::remove_cv_t<P>*>(args[I])...);
}

template <class... P>
int launch_packed(void (*kernel)(P...), unsigned grid, unsigned block, long long smem, void** args) {
  if (smem < 0) return ttemu::kSmemTooLarge;
  return ttemu::run_grid(dim3(grid), dim3(block), (std::size_t)smem,
                         [&] { call_packed(kernel, args, std::index_sequence_for<P...>{}); });
}

template <class... P>
constexpr int arg_count(void (*)(P...)) {
  return (int)sizeof...(P);
}

struct Entry {
  const char* name;
  int (*launch)(unsigned, unsigned, long long, void**);
  int nargs;
};

#define TTEMU_ENTRY(k) \
  {#k, [](unsigned g, unsigned b, long long s, void** a) { return launch_packed(k, g, b, s, a); }, arg_count(k)},
const Entry kKernels[] = {TT_KERNEL_LIST(TTEMU_ENTRY)};
#undef TTEMU_ENTRY

const Entry* find(const char* name) {
  for (const Entry& e : kKernels)
    if (std::strcmp(e.name, name) == 0) return &e;
  return nullptr;
}

}  // namespace

extern "C" {

// Number of arguments of kernel `name`, -1 if unknown.
int ttemu_num_args(const char* name) {
  const Entry* e = find(name);
  return e ? e->nargs : -1;
}

// Runs kernel `name` over the grid. Returns 0, a ttemu::Status, or -1 (unknown kernel) / -2 (wrong
// argument count).
int ttemu_launch(const char* name, unsigned grid, unsigned block, long long smem, int nargs, void** args) {
  const Entry* e = find(name);
  if (!e) return -1;
  if (nargs != e->nargs) return -2;
  return e->launch(grid, block, smem, args);
}

}  // extern "C"
