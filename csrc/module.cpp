// Makes the library importable as the Python module mtp_ext._C, which registers the ops. The
// only file that knows of Python; C++ users link the library without it (CMakeLists.txt).
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
