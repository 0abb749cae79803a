"""Code the operator ships to the JupyterLab servers it starts: read here as text, run only there.

aenv_viewers.py is a jupyter_server extension (OPEN: the websockets of someone an environment is no
longer shared with are closed; engine/viewers.py asks for it; and the pages and cookies JupyterLab
serves a viewer carry neither the server's token nor a login cookie). Pods get it from a ConfigMap of
their namespace, Slurm jobs from their batch script; both turn it on with a jupyter_server config file.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

MODULE = "aenv_viewers"
ENDPOINT = "aenv/viewers"  # under the server's base URL
# jupyter_server reads every *.json in jupyter_server_config.d of each JUPYTER_CONFIG_PATH entry
CONFIG = json.dumps({"ServerApp": {"jpserver_extensions": {MODULE: True}}})
CONFIG_FILE = f"jupyter_server_config.d/{MODULE}.json"
# ConfigMap key -> path under the mount (pods): the module importable, the config under config/
FILES = {f"{MODULE}.py": f"{MODULE}.py", f"{MODULE}.json": f"config/{CONFIG_FILE}"}


@functools.cache
def extension_source() -> str:
    return (Path(__file__).parent / f"{MODULE}.py").read_text()
