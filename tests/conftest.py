"""Shared test fixtures. Every test runs offline: an autouse guard makes any connection to a
non-loopback address (and any DNS lookup of a remote name) fail at once, and the Hugging Face hub
is put in offline mode, so a test that would silently download something fails fast instead."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

import pytest

# Before anything imports huggingface_hub (it reads these once); inherited by subprocesses too.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("NANOMOE_OFFLINE", "1")  # nanomoe.data never downloads a corpus in tests
# Test models are tiny: one thread per process is faster than two threads spin-waiting on each
# other (measured on the 2-core CI machine), and subprocesses (scripts, DDP ranks) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after the environment above)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO_ROOT = Path(__file__).resolve().parent.parent
# The public corpora and GPT-2's BPE files, standing in for a reader's downloads: $NANOMOE_DATA when
# set, else the offline copy beside the repository (where CI finds it).
SHARED_DATA = Path(os.environ.get("NANOMOE_DATA") or REPO_ROOT.parent / "shared" / "data")
if SHARED_DATA.is_dir():  # the package (and every subprocess a test starts) finds it the reader's way
    os.environ["NANOMOE_DATA"] = str(SHARED_DATA)


class NetworkBlocked(ConnectionError):
    """Raised by the test guard instead of opening a network connection."""


def _is_local(host) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode()
    host = str(host)
    if host in ("localhost", "") or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host == socket.gethostname()  # torch.distributed may resolve the machine's own name
    return ip.is_loopback or ip.is_unspecified


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Fail fast on any network access (tests must pass offline); loopback and unix sockets stay
    allowed (torch.distributed with gloo talks to localhost)."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def check(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
            raise NetworkBlocked(f"network access is blocked in tests (tried to connect to {address!r})")

    def connect(sock, address):
        check(sock, address)
        return real_connect(sock, address)

    def connect_ex(sock, address):
        check(sock, address)
        return real_connect_ex(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _is_local(host):
            raise NetworkBlocked(f"network access is blocked in tests (tried to resolve {host!r})")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The offline corpora + GPT-2 BPE files ($NANOMOE_DATA or ../shared/data); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"offline data folder {SHARED_DATA} not found (see shared/data/README.md)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def _tiktoken_cache_dir(shared_data, tmp_path_factory) -> Path:
    from nanomoe.tokenizer import fill_tiktoken_cache

    if not (shared_data / "gpt2" / "encoder.json").is_file():
        pytest.skip(f"{shared_data / 'gpt2'} has no GPT-2 BPE files")
    return fill_tiktoken_cache(shared_data / "gpt2", tmp_path_factory.mktemp("tiktoken_cache"))


@pytest.fixture
def tiktoken_cache(_tiktoken_cache_dir, monkeypatch) -> Path:
    """A tiktoken cache pre-filled with GPT-2's BPE (from shared/data/gpt2), set as
    TIKTOKEN_CACHE_DIR, so `get_tokenizer("gpt2")` works without network."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(_tiktoken_cache_dir))
    return _tiktoken_cache_dir
