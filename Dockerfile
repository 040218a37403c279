# sched-adapter demo image: the FHIR Scheduling facade over the bundled demo
# database, listening on 8080.
#   docker build -t sched-adapter . && docker run --rm -p 8080:8080 sched-adapter
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# unixODBC plus the drivers the adapter speaks through; their Debian packages
# register "PostgreSQL Unicode", "MariaDB Unicode" and "SQLite3" (the demo
# database is SQLite) in /etc/odbcinst.ini.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        unixodbc odbcinst odbc-postgresql odbc-mariadb libsqliteodbc \
 && rm -rf /var/lib/apt/lists/* \
 && odbcinst -q -d

WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir -e .

EXPOSE 8080
CMD ["sched-adapter", "demo", "--host", "0.0.0.0", "--port", "8080"]
