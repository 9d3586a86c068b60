"""Known-benign native warnings are dropped where they arise; every other line survives."""

from __future__ import annotations

import os

import pytest

from flexiq_tvm._quiet import native_stderr


def test_native_stderr_drops_only_the_benign_lines_in_order(capfd, monkeypatch):
    monkeypatch.delenv("FLEXIQ_VERBOSE", raising=False)
    with native_stderr(b"benign one", b"benign two"):
        os.write(2, b"keep 1\nsome benign one here\nkeep 2\nbenign two\n")
    assert capfd.readouterr().err == "keep 1\nkeep 2\n"


def test_native_stderr_keeps_the_lines_when_the_block_raises(capfd, monkeypatch):
    monkeypatch.delenv("FLEXIQ_VERBOSE", raising=False)
    with pytest.raises(RuntimeError), native_stderr(b"benign"):
        os.write(2, b"benign\nwhy it failed\n")
        raise RuntimeError("boom")
    assert capfd.readouterr().err == "why it failed\n"


def test_verbose_shows_everything(capfd, monkeypatch):
    monkeypatch.setenv("FLEXIQ_VERBOSE", "1")
    with native_stderr(b"benign"):
        os.write(2, b"benign\n")
    assert capfd.readouterr().err == "benign\n"
