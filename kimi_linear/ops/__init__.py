"""Pure functions and Triton kernels. Nothing here imports from the rest of kimi_linear but
`kimi_linear.errors`.

Each op folder holds `naive.py` (plain fp32 torch, the permanent test oracle), its kernels, and an
`__init__.py` whose public entries pick the kernel or the naive form for the tensors they get
(`dispatch.py`). Importing this package patches nothing and needs no triton.
"""
