"""Triton kernels (the GPU path where no CUDA kernel is compiled). Importing this module imports triton: on a
CPU, set TRITON_INTERPRET=1 before the first import to run the kernels in Triton's interpreter."""
