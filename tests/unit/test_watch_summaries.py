"""What the operator's pod watch keeps (infra/watch.py Summaries, handlers/indexes.py read_pod), and how a
watch's stream reads an error (infra/kube.py watch_event)."""

from __future__ import annotations

import pytest

from analysis_operator.backends.base import State
from analysis_operator.handlers.indexes import read_pod
from analysis_operator.infra.kube import Expired, KubeError, watch_event
from analysis_operator.infra.watch import Summaries
from analysis_operator.model.domain import LABEL_ENVIRONMENT, LABEL_ENVIRONMENT_UID


def pod(uid: str, environment: str, namespace: str = "ns", node: str = "", environment_uid: str = "") -> dict:
    labels = {LABEL_ENVIRONMENT: environment, LABEL_ENVIRONMENT_UID: environment_uid or f"uid-{environment}"}
    return {
        "metadata": {"name": f"aenv-{environment}", "namespace": namespace, "uid": uid, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "resources": {"requests": {"cpu": "1"}}}]},
    }


def test_a_pod_is_found_by_namespace_and_environment_and_its_changes_are_told():
    summaries = Summaries(read_pod)
    assert summaries.put(pod("p1", "a")) == {("ns", "a")}
    assert summaries.put(pod("p2", "b", namespace="other")) == {("other", "b")}
    assert sorted(summaries) == [("ns", "a"), ("other", "b")]
    (summary,) = summaries[("ns", "a")]
    assert summary.environment_uid == "uid-a" and summary.observation.state is not State.GONE
    assert summaries.remove("p1") == {("ns", "a")}
    assert ("ns", "a") not in summaries and summaries.get(("ns", "a"), ()) == ()
    assert summaries.remove("p1") == set()  # a second DELETED changes nothing


def test_a_relabelled_pod_moves_and_both_keys_are_told():
    summaries = Summaries(read_pod)
    summaries.put(pod("p1", "a"))
    assert summaries.put(pod("p1", "b")) == {("ns", "a"), ("ns", "b")}
    assert list(summaries) == [("ns", "b")]


def test_two_pods_of_one_environment_are_both_kept_until_each_goes():
    """A pod of a namesake being replaced (or one with copied labels) beside the environment's own: the
    backend picks its own by the environment uid (backends/kubernetes.py)."""
    summaries = Summaries(read_pod)
    summaries.put(pod("old", "a", environment_uid="uid-old"))
    summaries.put(pod("new", "a", environment_uid="uid-new"))
    assert sorted(summary.environment_uid for summary in summaries[("ns", "a")]) == ["uid-new", "uid-old"]
    summaries.remove("old")
    assert [summary.environment_uid for summary in summaries[("ns", "a")]] == ["uid-new"]


def test_a_list_read_again_tells_only_what_changed():
    summaries = Summaries(read_pod)
    for uid, environment in (("p1", "a"), ("p2", "b"), ("p3", "c")):
        summaries.put(pod(uid, environment))
    changed = summaries.replace(map(summaries.read, [pod("p2", "b"), pod("p3", "c", node="n1"), pod("p4", "d")]))
    assert changed == {("ns", "a"), ("ns", "c"), ("ns", "d")}  # gone, scheduled meanwhile, new; b unchanged
    assert sorted(summaries) == [("ns", "b"), ("ns", "c"), ("ns", "d")]
    assert summaries.remove("p1") == set()  # forgotten with the old list


def test_a_pod_that_cannot_be_read_is_left_out_and_its_old_summary_goes():
    summaries = Summaries(read_pod)
    summaries.put(pod("p1", "a"))
    unreadable = pod("p1", "a", node="n1")
    unreadable["spec"]["containers"][0]["resources"]["requests"]["cpu"] = "lots"
    assert summaries.put(unreadable) == {("ns", "a")}
    assert ("ns", "a") not in summaries


def test_a_watch_error_in_the_stream_is_raised_gone_as_expired_else_with_its_code():
    event = {"type": "MODIFIED", "object": {"metadata": {"resourceVersion": "7"}}}
    assert watch_event("/api/v1/pods", event) is event
    with pytest.raises(Expired):
        watch_event("/api/v1/pods", {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}})
    with pytest.raises(KubeError) as raised:
        watch_event("/api/v1/pods", {"type": "ERROR", "object": {"code": 500, "reason": "InternalError"}})
    assert raised.value.status == 500 and "WATCH /api/v1/pods" in repr(raised.value)


def test_a_change_the_summary_does_not_show_is_not_told():
    """An event that leaves what is kept of a pod as it was (its IP, an annotation) starts no reconcile;
    one that changes it (its node) does, and so does the same pod under another key."""
    summaries = Summaries(read_pod)
    summaries.put(pod("p1", "a"))
    annotated = pod("p1", "a")
    annotated["metadata"]["annotations"] = {"note": "x"}
    annotated["status"] = {"podIP": "10.0.0.7"}
    assert summaries.put(annotated) == set()
    assert summaries.put(pod("p1", "a", node="n1")) == {("ns", "a")}
    assert summaries.put(pod("p1", "a", node="n1")) == set()
    assert summaries.put(pod("p1", "b", node="n1")) == {("ns", "a"), ("ns", "b")}
    assert summaries.put(pod("p2", "b", node="n1")) == {("ns", "b")}  # a second pod for the same key
