"""An artifact root on this machine's disk behind a tracking server on another: MLflow's classic pitfall.

A server started with ``--default-artifact-root /path`` and without ``--serve-artifacts`` hands its
clients that path, and each client writes the checkpoints to its OWN disk: no other machine, nor the
UI, finds them. Said once per artifact root, never refused: a shared file system mounted at the same
path on every machine (NFS) is a legitimate setup.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
import threading
import urllib.parse
from typing import Any

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
    """Whether a tracking URI is an HTTP(S) server on a host other than this machine.

    A host is this machine when it is ``localhost``, this machine's host name, or a name or address that
    resolves to one of this machine's own addresses (``http://10.0.0.5`` or ``http://box.corp.example``
    reached from the box itself). A name that does not resolve within :data:`RESOLVE_TIMEOUT_S` counts
    as another host: the warning is a hint, never worth a long wait.
    """
    parsed = urllib.parse.urlparse(tracking_uri.strip())
    if parsed.scheme.lower() not in ("http", "https"):
        return False
    host = (parsed.hostname or "").rstrip(".").lower()
    if not host or host == "localhost" or host.endswith(".localhost"):
        return False
    return not _is_this_machine(host)


# How long the check waits for a host name to resolve. The server's requests resolved the same name a
# moment before, so an answer is usually at hand (in the resolver's cache, or /etc/hosts).
RESOLVE_TIMEOUT_S = 1.0


@functools.lru_cache(maxsize=64)  # a process opens run after run on the same server: resolved once
def _is_this_machine(host: str) -> bool:
    this = socket.gethostname().lower()
    # "box" is this machine also as "box.corp.example": the hostname often lacks the domain.
    if host == this or ("." not in this and host.startswith(f"{this}.")):
        return True
    return any(_is_own_address(family, address) for family, address in _addresses(host))


def _addresses(host: str) -> list[tuple[socket.AddressFamily, Any]]:
    """The socket addresses ``host`` (a name or an IP address) resolves to, port 0; none when it does not resolve
    in time. An IP address is parsed, not looked up."""
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        pass
    else:
        return _resolve(host, socket.AI_NUMERICHOST)
    found: list[list[tuple[socket.AddressFamily, Any]]] = []
    # getaddrinfo takes no timeout: a resolver that does not answer would hold the save for its own (seconds
    # per server, times attempts). A daemon thread waits for it instead, and is left behind if it is late.
    lookup = threading.Thread(target=lambda: found.append(_resolve(host, 0)), name="resolve-tracking-host", daemon=True)
    lookup.start()
    lookup.join(RESOLVE_TIMEOUT_S)
    return found[0] if found else []


def _resolve(host: str, flags: int) -> list[tuple[socket.AddressFamily, Any]]:
    try:
        answers = socket.getaddrinfo(host, 0, type=socket.SOCK_DGRAM, flags=flags)
    except (OSError, UnicodeError):  # socket.gaierror is an OSError; a label too long for IDNA a UnicodeError
        return []
    return [(family, address) for family, _, _, _, address in answers]


def _is_own_address(family: socket.AddressFamily, address: Any) -> bool:
    """Whether ``address`` belongs to this machine: a loopback or unspecified address, or one it can bind to
    (only an address of its own interfaces binds; no packet leaves, no name is looked up)."""
    try:
        ip = ipaddress.ip_address(str(address[0]).partition("%")[0])
    except ValueError:
        return False
    if ip.is_loopback or ip.is_unspecified:
        return True
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind(address)
    except OSError:
        return False
    return True
