"""Placement's WSGI application for gunicorn; configured by OS_PLACEMENT_CONFIG_DIR."""

from placement.wsgi import init_application

application = init_application()
