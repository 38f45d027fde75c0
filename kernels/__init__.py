"""WKV-7 operators: a pure-PyTorch reference (CPU, autograd) and CUDA kernels, one dispatch."""
