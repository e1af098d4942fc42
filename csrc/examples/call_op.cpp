// Calls agem_fast::project_ from C++ through the PyTorch dispatcher.
// g = [1, 2, 3], r = [-1, -1, -1]: dot = -6, rr = 3, coef = -2, g <- g + 2 r = [-1, 0, 1].
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <tuple>

int main() {
  using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("agem_fast::project_", "")
                .typed<Result(at::TensorList, at::TensorList, at::TensorList, double)>();
  at::Tensor g = at::arange(1, 4, at::kFloat);
  at::Tensor r = at::full({3}, -1.0f);
  auto [dot, rr, coef, projected] = op.call({g}, {r}, {}, 0.0);
  std::printf("dot=%g rr=%g coef=%g projected=%d g=[%g, %g, %g]\n", dot.item<double>(),
              rr.item<double>(), coef.item<double>(), int(projected.item<bool>()),
              g[0].item<float>(), g[1].item<float>(), g[2].item<float>());
  return 0;
}
