"""Suite-wide settings.

One torch thread per test process: the suite runs on 2 cores, most tensors here are tiny, and
OpenMP threads spinning against each other (or against subprocesses a test starts) made some
tests 20x slower than with one thread.
"""

import torch

torch.set_num_threads(1)
