import os
import sys

# Run from a checkout without `pip install -e .`: make the repository root importable.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
