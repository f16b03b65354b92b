"""`helix bench`: decode (and prefill) timed on real GPUs against the tensor-parallel baseline and the floor.

``suite.py`` launches one process per GPU and gathers rank 0's rows (``cli/bench.py`` reads the flags);
``measure.py`` is what each rank runs; ``report.py`` writes the JSON (schema "helix-bench/1", what
``helix plan --calibrate`` reads) and the plots.
"""
