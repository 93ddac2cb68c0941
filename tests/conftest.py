"""Fixtures of the CPU test suite. The tiny models and configs live in `bfs_core.tiny`: import them from there."""

import os
import socket

import pytest
import torch

from bfs_core.tiny import make_tiny_flux


os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def tiny_flux():
    return make_tiny_flux()


@pytest.fixture
def no_network(monkeypatch):
    """Offline tests: hub libraries told they are offline, and any socket connection refused."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise RuntimeError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def single_thread():
    """Tiny nets gain nothing from threads, and on a busy 2-core runner OpenMP spin-waits made them ~40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
