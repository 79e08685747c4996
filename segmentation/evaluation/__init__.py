"""Evaluation: confusion-matrix metrics, scoring a whole split, and the pictures (panels, overlays, charts)."""
