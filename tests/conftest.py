"""Suite-wide settings: run with `python -m pytest -q -n 2 tests` (see README).

Each xdist worker uses one torch thread: with two workers on two cores, a second
thread per worker only adds waiting for thousands of tiny ops.
"""

import torch

torch.set_num_threads(1)
