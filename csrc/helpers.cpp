// Dataset index builders. Filled in by the data-pipeline work; for now a build check.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_helpers(py::module_& m) {
  m.def("build_info", []() { return std::string("megalite C++17 index builder"); },
        "Return a short string proving the extension was built.");
}
