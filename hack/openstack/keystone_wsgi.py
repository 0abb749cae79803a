"""Keystone's WSGI application for gunicorn (Debian ships no keystone daemon we want).

Keystone parses sys.argv as its own command line when it initialises, and
would choke on gunicorn's options; clear them first. Its configuration comes
from OS_KEYSTONE_CONFIG_DIR / OS_KEYSTONE_CONFIG_FILES, set by openstack.sh.
"""

import sys

sys.argv = sys.argv[:1]

from keystone.server.wsgi import initialize_public_application  # noqa: E402

application = initialize_public_application()
