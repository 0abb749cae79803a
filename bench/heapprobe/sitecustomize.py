"""Loaded by the operator's Python when bench/heap.py puts this directory on PYTHONPATH (never in the image).

HEAPPROBE_OUT=<prefix>: every 2 s one line to <prefix>.<pid>: the RSS, jemalloc's own counters (allocated:
bytes in live allocations; active: pages holding at least one; resident; retained) when jemalloc is loaded,
and the cyclic collector's time so far and full collections. Optional knobs for the variants of heap.py:
HEAPPROBE_GC_THRESHOLDS=a,b,c (set 1 s after start, after the operator's own), HEAPPROBE_COLLECT_EVERY=s and
HEAPPROBE_COLLECT_FOR=s (a full collection every s seconds for the first ... seconds), and HEAPPROBE_KOPF_AS_IS=
a comma-separated list of views, managed-fields: kopf's Body and Patch keep their views (reference cycles),
kopf's watch keeps managedFields, as before stop 33 (kopf_patches.views_on_demand and
watch_without_managed_fields not applied), to compare with the code before in one run; HEAPPROBE_LIST_WHOLE=1:
the operator's own pod watch reads its first list whole before it reads any page into summaries, as before
stop 34 (every pod's parsed body at once)."""

import ctypes
import gc
import os
import pathlib
import sys
import threading
import time

_gc = {"seconds": 0.0, "began": 0.0, "full": 0}


def _observe(phase: str, info: dict) -> None:
    if phase == "start":
        _gc["began"] = time.perf_counter()
        return
    _gc["seconds"] += time.perf_counter() - _gc["began"]
    _gc["full"] += info.get("generation") == 2


def _jemalloc() -> dict[str, float]:
    try:
        mallctl = ctypes.CDLL(None).mallctl
    except AttributeError:  # not on jemalloc
        return {}
    epoch = ctypes.c_uint64(1)
    mallctl(b"epoch", None, None, ctypes.byref(epoch), ctypes.sizeof(epoch))
    values = {}
    for name in ("allocated", "active", "resident", "retained"):
        value, size = ctypes.c_size_t(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_size_t))
        if mallctl(f"stats.{name}".encode(), ctypes.byref(value), ctypes.byref(size), None, 0) == 0:
            values[name] = value.value / 2**20
    return values


def _record(path: str) -> None:
    with open(f"{path}.{os.getpid()}", "a", buffering=1) as out:
        while True:
            status = pathlib.Path("/proc/self/status").read_text().splitlines()
            rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
            fields = {"rss": rss / 1024, **_jemalloc(), "gc_seconds": _gc["seconds"], "full_collections": _gc["full"]}
            out.write(f"{time.time():.1f} " + " ".join(f"{key}={value:.2f}" for key, value in fields.items()) + "\n")
            time.sleep(2)


def _collect() -> None:
    time.sleep(1.0)
    if os.environ.get("HEAPPROBE_GC_THRESHOLDS"):
        gc.set_threshold(*map(int, os.environ["HEAPPROBE_GC_THRESHOLDS"].split(",")))
    every = float(os.environ.get("HEAPPROBE_COLLECT_EVERY") or 0)
    until = time.monotonic() + float(os.environ.get("HEAPPROBE_COLLECT_FOR") or 0)
    while every and time.monotonic() < until:
        time.sleep(every)
        gc.collect()


def _census(signum, frame) -> None:
    """SIGUSR2: the live objects by type (tracked by the collector), before and after a full collection."""
    import collections

    def count() -> collections.Counter:
        return collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())

    before = count()
    collected = gc.collect()
    after = count()
    with open(f"{os.environ['HEAPPROBE_OUT']}.census.{os.getpid()}.{int(time.time())}", "w") as out:
        out.write(f"collected {collected}; tracked before {sum(before.values())}, after {sum(after.values())}\n")
        for name, n in after.most_common(60):
            out.write(f"{n:9d} {before[name] - n:9d} {name}\n")


if os.environ.get("HEAPPROBE_OUT") and "analysis_operator" in sys.orig_argv:
    import signal

    signal.signal(signal.SIGUSR2, _census)
    _as_is = set(filter(None, os.environ.get("HEAPPROBE_KOPF_AS_IS", "").split(",")))
    if _as_is:
        from analysis_operator.infra import kopf_patches

        if "views" in _as_is:
            kopf_patches.views_on_demand = lambda: None
        if "managed-fields" in _as_is:
            kopf_patches.watch_without_managed_fields = lambda: None
    if os.environ.get("HEAPPROBE_LIST_WHOLE"):  # the pod watch's first list held whole, as before stop 34
        from analysis_operator.infra.kube import KubeClient

        def _whole(paged):
            async def labelled(self, kind, selector):
                pages = [page async for page in paged(self, kind, selector)]  # every page read, then handed on
                for page in pages:
                    yield page

            return labelled

        KubeClient.labelled = _whole(KubeClient.labelled)
    gc.callbacks.append(_observe)
    threading.Thread(target=_record, args=(os.environ["HEAPPROBE_OUT"],), daemon=True, name="heapprobe").start()
    threading.Thread(target=_collect, daemon=True, name="heapprobe-gc").start()
