// Training-mode batch normalisation for XLA:CPU, fused with the ReLU and residual add that follow
// it in a ResNet, exposed as XLA FFI handlers.
//
// XLA:CPU runs the element-wise passes of a batch norm (statistics, normalisation, ReLU and their
// gradients) one fusion at a time, each on one thread. These handlers make two passes over the
// activations per direction (per-channel sums, then the element-wise result) and split each
// pass into row chunks run by the calling thread and helpers on XLA's own thread pool, so every
// core works and none is oversubscribed.
//
// Activations are float32 with the channels last: [rows, channels] after flattening. The
// forward pass returns the output and the batch mean and (biased) variance; the backward pass
// takes the forward output for the ReLU mask and returns the input, scale and bias gradients
// (and, with a residual, the residual's gradient).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The chunks of one pass, claimed one at a time by the calling thread and by helper tasks on
// XLA's thread pool. The caller works too and then waits only for chunks other threads are
// running, so a busy pool delays nothing and cannot deadlock.
class ChunkQueue {
 public:
  ChunkQueue(int64_t count, std::function<void(int64_t)> run)
      : count_(count), run_(std::move(run)) {}

  // Runs unclaimed chunks until none are left; a chunk's exception is kept for Wait.
  void Work() {
    for (int64_t i; (i = next_.fetch_add(1)) < count_;) {
      try {
        run_(i);
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (error_.empty()) error_ = e.what();
      }
      if (done_.fetch_add(1) + 1 == count_) {
        std::lock_guard<std::mutex> lock(mutex_);
        all_done_.notify_all();
      }
    }
  }

  // Waits for every chunk, then throws the first chunk's error, if any.
  void Wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    all_done_.wait(lock, [this] { return done_.load() == count_; });
    if (!error_.empty()) throw std::runtime_error(error_);
  }

 private:
  const int64_t count_;
  const std::function<void(int64_t)> run_;
  std::atomic<int64_t> next_{0}, done_{0};
  std::mutex mutex_;
  std::condition_variable all_done_;
  std::string error_;
};

// How many row chunks a pass over `rows` is split into: one per thread of XLA's pool, at least one.
int64_t ChunkCount(ffi::ThreadPool& pool, int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), rows));
}

// Splits `rows` into ChunkCount chunks and runs run(chunk, first_row, end_row) for each, in
// parallel on this thread and XLA's pool.
void ForRowChunks(ffi::ThreadPool& pool, int64_t rows,
                  const std::function<void(int64_t, int64_t, int64_t)>& run) {
  const int64_t count = ChunkCount(pool, rows);
  const int64_t per_chunk = (rows + count - 1) / count;
  auto queue = std::make_shared<ChunkQueue>(count, [&run, rows, per_chunk](int64_t i) {
    run(i, i * per_chunk, std::min(rows, (i + 1) * per_chunk));
  });
  for (int64_t helper = 1; helper < count; ++helper) pool.Schedule([queue] { queue->Work(); });
  queue->Work();
  queue->Wait();
}

// On x86-64 the element-wise loops are compiled for AVX-512, AVX2 and baseline SSE, and the best
// the CPU has is picked when the library loads.
#if defined(__x86_64__)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

// 16 floats as one value: AVX-512 register, two AVX2 or four SSE ones, whichever the clone runs.
typedef float Floats __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;
// Rows summed in float before the sums are added to double ones.
constexpr int64_t kRowsPerFloatSum = 64;

// Unaligned loads and stores, inlined into each clone so that vectors never cross a call
// between instruction sets.
#define LOAD(p)                                \
  ({                                           \
    Floats loaded_;                            \
    __builtin_memcpy(&loaded_, (p), sizeof(Floats)); \
    loaded_;                                   \
  })
#define STORE(p, v)                            \
  do {                                         \
    const Floats stored_ = (v);                \
    __builtin_memcpy((p), &stored_, sizeof(Floats)); \
  } while (0)

