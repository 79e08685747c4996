"""One function per MLflow step, wiring the library to :mod:`segmentation.mlops`; ``entrypoints/`` only parse
arguments and call one of these."""
