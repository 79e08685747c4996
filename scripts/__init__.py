"""Developer scripts run as modules, e.g. ``python -m scripts.screenshots``."""