// For c < channels: sums[c] += sum of g, products[c] += sum of g * b over rows [begin, end),
// where g = a, or a masked by y > 0 when y is given (written to `masked` when that is given).
VECTOR_CLONES void ChannelSums(
    const float* __restrict__ a, const float* __restrict__ y, const float* __restrict__ b,
    int64_t begin, int64_t end, int64_t channels, double* __restrict__ sums,
    double* __restrict__ products, float* __restrict__ masked) {
  if (channels % kLanes != 0) {
    for (int64_t i = begin * channels; i < end * channels; ++i) {
      const float g = y != nullptr && !(y[i] > 0.0f) ? 0.0f : a[i];
      if (masked != nullptr) masked[i] = g;
      sums[i % channels] += g;
      products[i % channels] += static_cast<double>(g) * b[i];
    }
    return;
  }
  const int64_t blocks = channels / kLanes;
  std::vector<float> partial(2 * channels);  // float sums of g, then of g * b
  const Floats zero = {};
  for (int64_t first = begin; first < end; first += kRowsPerFloatSum) {
    std::fill(partial.begin(), partial.end(), 0.0f);
    const int64_t last = std::min(end, first + kRowsPerFloatSum);
    for (int64_t row = first; row < last; ++row) {
      for (int64_t block = 0; block < blocks; ++block) {
        const int64_t i = row * channels + block * kLanes;
        Floats g = LOAD(a + i);
        if (y != nullptr) g = LOAD(y + i) > zero ? g : zero;
        if (masked != nullptr) STORE(masked + i, g);
        float* sum = partial.data() + block * kLanes;
        float* product = sum + channels;
        STORE(sum, LOAD(sum) + g);
        STORE(product, LOAD(product) + g * LOAD(b + i));
      }
    }
    for (int64_t c = 0; c < channels; ++c) {
      sums[c] += partial[c];
      products[c] += partial[channels + c];
    }
  }
}

// out = (x - mean[c]) * scale[c] + shift[c] (+ residual), then ReLU if `relu`.
VECTOR_CLONES void Normalize(
    const float* __restrict__ x, const float* __restrict__ residual,
    const float* __restrict__ mean, const float* __restrict__ scale,
    const float* __restrict__ shift, bool relu, int64_t begin, int64_t end, int64_t channels,
    float* __restrict__ out) {
  if (channels % kLanes != 0) {
    for (int64_t i = begin * channels; i < end * channels; ++i) {
      const int64_t c = i % channels;
      float v = (x[i] - mean[c]) * scale[c] + shift[c];
      if (residual != nullptr) v += residual[i];
      out[i] = relu ? std::max(v, 0.0f) : v;
    }
    return;
  }
  const Floats zero = {};
  for (int64_t row = begin; row < end; ++row) {
    for (int64_t c = 0; c < channels; c += kLanes) {
      const int64_t i = row * channels + c;
      Floats v = (LOAD(x + i) - LOAD(mean + c)) * LOAD(scale + c) + LOAD(shift + c);
      if (residual != nullptr) v += LOAD(residual + i);
      if (relu) v = v > zero ? v : zero;
      STORE(out + i, v);
    }
  }
}

// dx = g * scale[c] + (x - mean[c]) * slope[c] + shift[c], with g = dy masked by y > 0 if
// `mask`.
VECTOR_CLONES void InputGradient(
    const float* __restrict__ dy, const float* __restrict__ y, const float* __restrict__ x,
    const float* __restrict__ mean, const float* __restrict__ scale,
    const float* __restrict__ slope, const float* __restrict__ shift, bool mask, int64_t begin,
    int64_t end, int64_t channels, float* __restrict__ dx) {
  if (channels % kLanes != 0) {
    for (int64_t i = begin * channels; i < end * channels; ++i) {
      const int64_t c = i % channels;
      const float g = mask && !(y[i] > 0.0f) ? 0.0f : dy[i];
      dx[i] = g * scale[c] + (x[i] - mean[c]) * slope[c] + shift[c];
    }
    return;
  }
  const Floats zero = {};
  for (int64_t row = begin; row < end; ++row) {
    for (int64_t c = 0; c < channels; c += kLanes) {
      const int64_t i = row * channels + c;
      Floats g = LOAD(dy + i);
      if (mask) g = LOAD(y + i) > zero ? g : zero;
      STORE(dx + i, g * LOAD(scale + c) + (LOAD(x + i) - LOAD(mean + c)) * LOAD(slope + c) +
                        LOAD(shift + c));
    }
  }
}

