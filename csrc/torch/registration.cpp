// Operator schemas of the `semanticist` namespace and the Python module entry point of semanticist_fast._C.
//
// Importing the module runs the static registrations below (and those of cpu_ops.cpp / cuda_ops.cpp).
// Fake (meta) kernels and autograd formulas are registered in Python by semanticist_fast/kernels/extension.py.
#include <Python.h>

#include <torch/library.h>

TORCH_LIBRARY(semanticist, m) {
  m.set_python_module("semanticist_fast.kernels.extension");
  m.def("nested_dropout(Tensor tokens, Tensor null, Tensor keep) -> Tensor");
  // Returns (grad_tokens in grad's dtype, grad_null as float32 (K, D)).
  m.def("nested_dropout_backward(Tensor grad, Tensor keep) -> (Tensor, Tensor)");
  m.def("standardize(Tensor x, float eps) -> Tensor");
  m.def("standardize_backward(Tensor grad, Tensor x, float eps) -> Tensor");
}

extern "C" bool semanticist_built_with_cuda();

namespace {

PyObject* built_with_cuda(PyObject*, PyObject*) { return PyBool_FromLong(semanticist_built_with_cuda()); }

PyMethodDef methods[] = {
    {"built_with_cuda", built_with_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "Custom operators of semanticist_fast (torch.ops.semanticist).",
                          -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
