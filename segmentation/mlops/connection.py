"""Whether the tracking server answers, and the error for tracking that did not all arrive.

Kept apart from :mod:`segmentation.mlops.runs` (which pulls in the tracker, the model store and so torch and ONNX)
so that the entry points that only talk to MLflow (the pipeline, preprocessing) start without them.
"""

from __future__ import annotations

import urllib.error
import urllib.request

import mlflow


class TrackingIncompleteError(RuntimeError):
    """Training finished but part of its tracking data is still only in the local journal."""


def check_tracking_server(uri: str | None = None, timeout: float = 5.0) -> str:
    """Fail fast when an HTTP tracking server does not answer; local stores (sqlite, file) always pass.

    Returns:
        The tracking URI that was checked.

    Raises:
        ConnectionError: the server at ``uri`` refused the connection or timed out.
    """
    uri = uri or mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return uri
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass  # the server answered (e.g. 401 behind basic-auth): it is reachable
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectionError(
            f"MLflow tracking server {uri} is not reachable ({getattr(exc, 'reason', exc)}). Start it "
            f"(`mlflow server --host 127.0.0.1 --port ...`) or point MLFLOW_TRACKING_URI at a running one; "
            f"nothing was trained."
        ) from None
    return uri