// Per-channel sums over all rows, computed in parallel chunks and added up in chunk order.
template <typename Sum>
void ReduceRows(ffi::ThreadPool& pool, int64_t rows, int64_t channels, Sum sum,
                std::vector<double>& sums, std::vector<double>& products) {
  const int64_t chunks = ChunkCount(pool, rows);
  std::vector<double> partial(2 * chunks * channels, 0.0);
  ForRowChunks(pool, rows, [&](int64_t i, int64_t begin, int64_t end) {
    double* chunk = partial.data() + 2 * i * channels;
    sum(begin, end, chunk, chunk + channels);
  });
  sums.assign(channels, 0.0);
  products.assign(channels, 0.0);
  for (int64_t i = 0; i < chunks; ++i) {
    for (int64_t c = 0; c < channels; ++c) {
      sums[c] += partial[2 * i * channels + c];
      products[c] += partial[(2 * i + 1) * channels + c];
    }
  }
}

struct Layout {
  int64_t rows, channels;
};

Layout RowsAndChannels(const ffi::Buffer<ffi::F32>& x) {
  const auto dims = x.dimensions();
  if (dims.size() == 0) throw std::invalid_argument("batch norm input must have a channel axis");
  const int64_t channels = dims.back();
  return {channels == 0 ? 0 : static_cast<int64_t>(x.element_count()) / channels, channels};
}

enum class Fusion { kNone, kRelu, kAddRelu };

// y = BN(x) [+ residual] [then ReLU]; mean and var are the batch statistics.
template <Fusion fusion>
ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> residual,
                   ffi::Buffer<ffi::F32, 1> scale, ffi::Buffer<ffi::F32, 1> bias,
                   ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32, 1> mean,
                   ffi::ResultBuffer<ffi::F32, 1> var, float epsilon) {
  const auto [rows, channels] = RowsAndChannels(x);
  const float* input = x.typed_data();
  std::vector<double> sums, squares;
  ReduceRows(
      pool, rows, channels,
      [&](int64_t begin, int64_t end, double* s, double* p) {
        ChannelSums(input, nullptr, input, begin, end, channels, s, p, nullptr);
      },
      sums, squares);
  std::vector<float> a(channels);
  for (int64_t c = 0; c < channels; ++c) {
    const double m = sums[c] / rows;
    const double v = std::max(0.0, squares[c] / rows - m * m);
    mean->typed_data()[c] = static_cast<float>(m);
    var->typed_data()[c] = static_cast<float>(v);
    a[c] = scale.typed_data()[c] / std::sqrt(static_cast<float>(v) + epsilon);
  }
  const float* add = fusion == Fusion::kAddRelu ? residual.typed_data() : nullptr;
  ForRowChunks(pool, rows, [&](int64_t, int64_t begin, int64_t end) {
    Normalize(input, add, mean->typed_data(), a.data(), bias.typed_data(),
              fusion != Fusion::kNone, begin, end, channels, y->typed_data());
  });
  return ffi::Error::Success();
}

// Gradients of Forward<fusion> given dy, the forward's x, y, batch statistics and scale.
// d_residual is the residual's gradient (written for kAddRelu only).
template <Fusion fusion>
ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> x,
                    ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32, 1> mean,
                    ffi::Buffer<ffi::F32, 1> var, ffi::Buffer<ffi::F32, 1> scale,
                    ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32, 1> dscale,
                    ffi::ResultBuffer<ffi::F32, 1> dbias, ffi::ResultBuffer<ffi::F32> d_residual,
                    float epsilon) {
  const auto [rows, channels] = RowsAndChannels(x);
  const bool mask = fusion != Fusion::kNone;
  float* masked = fusion == Fusion::kAddRelu ? d_residual->typed_data() : nullptr;
  std::vector<double> g_sums, gx_sums;
  ReduceRows(
      pool, rows, channels,
      [&](int64_t begin, int64_t end, double* s, double* p) {
        ChannelSums(dy.typed_data(), mask ? y.typed_data() : nullptr, x.typed_data(), begin, end,
                    channels, s, p, masked);
      },
      g_sums, gx_sums);
  // With x_hat = (x - mean) * inverse_std and k = sum(g * x_hat) / rows:
  // dx = scale * inverse_std * (g - sum(g) / rows - x_hat * k), and sum(g * x_hat) is
  // inverse_std * (sum(g * x) - mean * sum(g)).
  std::vector<float> a(channels), slope(channels), shift(channels);
  for (int64_t c = 0; c < channels; ++c) {
    const double m = mean.typed_data()[c];
    const double inverse_std = 1.0 / std::sqrt(static_cast<double>(var.typed_data()[c]) + epsilon);
    const double g_xhat = inverse_std * (gx_sums[c] - m * g_sums[c]);
    dbias->typed_data()[c] = static_cast<float>(g_sums[c]);
    dscale->typed_data()[c] = static_cast<float>(g_xhat);
    const double scale_std = scale.typed_data()[c] * inverse_std;
    const double k = g_xhat / rows;
    a[c] = static_cast<float>(scale_std);
    slope[c] = static_cast<float>(-scale_std * inverse_std * k);
    shift[c] = static_cast<float>(-scale_std * g_sums[c] / rows);
  }
  ForRowChunks(pool, rows, [&](int64_t, int64_t begin, int64_t end) {
    InputGradient(dy.typed_data(), y.typed_data(), x.typed_data(), mean.typed_data(), a.data(),
                  slope.data(), shift.data(), mask, begin, end, channels, dx->typed_data());
  });
  return ffi::Error::Success();
}

