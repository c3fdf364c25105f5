"""Pure functions and Triton kernels. Nothing here imports from the rest of kimi_linear.

Each op folder holds `naive.py` (plain fp32 torch, the permanent test oracle) and its kernels.
"""

from kimi_linear.ops.triton_utils import patch_triton_interpreter

patch_triton_interpreter()
