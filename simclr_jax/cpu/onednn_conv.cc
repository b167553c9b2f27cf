// 2-D convolutions for XLA:CPU computed by oneDNN, exposed as XLA FFI handlers.
//
// Three handlers, one per direction of a ResNet convolution: the forward pass, the input gradient
// and the kernel gradient. Activations are NHWC and kernels HWIO, the layouts JAX's arrays
// already have, so no transposes are needed around the calls. The two operands of a call are
// both float32 or both bfloat16 (whose products oneDNN computes with the CPU's bfloat16
// instructions where it has them); the result is float32, summed in float32. oneDNN picks its own
// (blocked) kernel layout; kernels are reordered into it and kernel gradients out of it per call,
// which costs little next to the convolution itself. Primitives are built once per shape and
// cached. Scratch memory belongs to the calling thread and is kept between calls (fresh large
// allocations would page-fault on every call), so concurrent calls from XLA's threads are safe.

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

enum class Direction { kForward, kInputGradient, kKernelGradient };

// Everything that determines a convolution primitive.
struct ConvShape {
  Direction direction;
  int64_t batch, height, width, in_features;
  int64_t kernel_h, kernel_w, out_features, out_h, out_w;
  int64_t stride_h, stride_w, pad_top, pad_left, pad_bottom, pad_right;
  memory::data_type operands;  // of the two inputs of the call; its result is float32

  auto Tie() const {
    return std::tie(direction, batch, height, width, in_features, kernel_h, kernel_w,
                    out_features, out_h, out_w, stride_h, stride_w, pad_top, pad_left,
                    pad_bottom, pad_right, operands);
  }
  bool operator<(const ConvShape& other) const { return Tie() < other.Tie(); }

  // This call's tensors: the operands' type for its two inputs, float32 for its result.
  memory::desc CallInput() const {
    return Input(direction == Direction::kInputGradient ? memory::data_type::f32 : operands);
  }
  memory::desc CallKernel(memory::format_tag tag) const {
    return Kernel(tag,
                  direction == Direction::kKernelGradient ? memory::data_type::f32 : operands);
  }
  memory::desc CallOutput() const {
    return Output(direction == Direction::kForward ? memory::data_type::f32 : operands);
  }

  memory::desc Input(memory::data_type type) const {
    return {{batch, in_features, height, width}, type, memory::format_tag::nhwc};
  }
  memory::desc Output(memory::data_type type) const {
    return {{batch, out_features, out_h, out_w}, type, memory::format_tag::nhwc};
  }
  memory::desc Kernel(memory::format_tag tag, memory::data_type type) const {
    return {{out_features, in_features, kernel_h, kernel_w}, type, tag};
  }
};

struct Plan {
  dnnl::primitive primitive;
  memory::desc kernel;      // the primitive's kernel layout
  memory::desc scratchpad;  // its scratch memory
};

dnnl::engine& CpuEngine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// A growing 64-byte aligned buffer.
class Workspace {
 public:
  void* Get(size_t bytes) {
    if (bytes > size_) {
      size_ = (bytes + 63) / 64 * 64;
      data_.reset(static_cast<char*>(std::aligned_alloc(64, size_)));
      if (!data_) throw std::bad_alloc();
    }
    return data_.get();
  }

 private:
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  std::unique_ptr<char, Free> data_;
  size_t size_ = 0;
};

// This thread's scratch memory for oneDNN and for kernels in oneDNN's layout.
memory ThreadBuffer(int slot, const memory::desc& desc, const dnnl::engine& engine) {
  thread_local Workspace workspaces[2];
  return memory(desc, engine, workspaces[slot].Get(desc.get_size()));
}

