"""Which event loop the operator runs on (cli.py loop_factory, ANALYSIS_OPERATOR_EVENT_LOOP)."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from analysis_operator.cli import loop_factory
from analysis_operator.settings import load_settings


def test_the_operator_runs_on_uvloop_unless_told_otherwise():
    factory = loop_factory(load_settings({}).event_loop)
    assert factory is uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        assert isinstance(runner.get_loop(), uvloop.Loop)


def test_asyncio_runs_it_on_the_standard_library_s_loop():
    settings = load_settings({"ANALYSIS_OPERATOR_EVENT_LOOP": "asyncio"})
    assert loop_factory(settings.event_loop) is None
    with asyncio.Runner(loop_factory=None) as runner:
        assert not isinstance(runner.get_loop(), uvloop.Loop)


def test_an_unknown_loop_stops_the_start_and_names_the_setting():
    with pytest.raises(SystemExit, match="ANALYSIS_OPERATOR_EVENT_LOOP is 'trio'; use uvloop or asyncio"):
        loop_factory("trio")
