"""Unit tests start no process and open no socket: this guard fails any test that tries."""

from __future__ import annotations

import socket
import subprocess

import pytest
import zmq


def _refuse(what: str):
    def refuse(*_a, **_k):
        raise AssertionError(f"tests/unit may not {what}: put the test in tests/cluster")
    return refuse


@pytest.fixture(autouse=True)
def _no_processes_or_sockets(monkeypatch):
    monkeypatch.setattr(zmq.Context, "socket", _refuse("open a ZeroMQ socket"))
    monkeypatch.setattr(socket.socket, "bind", _refuse("bind a socket"))
    monkeypatch.setattr(socket.socket, "connect", _refuse("connect a socket"))
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("start a process"))
