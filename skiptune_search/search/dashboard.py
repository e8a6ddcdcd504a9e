"""optuna-dashboard on a study storage, with each trial's sample grid (its artifacts)."""

from __future__ import annotations

import errno
import socket

from optuna.artifacts import FileSystemArtifactStore

from ..core.errors import SkiptuneError
from .storage import artifact_dir, make_storage, shown_url


def serve(storage_url: str, host: str, port: int, announce=print) -> None:
    """Serve until interrupted; a port in use or an address this machine lacks is a one-line error."""
    from optuna_dashboard import run_server

    check_address(host, port)
    storage = make_storage(storage_url, create=False)
    folder = artifact_dir(storage_url)
    folder.mkdir(parents=True, exist_ok=True)
    announce(f"optuna-dashboard on {shown_url(storage_url)} (artifacts in {folder}): http://{host}:{port}/  "
             f"(Ctrl-C stops)")
    try:
        run_server(storage, host=host, port=port, artifact_store=FileSystemArtifactStore(str(folder)))
    except OSError as exc:
        _refuse(exc, host, port)


def check_address(host: str, port: int) -> None:
    """Refuse, before anything is served or written, an empty host (every address of the machine)
    and an address this machine cannot serve on (not its own, or the port in use)."""
    if not host.strip():  # bind('') means every address: the network, not this machine
        raise SkiptuneError("an empty host would serve on every address of this machine; give 127.0.0.1 (this "
                            "machine only), or an address to serve on the network such as 0.0.0.0, explicitly",
                            option="host")
    try:  # found out before the server announces itself (it would bind the same address next)
        with socket.socket() as probe:
            probe.bind((host, port))
    except OSError as exc:
        _refuse(exc, host, port)


def serve_in_background(storage_url: str, host: str, port: int) -> str:
    """optuna-dashboard on the storage, with the trials' artifacts, served by a daemon thread of
    this process (it ends with it; requests are not logged); the address is checked first
    (``check_address``). Returns its URL."""
    import threading
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from optuna_dashboard import wsgi

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args) -> None:  # the command's own lines only
            pass

    check_address(host, port)
    folder = artifact_dir(storage_url)
    folder.mkdir(parents=True, exist_ok=True)
    app = wsgi(make_storage(storage_url, heartbeat=None, create=False), artifact_store=FileSystemArtifactStore(str(folder)))
    try:
        server = make_server(host, port, app, handler_class=Quiet)
    except OSError as exc:
        _refuse(exc, host, port)
    threading.Thread(target=server.serve_forever, name="optuna-dashboard", daemon=True).start()
    return f"http://{host}:{port}/"


def _refuse(exc: OSError, host: str, port: int) -> None:
    """A host that is no IPv4 address of this machine (optuna-dashboard's server is IPv4 only)
    names the host; a port in use or not allowed names the port."""
    if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
        raise SkiptuneError(f"cannot serve on {host!r} ({exc.strerror}): give an IPv4 address or host name of this "
                            f"machine, e.g. 127.0.0.1 (the dashboard serves IPv4 only)", option="host") from None
    if exc.errno in (errno.EADDRINUSE, errno.EACCES):
        raise SkiptuneError(f"cannot serve on {host}:{port} ({exc.strerror}); pick another port",
                            option="port") from None
    raise exc
