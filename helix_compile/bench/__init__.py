"""`helix bench`: decode (and prefill) timed on real GPUs against the tensor-parallel baseline and the floor.

``command.py`` parses the command line and launches one process per GPU; ``measure.py`` is what each rank runs;
``report.py`` writes the JSON (schema "helix-bench/1", what ``helix plan --calibrate`` reads) and the plots.
"""
