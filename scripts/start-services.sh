#!/usr/bin/env bash
# Make sure the real services the test-suite talks to are up:
#   PostgreSQL 127.0.0.1:5432 (user postgres, trust auth)
#   MariaDB    127.0.0.1:3306 (user root, empty password)
#
# For each service: if it answers, nothing is done. Otherwise it is started
# (and, if its server binary is missing and we are root, installed with apt
# first), then we wait up to $SCHED_SERVICE_WAIT seconds (default 30) for it
# to answer.
#
# Overrides: when SCHED_TEST_PG_DSN / SCHED_TEST_MARIADB_DSN is set, the
# tests use that external service and the corresponding local server is
# neither checked nor started.
set -euo pipefail

WAIT_SECONDS="${SCHED_SERVICE_WAIT:-30}"
PG_PORT=5432
MARIADB_PORT=3306

log() { printf 'start-services: %s\n' "$*"; }
err() { printf 'start-services: ERROR: %s\n' "$*" >&2; }
is_root() { [[ "$(id -u)" -eq 0 ]]; }
have() { command -v "$1" >/dev/null 2>&1; }

APT_UPDATED=0
apt_install() {
    if ! is_root; then
        err "need root to install: $* (run: sudo apt-get install -y $*)"
        return 1
    fi
    if ! have apt-get; then
        err "apt-get not available; install $* by hand"
        return 1
    fi
    if [[ "$APT_UPDATED" -eq 0 ]]; then
        log "apt-get update"
        apt-get update -qq
        APT_UPDATED=1
    fi
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

# wait_until NAME CMD...: run CMD every 0.5 s until it succeeds or time is up.
wait_until() {
    local name="$1"; shift
    local deadline=$((SECONDS + WAIT_SECONDS))
    while (( SECONDS < deadline )); do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.5
    done
    err "$name did not answer within ${WAIT_SECONDS}s"
    return 1
}

# --------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------
pg_ping() { pg_isready -q -t 2 -h 127.0.0.1 -p "$PG_PORT"; }
pg_login() { PGCONNECT_TIMEOUT=5 psql -w -X -q -At -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -c 'SELECT 1'; }
# Newest PostgreSQL version that has a "main" cluster (empty if none).
pg_version() {
    local d best=""
    for d in /etc/postgresql/*/main; do
        [[ -d "$d" ]] || continue
        d="${d%/main}"; d="${d##*/}"
        best="$(printf '%s\n%s\n' "$best" "$d" | sort -V | tail -n1)"
    done
    printf '%s' "$best"
}

ensure_postgres() {
    if [[ -n "${SCHED_TEST_PG_DSN:-}" ]]; then
        log "PostgreSQL: SCHED_TEST_PG_DSN is set, not touching the local server"
        return 0
    fi
    if have pg_isready && pg_ping; then
        log "PostgreSQL: answering on 127.0.0.1:$PG_PORT"
        return 0
    fi

    local installed=0
    if ! have pg_ctlcluster || [[ -z "$(pg_version)" ]]; then
        log "PostgreSQL: server not installed"
        apt_install postgresql || return 1
        installed=1
    fi
    if ! have pg_isready || ! have psql; then
        apt_install postgresql-client || return 1
    fi

    local ver
    ver="$(pg_version)"
    if [[ -z "$ver" ]]; then
        err "PostgreSQL: no cluster found under /etc/postgresql/*/main"
        return 1
    fi

    if [[ "$installed" -eq 1 ]]; then
        # A fresh Debian cluster uses scram/peer auth; the tests log in over
        # TCP as postgres without a password, as on the reference machine.
        local hba="/etc/postgresql/$ver/main/pg_hba.conf"
        log "PostgreSQL: fresh install, enabling trust auth for 127.0.0.1/::1 in $hba"
        { printf 'host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n'; cat "$hba"; } >"$hba.new"
        chown --reference="$hba" "$hba.new"; chmod --reference="$hba" "$hba.new"
        mv "$hba.new" "$hba"
    fi

    if ! pg_ping; then
        log "PostgreSQL: starting cluster $ver/main"
        # Exit status 2 means "already running": fine, we wait below.
        pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
    fi
    if [[ "$installed" -eq 1 ]]; then
        # In case the package's own start already ran with the old pg_hba.conf.
        pg_ctlcluster --skip-systemctl-redirect "$ver" main reload || true
    fi

    if ! wait_until "PostgreSQL" pg_ping; then
        tail -n 20 "/var/log/postgresql/postgresql-$ver-main.log" >&2 2>/dev/null || true
        return 1
    fi
    if ! pg_login >/dev/null 2>&1; then
        err "PostgreSQL answers but 'psql -h 127.0.0.1 -U postgres' without password fails; allow trust auth for 127.0.0.1 in pg_hba.conf or set SCHED_TEST_PG_DSN"
        return 1
    fi
    log "PostgreSQL: up ($ver/main)"
}

