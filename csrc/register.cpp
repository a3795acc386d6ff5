// Registration of silmm_fast._C: the operators (torch.ops.silmm_fast.*) and a small pybind11 module.
//
// Operators go through the dispatcher, so they work with torch.compile and torch.library.opcheck; their fake
// (shape-only) kernels are registered in Python next to each op's wrapper (silmm_fast/ops/<op>.py).
#include <torch/extension.h>
#include <torch/library.h>

#include "diverse_select/diverse_select.h"

TORCH_LIBRARY(silmm_fast, m) {
  m.def(
      "diverse_select(Tensor similarity, Tensor? scale, Tensor? quality, int n, str method, float eps) -> Tensor");
  m.def("diverse_select_fps(Tensor features, Tensor? quality, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(silmm_fast, CPU, m) {
  m.impl("diverse_select", &silmm_fast::DiverseSelectCpu);
  m.impl("diverse_select_fps", &silmm_fast::DiverseSelectFpsCpu);
}

#ifdef SILMM_WITH_CUDA
TORCH_LIBRARY_IMPL(silmm_fast, CUDA, m) {
  m.impl("diverse_select", &silmm_fast::DiverseSelectCuda);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "silmm_fast C++ extension; the operators are torch.ops.silmm_fast.*";
  m.def("has_cuda", [] {
#ifdef SILMM_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether this build has the CUDA kernels.");
  m.def("diverse_select", &silmm_fast::DiverseSelect, "Direct call of diverse_select, bypassing the dispatcher.",
        py::arg("similarity"), py::arg("scale"), py::arg("quality"), py::arg("n"), py::arg("method"),
        py::arg("eps"));
}
