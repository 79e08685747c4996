"""Everything that imports MLflow: runs and the tracker with its journal, model logging and loading, the serving
pyfunc, the registry and promotion, lineage, evaluation logging and the multistep pipeline."""
