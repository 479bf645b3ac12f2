// Linked instead of cuda_ops.cpp when the extension is built without CUDA.
extern "C" bool semanticist_built_with_cuda() { return false; }