Plan MakePlan(const ConvShape& s) {
  dnnl::engine& engine = CpuEngine();
  const memory::dims strides{s.stride_h, s.stride_w};
  const memory::dims pad_low{s.pad_top, s.pad_left}, pad_high{s.pad_bottom, s.pad_right};
  const memory::desc input = s.CallInput(), output = s.CallOutput();
  const memory::desc any_kernel = s.CallKernel(memory::format_tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const auto algorithm = dnnl::algorithm::convolution_direct;
  // The forward pass this direction belongs to (a gradient's plan is built with it as the hint):
  // the operands' type throughout, but a float32 result.
  const memory::data_type t = s.operands;
  const memory::desc forward_output =
      s.Output(s.direction == Direction::kForward ? memory::data_type::f32 : t);
  dnnl::convolution_forward::primitive_desc forward(
      engine, dnnl::prop_kind::forward_training, algorithm, s.Input(t),
      s.Kernel(memory::format_tag::any, t), forward_output, strides, pad_low, pad_high, attr);
  switch (s.direction) {
    case Direction::kForward:
      return {dnnl::convolution_forward(forward), forward.weights_desc(),
              forward.scratchpad_desc()};
    case Direction::kInputGradient: {
      dnnl::convolution_backward_data::primitive_desc pd(engine, algorithm, input, any_kernel,
                                                         output, strides, pad_low, pad_high,
                                                         forward, attr);
      return {dnnl::convolution_backward_data(pd), pd.weights_desc(), pd.scratchpad_desc()};
    }
    case Direction::kKernelGradient: {
      dnnl::convolution_backward_weights::primitive_desc pd(
          engine, algorithm, input, any_kernel, output, strides, pad_low, pad_high,
          forward, attr);
      return {dnnl::convolution_backward_weights(pd), pd.diff_weights_desc(),
              pd.scratchpad_desc()};
    }
  }
  throw std::logic_error("unknown convolution direction");
}

const Plan& CachedPlan(const ConvShape& shape) {
  static std::mutex mutex;
  static std::map<ConvShape, Plan> plans;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = plans.find(shape);
  if (it == plans.end()) it = plans.emplace(shape, MakePlan(shape)).first;
  return it->second;
}

// Runs one convolution. For kForward (a, b, out) = (x, kernel, y); for kInputGradient
// (dy, kernel, dx); for kKernelGradient (x, dy, dkernel).
void Run(Direction direction, void* a, void* b, void* out, const ConvShape& shape) {
  const Plan& plan = CachedPlan(shape);
  dnnl::engine& engine = CpuEngine();
  dnnl::stream stream(engine);
  const memory::desc hwio = shape.CallKernel(memory::format_tag::hwio);
  const bool reorder = plan.kernel != hwio;
  memory scratchpad = ThreadBuffer(0, plan.scratchpad, engine);
  const memory::desc input = shape.CallInput(), output = shape.CallOutput();
  if (direction == Direction::kKernelGradient) {
    memory x(input, engine, a), dy(output, engine, b), dkernel(hwio, engine, out);
    memory result = reorder ? ThreadBuffer(1, plan.kernel, engine) : dkernel;
    plan.primitive.execute(stream, {{DNNL_ARG_SRC, x},
                                    {DNNL_ARG_DIFF_DST, dy},
                                    {DNNL_ARG_DIFF_WEIGHTS, result},
                                    {DNNL_ARG_SCRATCHPAD, scratchpad}});
    if (reorder) dnnl::reorder(result, dkernel).execute(stream, result, dkernel);
  } else {
    memory user_kernel(hwio, engine, b);
    memory kernel = reorder ? ThreadBuffer(1, plan.kernel, engine) : user_kernel;
    if (reorder) dnnl::reorder(user_kernel, kernel).execute(stream, user_kernel, kernel);
    if (direction == Direction::kForward) {
      memory x(input, engine, a), y(output, engine, out);
      plan.primitive.execute(stream, {{DNNL_ARG_SRC, x},
                                      {DNNL_ARG_WEIGHTS, kernel},
                                      {DNNL_ARG_DST, y},
                                      {DNNL_ARG_SCRATCHPAD, scratchpad}});
    } else {
      memory dy(output, engine, a), dx(input, engine, out);
      plan.primitive.execute(stream, {{DNNL_ARG_DIFF_DST, dy},
                                      {DNNL_ARG_WEIGHTS, kernel},
                                      {DNNL_ARG_DIFF_SRC, dx},
                                      {DNNL_ARG_SCRATCHPAD, scratchpad}});
    }
  }
  stream.wait();
}

template <Direction direction>
ffi::Error Convolution(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::ResultBuffer<ffi::F32, 4> out,
                       ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding) {
  if (strides.size() != 2 || padding.size() != 4) {
    return ffi::Error::InvalidArgument("strides must have 2 entries and padding 4");
  }
  if (a.element_type() != b.element_type() || a.dimensions().size() != 4 ||
      b.dimensions().size() != 4 ||
      (a.element_type() != ffi::F32 && a.element_type() != ffi::BF16)) {
    return ffi::Error::InvalidArgument(
        "the operands must be 4-D and both float32 or both bfloat16");
  }
  const memory::data_type operands =
      a.element_type() == ffi::BF16 ? memory::data_type::bf16 : memory::data_type::f32;
  // Which buffer holds x, the kernel and y depends on the direction.
  const auto x = direction == Direction::kInputGradient ? out->dimensions() : a.dimensions();
  const auto kernel =
      direction == Direction::kKernelGradient ? out->dimensions() : b.dimensions();
  const auto y = direction == Direction::kForward
                     ? out->dimensions()
                     : (direction == Direction::kInputGradient ? a.dimensions() : b.dimensions());
  const ConvShape shape{direction,  x[0],       x[1],       x[2],       x[3],      kernel[0],
                        kernel[1],  kernel[3],  y[1],       y[2],       strides[0], strides[1],
                        padding[0], padding[1], padding[2], padding[3], operands};
  try {
    Run(direction, a.untyped_data(), b.untyped_data(), out->untyped_data(), shape);
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("oneDNN convolution failed: ") + e.what());
  }
  return ffi::Error::Success();
}

auto Binding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Ret<ffi::Buffer<ffi::F32, 4>>()
      .Attr<ffi::Span<const int64_t>>("strides")
      .Attr<ffi::Span<const int64_t>>("padding");
}

}  // namespace

// 1 when this CPU's oneDNN computes bfloat16 convolutions in all three directions, else 0. oneDNN
// has bfloat16 kernels only for CPUs with AVX-512 or newer instruction sets; elsewhere it cannot
// build the primitives at all.
extern "C" int OnednnBfloat16Convolutions() {
  try {
    for (Direction direction :
         {Direction::kForward, Direction::kInputGradient, Direction::kKernelGradient}) {
      MakePlan(ConvShape{direction, 2, 8, 8, 16, 3, 3, 16, 8, 8, 1, 1, 1, 1, 1, 1,
                         memory::data_type::bf16});
    }
  } catch (const std::exception&) {
    return 0;
  }
  return 1;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvForward, Convolution<Direction::kForward>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvInputGradient, Convolution<Direction::kInputGradient>,
                              Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvKernelGradient, Convolution<Direction::kKernelGradient>,
                              Binding());
