"""`analysis-operator`: run the operator (kopf) with the project's settings."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from collections.abc import Callable

import kopf

from analysis_operator.infra.logs import configure_logging, tune_gc
from analysis_operator.settings import load_settings


class SharedMemo(kopf.Memo):
    """The operator's one memo: its services (the client, the reconciler, the checkers), set at
    startup; no handler keeps anything per object in it. kopf shallow-copies the memo for every
    object it sees (and for every admission request) and keeps the copy while the object lives, for
    each environment and each pod; this one is shared instead."""

    def __copy__(self) -> SharedMemo:
        return self


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="analysis-operator", description=__doc__)
    parser.add_argument("--namespace", help="watch only this namespace (default: all)")
    parser.add_argument(
        "--peering",
        action="store_true",
        help="run with kopf peering (one active replica, others standby) instead of standalone",
    )
    parser.add_argument("--log-format", choices=["auto", "json", "console"])
    arguments = parser.parse_args(argv)

    settings = load_settings()
    overrides = {
        key: value
        for key, value in {
            "namespace": arguments.namespace,
            "log_format": arguments.log_format,
            "standalone": False if arguments.peering else None,
        }.items()
        if value is not None
    }
    settings = dataclasses.replace(settings, **overrides)
    configure_logging(settings.log_format, settings.log_level)

    from analysis_operator import handlers  # noqa: F401  (registers the kopf handlers)
    from analysis_operator.infra import kopf_patches

    kopf_patches.apply()  # startup index gating in linear time (see the module)
    tune_gc()

    with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
        runner.run(
            kopf.operator(
                clusterwide=not settings.namespace,
                namespaces=[settings.namespace] if settings.namespace else [],
                standalone=settings.standalone,
                peering_name=None if settings.standalone else settings.peering_name,  # a name makes peering mandatory
                liveness_endpoint=settings.liveness_endpoint or None,
                memo=SharedMemo(config=settings),
            )
        )


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The operator's event loop: uvloop (libuv; its sockets and TLS in C), as kopf's own CLI runs when it is
    installed, about an eighth less of the operator's CPU in a burst (bench/RESULTS.md); or the standard
    library's (None). Anything else stops the start with the setting's name."""
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    if name == "asyncio":
        return None
    raise SystemExit(f"analysis-operator: ANALYSIS_OPERATOR_EVENT_LOOP is {name!r}; use uvloop or asyncio")


if __name__ == "__main__":
    main()
