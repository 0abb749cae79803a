# The operator image: `docker build -t analysis-operator .` (not built in this
# repository's CI: the test machines have no container engine).
# Base pinned by version; pin the digest too when you publish (`python:3.11.7-slim-bookworm@sha256:...`).
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
RUN python -m venv /venv \
 && /venv/bin/pip install --no-cache-dir --disable-pip-version-check .

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 operator \
 && useradd --system --uid 10001 --gid operator --no-create-home --shell /usr/sbin/nologin operator \
 && apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends libjemalloc2 \
 && rm -rf /var/lib/apt/lists/*
# The templates are package data inside the installed package; a site's own templates
# are a directory mounted into the container and named by ANALYSIS_OPERATOR_TEMPLATES_DIR.
COPY --from=build /venv /venv
# Python objects from jemalloc instead of Python's own allocator, which gives an arena back only when
# every object in it is gone: after a burst, pages the operator no longer uses go back to the system
# (bench/RESULTS.md, "jemalloc"). Set both empty (the chart's extraEnv) to run on Python's allocator.
ENV PATH=/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONMALLOC=malloc \
    LD_PRELOAD=libjemalloc.so.2
USER 10001:10001
EXPOSE 8080 9090 9443
ENTRYPOINT ["analysis-operator"]