# --------------------------------------------------------------------------
# MariaDB
# --------------------------------------------------------------------------
MARIADBD=/usr/sbin/mariadbd
maria_ping() { mariadb-admin --connect-timeout=2 -h127.0.0.1 -P"$MARIADB_PORT" -uroot --silent ping >/dev/null; }
maria_login() { mariadb --connect-timeout=5 -h127.0.0.1 -P"$MARIADB_PORT" -uroot -e 'SELECT 1'; }

ensure_mariadb() {
    if [[ -n "${SCHED_TEST_MARIADB_DSN:-}" ]]; then
        log "MariaDB: SCHED_TEST_MARIADB_DSN is set, not touching the local server"
        return 0
    fi
    if have mariadb-admin && maria_ping; then
        log "MariaDB: answering on 127.0.0.1:$MARIADB_PORT"
        return 0
    fi

    local installed=0
    if [[ ! -x "$MARIADBD" ]]; then
        log "MariaDB: server not installed"
        apt_install mariadb-server || return 1
        installed=1
    fi
    if ! have mariadb-admin || ! have mariadb; then
        apt_install mariadb-client || return 1
    fi

    if ! maria_ping; then
        log "MariaDB: starting $MARIADBD"
        local args=()
        if is_root; then
            # mariadbd refuses to run as root; the reference machine's
            # /etc/mysql/my.cnf says user=mysql, a stock Debian config may not.
            install -d -o mysql -g mysql -m 0755 /run/mysqld
            args=(-- --user=mysql)
        fi
        start-stop-daemon --start --oknodo --background --exec "$MARIADBD" "${args[@]}"
    fi

    if ! wait_until "MariaDB" maria_ping; then
        tail -n 20 /var/log/mysql/error.log >&2 2>/dev/null || true
        return 1
    fi

    if [[ "$installed" -eq 1 ]] && ! maria_login >/dev/null 2>&1; then
        # A fresh Debian install only lets root in through the unix socket.
        log "MariaDB: fresh install, allowing root without password over TCP from 127.0.0.1"
        mariadb --protocol=socket -uroot <<'SQL'
ALTER USER 'root'@'localhost' IDENTIFIED VIA unix_socket OR mysql_native_password USING PASSWORD('');
CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY '';
GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;
FLUSH PRIVILEGES;
SQL
    fi
    if ! maria_login >/dev/null 2>&1; then
        err "MariaDB answers but 'mariadb -h127.0.0.1 -uroot' without password fails; create root@127.0.0.1 with an empty password or set SCHED_TEST_MARIADB_DSN"
        return 1
    fi
    log "MariaDB: up"
}

# Note: errexit is not in effect inside functions called in a `||` list, so
# every step in the ensure_* functions checks its own failures.
failed=()
ensure_postgres || failed+=("PostgreSQL")
ensure_mariadb || failed+=("MariaDB")

if (( ${#failed[@]} )); then
    err "not available: ${failed[*]}"
    exit 1
fi
log "all services up"
