"""One model over several machines, through llama.cpp's RPC backend.

`--rpc HOST:PORT,...` puts the model's layers (as many as -ngl says, as llama.cpp does) on
workers, each `gemma-chat --rpc-worker`, and keeps the rest, the sampling and the chat here.
The backend is a loadable module built from the same llama.cpp source as pip's llama-cpp-python
(gemmachat/llama_source.py); loaded here it binds to the libggml-base that is already in the
process, so its devices join the registry that llama.cpp picks devices from when a model loads.

The worker is llama.cpp's own RPC server (what its `rpc-server` program runs), started in this
process on our CPU backend: a worker machine needs gemma-chat and nothing else.

It has no authentication and trusts its client entirely: whoever reaches the port can allocate
the worker's memory and run computations on it, and the protocol is not built to withstand a
hostile client. Workers belong on 127.0.0.1 or a private network (docs/security.md).
"""

from __future__ import annotations

import ctypes
import ipaddress
import signal
import socket
import sys
from pathlib import Path

from gemmachat import backends, llama_log
from gemmachat.errors import UserError, warn

CONNECT_SECONDS = 5.0
_CPU = 0  # GGML_BACKEND_DEVICE_TYPE_CPU

_lib = backends._registry  # libllama's view of ggml (gemmachat/backends.py says why)
_lib.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
_lib.ggml_backend_reg_by_name.restype = ctypes.c_void_p
_lib.ggml_backend_load.argtypes = [ctypes.c_char_p]
_lib.ggml_backend_load.restype = ctypes.c_void_p
_lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
_lib.ggml_backend_register.argtypes = [ctypes.c_void_p]
_lib.ggml_backend_register.restype = None
_lib.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
_lib.ggml_backend_dev_by_type.restype = ctypes.c_void_p

_ADD_SERVER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)
_START_SERVER = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                                 ctypes.POINTER(ctypes.c_void_p))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _registry() -> int:
    """llama.cpp's RPC backend, loaded once: from a build that ships it beside its other modules,
    else from our own build of it (made now, in the open, if it is not yet)."""
    from gemmachat.engine import init_backends

    init_backends()  # a modular build loads an RPC module it carries here
    found = _lib.ggml_backend_reg_by_name(b"RPC")
    if found:
        return found
    path = _module()
    reg = _lib.ggml_backend_load(str(path).encode())
    if not reg:
        raise UserError(f"llama.cpp could not load its RPC backend from {path}: delete {path.parent.parent} "
                        "and run again to rebuild it (--verbose shows llama.cpp's reason)")
    return reg


def _module() -> Path:
    from gemmachat import llama_source

    if getattr(sys, "frozen", False):
        raise UserError("this single-file build of gemma-chat has no RPC backend: use the pip install "
                        "(README) for --rpc and --rpc-worker")
    version = llama_source.installed_version()
    if not llama_source.rpc_module_built(version):
        warn("building llama.cpp's RPC backend from the vendored source (about a minute, once; cached after)")
        try:
            return llama_source.build_rpc_module(version)
        except llama_source.BuildError as error:
            first = str(error).splitlines()[0]
            raise UserError(f"could not build llama.cpp's RPC backend: {first}") from None
    return llama_source.rpc_module_path(version)


def _proc(reg: int, name: str) -> int:
    address = _lib.ggml_backend_reg_get_proc_address(reg, name.encode())
    if not address:
        raise UserError(f"this llama.cpp's RPC backend has no {name}")
    return address


def connect(endpoints: tuple[str, ...]) -> None:
    """Make each worker a device that llama.cpp offloads layers to, before the model loads."""
    for endpoint in endpoints:
        host, _, port = endpoint.rpartition(":")
        try:
            # llama.cpp aborts the process when it cannot connect: find out first, in words.
            socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_SECONDS).close()
        except OSError as error:
            reason = error.strerror or str(error) or type(error).__name__
            raise UserError(f"cannot reach the RPC worker at {endpoint} ({reason}): is `gemma-chat "
                            f"--rpc-worker --host {host} --port {port}` running there?") from None
    _explain_lost_worker(endpoints)
    reg = _registry()
    add_server = _ADD_SERVER(_proc(reg, "ggml_backend_rpc_add_server"))
    for endpoint in endpoints:
        _lib.ggml_backend_register(add_server(endpoint.encode()))


def _explain_lost_worker(endpoints: tuple[str, ...]) -> None:
    """A lost worker makes llama.cpp abort (gemmachat/llama_log.py turns aborts into one line):
    name the workers and what to check, rather than an internal check that failed."""
    workers = ",".join(endpoints)

    def explain(message: str) -> str | None:
        if "crashed or returned malformed response" in message:
            return (f"an RPC worker (--rpc {workers}) stopped answering: it was stopped or crashed, or the "
                    "network to it failed")
        if message.startswith(("Failed to connect", "RPC handshake failed")):
            return f"lost the RPC worker: {message} (is it a gemma-chat --rpc-worker of this version?)"
        return None

    llama_log.explain_aborts(explain)


def serve(host: str, port: int, threads: int, verbose: bool) -> int:
    """`--rpc-worker`: llama.cpp's RPC server on this CPU until the process is stopped."""
    llama_log.install(verbose)
    if not is_loopback(host):
        warn(f"WARNING: the RPC worker listens on {host}:{port} with NO AUTHENTICATION: whoever reaches "
             "that port can use this machine's memory and CPU, and the protocol is not hardened against "
             "hostile clients. Use it only on a private network you trust (docs/security.md)")
    reg = _registry()
    start_server = _START_SERVER(_proc(reg, "ggml_backend_rpc_start_server"))
    cpu = _lib.ggml_backend_dev_by_type(_CPU)
    if not cpu:
        raise UserError("llama.cpp has no CPU device to serve")
    # The server never returns to Python while it runs: SIGTERM must end it as it would rpc-server
    # (ctrl-c already does, fatal.exit_on_interrupt).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    endpoint = f"{host}:{port}"
    warn(f"RPC worker on {endpoint} ({threads} threads); clients use --rpc {endpoint}; ctrl-c stops it")
    start_server(endpoint.encode(), None, threads, 1, (ctypes.c_void_p * 1)(cpu))
    # It returns only when it could not start: llama.cpp has said why on stderr.
    raise UserError(f"the RPC worker could not listen on {endpoint} (is the port in use, or the address "
                    "not this machine's?)", status=1)
