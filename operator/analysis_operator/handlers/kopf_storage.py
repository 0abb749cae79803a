"""Where kopf keeps its own records: nothing written to an environment that converges at once.

kopf compares each environment with the last state its handlers finished (the "diff base") to tell a
create from a spec change from nothing new, and records a handler's progress while it retries. Its
stock stores write both into the object's annotations, plus a `<prefix>/kopf-managed: yes` marker:
one more PATCH per environment (and a copy of the spec in every later watch event).

- The diff base is kept in this process's memory. Nothing needs it to survive the process:
  on_environment converges the same way on create, spec change and resume, so a restarted or newly
  active replica that has no record sees every object as created, converges it, and writes nothing
  to one that is already converged (tests/integration/test_environments.py).
- Progress records stay annotations under the operator's prefix (only the operator and admins may
  write those: deploy/authorization), written only while a handler retries, without the marker.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import kopf

from analysis_operator.model.domain import GROUP

BOUND = 200_000  # objects remembered; beyond, all are forgotten at once (they then read as created)


def _root(field: Any) -> str:
    """The first key of a field path as kopf takes them: "status.phase" or ("status", "phase")."""
    parts = field.split(".") if isinstance(field, str) else list(field)
    return str(parts[0]) if parts else ""


class MemoryDiffBaseStorage(kopf.DiffBaseStorage):
    def __init__(self) -> None:
        super().__init__()
        self._essences: dict[str, Any] = {}  # uid -> the essence kopf last handled

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        """kopf's essence without the operator's own annotations (no marker says they are kopf's).

        kopf deep-copies the whole body and then drops status and metadata: for every watch event of
        an environment, its managedFields and conditions too (a tenth of the operator's CPU in a
        burst). It is handed only what it keeps (spec and the like, labels, annotations): the same
        essence, unless a handler watches a field of status or metadata, which then gets the body."""
        if not any(_root(field) in ("status", "metadata") for field in extra_fields or ()):
            slim: dict[str, Any] = {key: value for key, value in body.items() if key not in ("metadata", "status")}
            metadata = body.get("metadata") or {}
            slim["metadata"] = {key: metadata[key] for key in ("labels", "annotations") if key in metadata}
            body = kopf.Body(slim)
        essence = super().build(body=body, extra_fields=extra_fields)
        annotations = essence.get("metadata", {}).get("annotations", {})
        for key in [key for key in annotations if key.startswith(f"{GROUP}/")]:
            del annotations[key]
        self.remove_empty_stanzas(essence)
        return essence

    def fetch(self, *, body: kopf.Body) -> Any:
        return self._essences.get(body.metadata.uid or "")

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        uid = body.metadata.uid or ""
        if len(self._essences) >= BOUND and uid not in self._essences:
            self._essences.clear()
        self._essences[uid] = essence

    def forget(self, uid: str) -> None:
        self._essences.pop(uid, None)

    def retain(self, live: Iterable[str]) -> None:
        """Forget the objects that are gone (kopf tells a store nothing about deletions)."""
        keep = set(live)
        for uid in [uid for uid in self._essences if uid not in keep]:
            del self._essences[uid]

    def __len__(self) -> int:
        return len(self._essences)


class ProgressStorage(kopf.AnnotationsProgressStorage):
    """kopf's annotations for a retrying handler, without the `kopf-managed` marker: kopf adds the
    marker with its first progress record, which it also writes for a handler that succeeds at once
    (and purges in the same patch), so the marker alone cost a PATCH per environment. The marker
    tells other kopf operators' diff bases to skip these annotations; ours skips them by prefix."""

    def __init__(self) -> None:
        super().__init__(prefix=GROUP)

    def _store_marker(self, prefix: str, patch: kopf.Patch, body: kopf.Body) -> None:  # kopf 1.45 (pinned)
        return None
