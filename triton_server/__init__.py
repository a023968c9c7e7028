"""Triton Inference Server: the model repository that ``attn-export triton`` writes, the launcher of a
real ``tritonserver`` on it, the Python-backend model those repositories load, and the benchmark of our
service against it. (The CUDA kernels, written in the Triton language, live with their ops in
:mod:`attn_export.plugins`.)
"""
