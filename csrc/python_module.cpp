// Makes the library importable as the Python module ppo_ext._C; importing it runs the static
// TORCH_LIBRARY registrations. No Python API is bound here (the ops are reached through torch.ops).
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
