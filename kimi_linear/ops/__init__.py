"""Pure functions and Triton kernels. Nothing here imports from the rest of kimi_linear but
`kimi_linear.errors`.

Each op folder holds `naive.py` (plain fp32 torch, the permanent test oracle) and its kernels.
Importing this package patches nothing and needs no triton.
"""
