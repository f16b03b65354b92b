import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/distributed.py, tests/models.py

# Without a GPU the Triton kernels run in Triton's interpreter. Set before anything imports triton (importing the
# helix ops does, through torch.library.triton_op), so every kernel is decorated in interpreter mode.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"



def pytest_sessionstart(session):
    """Print the versions this run tests, also under -q (CI runs the suite under more than one transformers)."""
    import torch
    import transformers

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"torch {torch.__version__}, transformers {transformers.__version__}")
