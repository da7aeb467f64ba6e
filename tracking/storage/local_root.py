"""An artifact root on this machine's disk behind a tracking server on another: MLflow's classic pitfall.

A server started with ``--default-artifact-root /path`` and without ``--serve-artifacts`` hands its
clients that path, and each client writes the checkpoints to its OWN disk: no other machine, nor the
UI, finds them. Said once per artifact root, never refused: a shared file system mounted at the same
path on every machine (NFS) is a legitimate setup.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import urllib.parse

from tracking.rank import warn_on_rank_zero

# The artifact roots warned about in this process: each is said once, however many runs and checkpoints use it.
_warned: set[str] = set()

# A run's artifact URI is <root>/<run ID>/artifacts, a logged model's <root>/models/<model ID>/artifacts.
_UNDER_ROOT = re.compile(r"^(?P<root>.+?)/(?:models/)?[^/]+/artifacts/?$")


def warn_if_local_root(artifact_uri: str, tracking_uri: str | None, owner: str = "") -> None:
    """Warn (once per artifact root) when ``artifact_uri`` is a local path and ``tracking_uri`` a remote server."""
    if not (is_local_path(artifact_uri) and is_remote_server(tracking_uri or "")):
        return
    match = _UNDER_ROOT.match(artifact_uri)
    root = match.group("root") if match else artifact_uri
    if root in _warned:
        return
    _warned.add(root)
    whose = f"{owner}: " if owner else ""
    server = _shown(tracking_uri or "")
    warn_on_rank_zero(
        f"{whose}the artifact root {root} is a path on this machine's disk, but the tracking server "
        f"{server} runs on another host: checkpoints written here stay on this machine, where no other "
        "machine (nor the MLflow UI) finds them. Start the server with --serve-artifacts "
        "(--artifacts-destination s3://<bucket>/<prefix>), or give the experiment an s3:// artifact root. "
        "Ignore this if the path is a shared file system (NFS) mounted at the same place on every machine.",
        stacklevel=3,
    )


def _shown(tracking_uri: str) -> str:
    """A tracking URI without its user, password and query: credentials never reach a warning."""
    parsed = urllib.parse.urlparse(tracking_uri.strip())
    if not parsed.netloc:
        return tracking_uri
    return parsed._replace(netloc=parsed.netloc.rpartition("@")[2], query="", fragment="").geturl()


def is_local_path(uri: str) -> bool:
    """Whether an artifact URI is a path on the file system (``file:///...``, ``/...``, ``C:\\...``)."""
    scheme = urllib.parse.urlparse(uri).scheme
    return scheme in ("", "file") or len(scheme) == 1  # one letter: a Windows drive


def is_remote_server(tracking_uri: str) -> bool:
    """Whether a tracking URI is an HTTP(S) server on a host other than this machine."""
    parsed = urllib.parse.urlparse(tracking_uri.strip())
    if parsed.scheme.lower() not in ("http", "https"):
        return False
    host = (parsed.hostname or "").rstrip(".").lower()
    if not host or host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        this = socket.gethostname().lower()
        # "box" is this machine also as "box.corp.example": the hostname often lacks the domain.
        return host != this and not ("." not in this and host.startswith(f"{this}."))
    return not (address.is_loopback or address.is_unspecified)
