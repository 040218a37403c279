#!/usr/bin/env bash
# Install the system packages the adapter and its tests need: unixODBC and the
# ODBC drivers for PostgreSQL, MariaDB and SQLite, and Chromium for the browser test.
#
# Fast path: when `odbcinst -q -d` already lists all three driver names the
# script prints one line and does nothing. Otherwise, as root, it runs
# `apt-get update` + `apt-get install` (Debian). As a non-root user it prints
# what to install and exits 1.
#
# After installing it verifies the driver names and, if a driver package is
# installed but registered under another name (or not registered at all), it
# registers the expected name in odbcinst.ini pointing at the driver library.
#
# On every path it also turns psqlODBC's communication log off: Debian's odbc-postgresql registers its
# drivers with CommLog=1, and each process that connects then leaves a /tmp/psqlodbc_<program>_<user><pid>.log
# behind (one per adapter worker, test run and bench process; `;CommLog=0` in the connection string does not
# override it).
set -euo pipefail

REQUIRED_DRIVERS=("PostgreSQL Unicode" "MariaDB Unicode" "SQLite3")
APT_PACKAGES=(unixodbc unixodbc-dev odbcinst odbc-postgresql odbc-mariadb libsqliteodbc)

log() { printf 'install-system-deps: %s\n' "$*"; }

# Prints the names of required drivers that `odbcinst -q -d` does not list.
missing_drivers() {
    local listed=""
    if command -v odbcinst >/dev/null 2>&1; then
        listed="$(odbcinst -q -d 2>/dev/null || true)"
    fi
    local d
    for d in "${REQUIRED_DRIVERS[@]}"; do
        if ! grep -Fxq "[$d]" <<<"$listed"; then
            printf '%s\n' "$d"
        fi
    done
}

# Headless Chromium for the demo page's browser test (tests/kit/test_demo_page.py drives Debian's
# chromium through Playwright's executable_path; Playwright's own browser download is never used).
if command -v chromium >/dev/null 2>&1; then
    log "chromium present; nothing to do for the browser."
elif [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    log "chromium is missing (headless browser tests); install it: sudo apt-get install -y chromium" >&2
    exit 1
else
    log "apt-get install chromium (headless browser tests)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
fi

# Sets CommLog=0 in the [PostgreSQL ...] driver sections of the odbcinst.ini unixODBC reads, if any says 1.
quiet_psqlodbc_commlog() {
    command -v odbcinst >/dev/null 2>&1 || return 0
    local ini
    ini="$(odbcinst -j 2>/dev/null | awk -F': *' '/^DRIVERS/ {print $2}')"
    ini="${ini:-/etc/odbcinst.ini}"
    [[ -f "$ini" ]] || return 0
    local commlog_on='/^\[PostgreSQL/ { s = 1; next } /^\[/ { s = 0 } s && /^[ \t]*CommLog[ \t]*=[ \t]*1[ \t]*$/ { found = 1 }
                      END { exit !found }'
    awk "$commlog_on" "$ini" || return 0
    if [[ ! -w "$ini" ]]; then
        log "psqlODBC's CommLog is on in $ini (a /tmp/psqlodbc_*.log per process); as root set CommLog = 0 there" >&2
        return 0
    fi
    local tmp
    tmp="$(mktemp)"
    awk '/^\[PostgreSQL/ { s = 1; print; next } /^\[/ { s = 0 }
         s && /^[ \t]*CommLog[ \t]*=/ { print "CommLog=0"; next } { print }' "$ini" >"$tmp"
    cat "$tmp" >"$ini"
    rm -f "$tmp"
    log "psqlODBC communication log turned off (CommLog=0) in $ini"
}

missing="$(missing_drivers)"
if [[ -z "$missing" ]]; then
    log "ODBC drivers present (${REQUIRED_DRIVERS[*]}); nothing to do."
    quiet_psqlodbc_commlog
    exit 0
fi

log "missing ODBC drivers: $(tr '\n' ',' <<<"$missing" | sed 's/,$//')"

if [[ "$(id -u)" -ne 0 ]]; then
    cat >&2 <<MSG
install-system-deps: not running as root, cannot install system packages.
Install them yourself (Debian/Ubuntu), then re-run:
    sudo apt-get update
    sudo apt-get install -y ${APT_PACKAGES[*]}
Required ODBC driver names (odbcinst -q -d): ${REQUIRED_DRIVERS[*]}
MSG
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    log "apt-get not found; install unixODBC and the PostgreSQL, MariaDB and SQLite ODBC drivers by hand." >&2
    exit 1
fi

log "apt-get update"
apt-get update -qq
log "apt-get install ${APT_PACKAGES[*]}"
DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${APT_PACKAGES[@]}"

# ---------------------------------------------------------------------------
# Verify the registered driver names; register missing ones by library path.
# ---------------------------------------------------------------------------
ODBCINST_INI="$(odbcinst -j 2>/dev/null | awk -F': *' '/^DRIVERS/ {print $2}')"
ODBCINST_INI="${ODBCINST_INI:-/etc/odbcinst.ini}"

# Finds the first existing file among the given glob patterns.
find_lib() {
    local pat f
    for pat in "$@"; do
        for f in $pat; do
            if [[ -e "$f" ]]; then
                printf '%s\n' "$f"
                return 0
            fi
        done
    done
    return 1
}

register_driver() {
    local name="$1" lib="$2" setup="${3:-}"
    local tmp
    tmp="$(mktemp)"
    {
        printf '[%s]\n' "$name"
        printf 'Description=%s (registered by scripts/install-system-deps.sh)\n' "$name"
        printf 'Driver=%s\n' "$lib"
        [[ -n "$setup" ]] && printf 'Setup=%s\n' "$setup"
        printf 'UsageCount=1\n'
    } >"$tmp"
    odbcinst -i -d -f "$tmp" >/dev/null
    rm -f "$tmp"
    log "registered ODBC driver [$name] -> $lib in $ODBCINST_INI"
}

missing="$(missing_drivers)"
if [[ -n "$missing" ]]; then
    while IFS= read -r d; do
        [[ -z "$d" ]] && continue
        lib=""
        case "$d" in
            "PostgreSQL Unicode")
                lib="$(find_lib /usr/lib/*/odbc/psqlodbcw.so /usr/lib/odbc/psqlodbcw.so)" || true ;;
            "MariaDB Unicode")
                lib="$(find_lib /usr/lib/*/odbc/libmaodbc.so /usr/lib/odbc/libmaodbc.so /usr/lib/*/libmaodbc.so)" || true ;;
            "SQLite3")
                lib="$(find_lib /usr/lib/*/odbc/libsqlite3odbc.so /usr/lib/odbc/libsqlite3odbc.so)" || true ;;
        esac
        if [[ -z "$lib" ]]; then
            log "driver library for [$d] not found after install" >&2
            exit 1
        fi
        register_driver "$d" "$lib"
    done <<<"$missing"
fi

missing="$(missing_drivers)"
if [[ -n "$missing" ]]; then
    log "still missing after install: $missing" >&2
    odbcinst -q -d >&2 || true
    exit 1
fi
log "ODBC drivers registered: $(odbcinst -q -d | tr '\n' ' ')"
quiet_psqlodbc_commlog
