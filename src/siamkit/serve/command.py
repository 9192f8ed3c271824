"""`siamkit serve MODEL` and `siamkit serve-keys create`: the commands' bodies (cli.py only parses and dispatches).

The server is uvicorn running create_app's application in this process. SIGTERM (or Ctrl-C) makes uvicorn stop
accepting, finish the requests in flight, then run the application's shutdown: the batcher's last forward passes,
then the store is closed. A restart on the same --data-dir (or --db) serves the same galleries.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import socket
from pathlib import Path

from ..errors import SiamkitError, info

DEFAULT_DATA_DIR = "serve-data"


def check_host(host: str, keyed: bool) -> None:
    """Without API keys only a loopback address is served: anyone who can reach the port could enrol and delete."""
    if keyed:
        return
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SiamkitError(f"--host {host} would open the server beyond this machine without API keys; create a key "
                           f"with siamkit serve-keys create --file KEYS --scope write and pass --api-keys KEYS, or "
                           f"serve on 127.0.0.1")


def check_tls(certfile: str | None, keyfile: str | None) -> None:
    if bool(certfile) != bool(keyfile):
        raise SiamkitError("TLS needs both --ssl-certfile and --ssl-keyfile")
    for path in (certfile, keyfile):
        if path and not Path(path).is_file():
            raise SiamkitError(f"{path} does not exist; pass the PEM file of the certificate and of its key")


def check_port_free(host: str, port: int) -> None:
    """One line now, before the model loads, if the port is taken (uvicorn would say so in several)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise SiamkitError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --port, or stop what "
                               f"uses it") from None


def build_service(args: argparse.Namespace):
    """The Service of the command line's options: the model, the batcher, the store."""
    from ..api import load
    from .batching import Batcher
    from .service import Service
    from .store import open_store

    verifier = load(args.model, align=args.align)
    embed = verifier.embed_pixels
    batcher = Batcher(embed, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    store = open_store(args.db or args.data_dir)
    return Service(verifier, args.model, store, batcher, max_pixels=args.max_pixels)


def serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise SiamkitError('siamkit serve needs FastAPI and uvicorn: pip install "siamkit[serve]"') from None
    from .app import create_app
    from .keys import KeyRing
    from .store import StoreUnavailable

    keys = KeyRing.read(args.api_keys) if args.api_keys else None
    check_host(args.host, keys is not None)
    check_tls(args.ssl_certfile, args.ssl_keyfile)
    check_port_free(args.host, args.port)
    try:
        service = build_service(args)
    except StoreUnavailable as e:
        raise SiamkitError(f"the gallery store {args.db or args.data_dir} is unreachable ({e}); start it, or check "
                           f"--db") from None
    app = create_app(service, keys=keys, cors=args.cors, max_upload_mb=args.max_upload_mb)
    scheme = "https" if args.ssl_certfile else "http"
    info(f"serving {args.model} on {scheme}://{args.host}:{args.port} (store: "
         f"{args.db or Path(args.data_dir).resolve()}; API keys: {'required' if keys else 'none, loopback only'})")
    config = uvicorn.Config(app, host=args.host, port=args.port, ssl_certfile=args.ssl_certfile,
                            ssl_keyfile=args.ssl_keyfile, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=30, server_header=False)
    uvicorn.Server(config).run()
    return 0


def serve_keys(args: argparse.Namespace) -> int:
    from .keys import create_key

    token = create_key(args.file, args.scope)
    print(token)
    info(f"a {args.scope} key was added to {os.path.abspath(args.file)} (only its hash is kept: this is the one "
         f"time the token is shown)")
    return 0
