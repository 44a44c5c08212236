"""Triton kernels of vllm_cast (installed as ``vllm_cast.kernels``), each with a torch
reference and automatic dispatch: Triton on CUDA tensors, torch on CPU tensors."""
