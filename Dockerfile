# sched-adapter: the IHE ITI Scheduling Server image.
#
#   docker build -t sched-adapter .
#   # production: mount a settings file (start from docs/config.example.toml; server.host = "0.0.0.0") and the mapping
#   docker run -p 8080:8080 -v /srv/sched:/etc/sched-adapter:ro sched-adapter
#   # the demo instead (embedded practice database, created in /var/lib/sched-adapter/var/demo on first start):
#   docker run --rm -p 8080:8080 -e SCHED_SERVER__BASE_URL=http://localhost:8080/fhir sched-adapter demo --host 0.0.0.0
#
# Two stages: "build" turns the source into a wheel and installs it with the pinned runtime dependencies
# (requirements.lock) into /opt/venv; the runtime stage gets that virtualenv and the ODBC drivers, nothing else
# (no compilers, no tests, no source tree).

# A fixed patch release of the slim Debian 12 image, so rebuilds get the same Python. When a digest is known
# for your registry, pin it too: python:3.11.14-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY requirements.lock ./
RUN /opt/venv/bin/pip install -r requirements.lock
COPY pyproject.toml README.md ./
COPY adapter ./adapter
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/pip install --no-deps /wheels/*.whl

FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

# unixODBC plus the drivers the adapter speaks through; their Debian packages register "PostgreSQL Unicode" and
# "MariaDB Unicode" in /etc/odbcinst.ini (the demo's SQLite database needs no driver). Debian registers psqlODBC
# with CommLog=1, which leaves a /tmp/psqlodbc_*.log per process: turned off.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        unixodbc odbcinst odbc-postgresql odbc-mariadb \
 && rm -rf /var/lib/apt/lists/* \
 && sed -i 's/^CommLog[[:space:]]*=.*/CommLog=0/' /etc/odbcinst.ini \
 && odbcinst -q -d

# An unprivileged user owns only the data directory (state store, signing secret, demo database).
RUN groupadd --system sched \
 && useradd --system --gid sched --home-dir /var/lib/sched-adapter --shell /usr/sbin/nologin sched \
 && mkdir -p /etc/sched-adapter /var/lib/sched-adapter \
 && chown sched:sched /var/lib/sched-adapter
COPY --from=build /opt/venv /opt/venv

USER sched
WORKDIR /var/lib/sched-adapter
EXPOSE 8080
# The CapabilityStatement answers once the app is up; SCHED_SERVER__PORT moves the port for both.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SCHED_SERVER__PORT', '8080') + '/fhir/metadata', timeout=4)"]
ENTRYPOINT ["sched-adapter"]
CMD ["serve", "--config", "/etc/sched-adapter/config.toml"]
