"""Cases, the ``check`` report and benchmarks.

This is the one place in the package that refers to torch.nn.functional's losses: as the
reference the ``check`` command and the benchmarks compare against. No funcloss loss imports
from here.
"""
