// The megalite._C extension: dataset index builders (no torch dependency).
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_helpers(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "megalite C++ dataset index builders";
  register_helpers(m);
}
