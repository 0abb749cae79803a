"""Records what a real slurmrestd answers, per API version, for the unit tests of backends/slurm_api.py.

    eval "$(hack/slurm.sh env)"                      # Slurm 25.05 (v0.0.40-v0.0.43)
    .venv/bin/python -m tests.integration.slurm.record_answers
    eval "$(SLURM_VERSION=22.05 hack/slurm.sh env)"  # Debian's 22.05 (v0.0.38), on a stack of its own
    .venv/bin/python -m tests.integration.slurm.record_answers

Writes tests/unit/golden/slurm-answers/<version>/<name>.json ({"status", "body"}) for every version
the slurmrestd serves that the operator speaks, and openapi-v3-paths.json (the served paths).
Submits jobs as alice (the local stack's user; per-user mode: the stack's JWT key) and cancels
them before it ends. About 20 s per version.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import sys
import time
import uuid
from typing import Any

from analysis_operator.backends.slurm_api import (
    SUPPORTED,
    Dialect,
    DialectV004x,
    JobRequest,
    dialect,
    served_versions,
)
from analysis_operator.backends.slurm_rest import SlurmRestClient
from analysis_operator.settings import load_settings

OUT = pathlib.Path(__file__).resolve().parents[2] / "unit" / "golden" / "slurm-answers"
USER = "alice"


class Recorder:
    def __init__(self, client: SlurmRestClient, api: Dialect):
        self.client, self.api = client, api
        self.directory = OUT / api.version
        self.directory.mkdir(parents=True, exist_ok=True)

    async def call(
        self, method: str, path: str, payload: Any = None, user: str = "", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        url = f"{self.client.settings.url.rstrip('/')}/slurm/{self.api.version}/{path}"
        status, body = await self.client._send(method, url, payload, headers or self.client.credentials.headers(user))
        return status, dict(body or {})

    async def record(self, name: str, method: str, path: str, payload: Any = None, **options: Any) -> dict[str, Any]:
        status, body = await self.call(method, path, payload, **options)
        text = json.dumps({"status": status, "body": body}, indent=1, sort_keys=True)
        (self.directory / f"{name}.json").write_text(text + "\n")
        print(f"{self.api.version} {name}: HTTP {status}", file=sys.stderr)
        return body

    async def job(self, job_id: str) -> dict[str, Any]:
        return (await self.call("GET", f"job/{job_id}"))[1]["jobs"][0]

    async def wait(self, job_id: str, done, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not done(self.api.parse_job(await self.job(job_id))):
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.api.version}: job {job_id} not {what} after {timeout} s")
            await asyncio.sleep(0.5)

    def request(self, partition: str, gpus: int) -> JobRequest:
        settings = self.client.settings
        directory = settings.working_directory.replace("{user}", USER)
        uid = str(uuid.uuid4())
        return JobRequest(
            name=f"record-{self.api.version}",
            comment=f"analysis-operator/v1 namespace=recording name=answers uid={uid}",
            working_directory=directory,
            standard_output=f"{directory}/recording.aenv-answers.{uid}.%j.out",
            cpus_per_task=2,
            memory_mib=1024,
            time_limit_minutes=10,
            environment={"PATH": settings.job_path, "LANG": "C.UTF-8"},
            partition=partition,
            gpus=gpus,
        )

    async def run(self) -> None:
        api, script = self.api, "#!/bin/bash\nexec sleep 300\n"
        await self.record("ping", "GET", "ping")
        bad = {"X-SLURM-USER-NAME": "slurm", "X-SLURM-USER-TOKEN": "e30.e30.not-a-signature"}
        await self.record("ping-bad-token", "GET", "ping", headers=bad)
        await self.record("jobs-bad-token", "GET", "jobs", headers=bad)
        body = api.submit_body(self.request("debug", 2), script)
        running = str((await self.record("submit", "POST", "job/submit", body, user=USER))["job_id"])
        await self.wait(running, lambda job: job.state == "RUNNING", "running")
        await self.record("job-running-gpu", "GET", f"job/{running}")
        submitted = await self.call("POST", "job/submit", api.submit_body(self.request("tiny", 0), script), user=USER)
        pending = str(submitted[1]["job_id"])
        await self.wait(pending, lambda job: job.reason != "None", "given a reason", timeout=30)
        await self.record("job-pending", "GET", f"job/{pending}")
        await self.record("jobs", "GET", "jobs")
        await self.record("node", "GET", "node/localhost")
        await self.record("update-refused", "POST", f"job/{running}", api.time_limit_body(20), user=USER)
        await self.record("cancel", "DELETE", f"job/{running}")
        await self.wait(running, lambda job: job.state not in ("RUNNING", "COMPLETING"), "ended")
        await self.record("job-cancelled", "GET", f"job/{running}")
        await self.record("cancel-ended", "DELETE", f"job/{running}")
        await self.record("job-unknown", "GET", "job/999999")
        if isinstance(api, DialectV004x):
            # What 22.05's way of asking for GPUs does on these versions.
            body = api.submit_body(self.request("debug", 0), script)
            body["job"]["gres"] = "gpu:1"
            ignored = str((await self.record("submit-with-gres", "POST", "job/submit", body, user=USER))["job_id"])
            await self.call("DELETE", f"job/{ignored}")
        await self.call("DELETE", f"job/{pending}")


async def main() -> None:
    settings = load_settings().slurm
    if not settings.enabled or not settings.jwt_key_file:
        raise SystemExit('run with the local stack\'s settings: eval "$(hack/slurm.sh env)"')
    client = SlurmRestClient(settings)
    url = f"{settings.url.rstrip('/')}/openapi/v3"
    status, document = await client._send("GET", url, None, client.credentials.headers())
    served = served_versions(document or {})
    paths = {"paths": {path: {} for path in sorted((document or {}).get("paths") or {}) if path.startswith("/slurm/")}}
    name = "openapi-v3-paths.json" if "v0.0.43" in served else f"{served[0]}/openapi-v3-paths.json"
    (OUT / name).parent.mkdir(parents=True, exist_ok=True)
    (OUT / name).write_text(json.dumps(paths, indent=1, sort_keys=True) + "\n")
    for version in [version for version in SUPPORTED if version in served]:
        await Recorder(client, dialect(version)).run()


if __name__ == "__main__":
    asyncio.run(main())