template <Fusion fusion>
ffi::Error GuardedForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> residual, ffi::Buffer<ffi::F32, 1> scale,
                          ffi::Buffer<ffi::F32, 1> bias, ffi::ResultBuffer<ffi::F32> y,
                          ffi::ResultBuffer<ffi::F32, 1> mean, ffi::ResultBuffer<ffi::F32, 1> var,
                          float epsilon) {
  try {
    return Forward<fusion>(pool, x, residual, scale, bias, y, mean, var, epsilon);
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("batch norm failed: ") + e.what());
  }
}

template <Fusion fusion>
ffi::Error GuardedBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                           ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> y,
                           ffi::Buffer<ffi::F32, 1> mean, ffi::Buffer<ffi::F32, 1> var,
                           ffi::Buffer<ffi::F32, 1> scale, ffi::ResultBuffer<ffi::F32> dx,
                           ffi::ResultBuffer<ffi::F32, 1> dscale,
                           ffi::ResultBuffer<ffi::F32, 1> dbias,
                           ffi::ResultBuffer<ffi::F32> d_residual, float epsilon) {
  try {
    return Backward<fusion>(pool, dy, x, y, mean, var, scale, dx, dscale, dbias, d_residual,
                            epsilon);
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("batch norm gradient failed: ") + e.what());
  }
}

auto ForwardBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()     // x
      .Arg<ffi::Buffer<ffi::F32>>()     // residual (ignored unless fused)
      .Arg<ffi::Buffer<ffi::F32, 1>>()  // scale
      .Arg<ffi::Buffer<ffi::F32, 1>>()  // bias
      .Ret<ffi::Buffer<ffi::F32>>()     // y
      .Ret<ffi::Buffer<ffi::F32, 1>>()  // mean
      .Ret<ffi::Buffer<ffi::F32, 1>>()  // var
      .Attr<float>("epsilon");
}

auto BackwardBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()     // dy
      .Arg<ffi::Buffer<ffi::F32>>()     // x
      .Arg<ffi::Buffer<ffi::F32>>()     // y
      .Arg<ffi::Buffer<ffi::F32, 1>>()  // mean
      .Arg<ffi::Buffer<ffi::F32, 1>>()  // var
      .Arg<ffi::Buffer<ffi::F32, 1>>()  // scale
      .Ret<ffi::Buffer<ffi::F32>>()     // dx
      .Ret<ffi::Buffer<ffi::F32, 1>>()  // dscale
      .Ret<ffi::Buffer<ffi::F32, 1>>()  // dbias
      .Ret<ffi::Buffer<ffi::F32>>()     // d_residual (written for the fused residual only)
      .Attr<float>("epsilon");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchNormForward, GuardedForward<Fusion::kNone>, ForwardBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchNormReluForward, GuardedForward<Fusion::kRelu>,
                              ForwardBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchNormAddReluForward, GuardedForward<Fusion::kAddRelu>,
                              ForwardBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchNormBackward, GuardedBackward<Fusion::kNone>,
                              BackwardBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchNormReluBackward, GuardedBackward<Fusion::kRelu>,
                              BackwardBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchNormAddReluBackward, GuardedBackward<Fusion::kAddRelu>,
                              BackwardBinding());
