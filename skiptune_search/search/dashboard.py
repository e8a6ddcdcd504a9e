"""optuna-dashboard on a study storage, with each trial's sample grid (its artifacts)."""

from __future__ import annotations

import errno

from optuna.artifacts import FileSystemArtifactStore

from ..core.errors import SkiptuneError
from .storage import artifact_dir, make_storage


def serve(storage_url: str, host: str, port: int, announce=print) -> None:
    """Serve until interrupted; a port in use or an address this machine lacks is a one-line error."""
    from optuna_dashboard import run_server

    storage = make_storage(storage_url, create=False)
    folder = artifact_dir(storage_url)
    folder.mkdir(parents=True, exist_ok=True)
    announce(f"optuna-dashboard on {storage_url} (artifacts in {folder}): http://{host}:{port}/  (Ctrl-C stops)")
    try:
        run_server(storage, host=host, port=port, artifact_store=FileSystemArtifactStore(str(folder)))
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            raise SkiptuneError(f"cannot serve on {host}:{port} ({exc.strerror}); pick another port or host",
                                option="port") from None
        raise
