"""What must hold before a grid runs or a report is read, checked once, fast: the tracking
store can be reached and written. A dead server otherwise costs minutes of MLflow's retries
and ends in a traceback; a store in a folder that is not there ends in one too."""

from __future__ import annotations

import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REACH_TIMEOUT_S = 5.0

# MLflow's own defaults (7 retries, backoff factor 2, 120 s a request) make one call to a
# server that died wait minutes; these bound it to a few seconds for a refused connection
# (retries after 1, 2 s) and 3 x 30 s for one that hangs. A user's own settings win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def bound_http_retries() -> None:
    """Set HTTP_DEFAULTS for this process and the ones it starts, where the user has not."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


class StoreDown(RuntimeError):
    """The tracking server stopped answering while a grid ran: the grid stops asking."""

    def __init__(self, uri: str, why: str):
        super().__init__(f"the tracking server {uri} stopped answering mid-grid ({why})")
        self.uri, self.why = uri, why


def server_down(uri: str, timeout_s: float = REACH_TIMEOUT_S) -> str | None:
    """Why the tracking server at `uri` does not answer now (None when it does, or when the
    store is no server): asked after a cell failed, to tell a dead server from a bad cell."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            return None
    except (urllib.error.URLError, OSError, ValueError) as e:
        return str(getattr(e, "reason", None) or e)


def store_problem(uri: str, timeout_s: float = REACH_TIMEOUT_S) -> str | None:
    """None when the tracking store at `uri` answers (a server's /health) or can be written
    (a local sqlite file or folder); else one line naming the URI, why, and what to do."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
                return None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            return (f"the tracking server {uri} could not be reached within {timeout_s:g} s "
                    f"({reason}); start it (mlflow server --host 0.0.0.0 --port 5000 ...) or "
                    f"unset MLFLOW_TRACKING_URI to use the local store (./mlflow.db)")
    path = _local_path(uri)
    if path is None:
        return None  # another database: its own client says what is wrong
    target = path if path.exists() else path.parent
    if not target.is_dir() and not path.exists():
        return (f"the tracking store {uri} cannot be written: its folder {path.parent} does "
                f"not exist; create it, or unset MLFLOW_TRACKING_URI to use the local store")
    try:  # written for real: permission bits do not say it for root or a read-only mount
        if path.exists() and path.is_file():
            path.open("ab").close()
        else:
            tempfile.TemporaryFile(dir=target).close()
    except OSError as e:
        return (f"the tracking store {uri} cannot be written: {e.strerror or e} ({target}); "
                f"use a store you can write, or unset MLFLOW_TRACKING_URI")
    return None


def _local_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI or the folder of a file store (file: URI or a
    plain path); None for anything else."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):].split("?", 1)[0]
        return Path(path) if path and path != ":memory:" else None
    if uri.startswith("file:"):
        return Path(urllib.parse.urlparse(uri).path)
    return Path(uri) if "://" not in uri else None
