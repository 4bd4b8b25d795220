#!/bin/sh
# nginx and HAProxy from Debian's packages, unpacked into a folder: nothing is installed
# system-wide and no service is started. `make balancers` runs this; the balancer tests
# (tests/test_balancers.py) run the binaries from DEST/usr/sbin.
#
#   deploy/fetch-balancers.sh DEST DEBS
#
# DEST gets the unpacked packages (binaries in DEST/usr/sbin, any shared library this machine
# lacks in DEST/usr/lib/<triplet>: run them with LD_LIBRARY_PATH pointing there); DEBS keeps the
# downloaded .deb files. A machine without apt-get: an error under CI (CI set), else a warning
# and exit 0 (the tests then skip, saying why).
set -eu

DEST=${1:?usage: fetch-balancers.sh DEST DEBS}
DEBS=${2:?usage: fetch-balancers.sh DEST DEBS}
PACKAGES="nginx nginx-common haproxy"
BINARIES="nginx haproxy"

say() { printf '%s\n' "$*" >&2; }

if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
    if [ -n "${CI:-}" ]; then
        say "fetch-balancers: apt-get and dpkg-deb are needed (a Debian or Ubuntu machine)"
        exit 1
    fi
    say "fetch-balancers: no apt-get here; the balancer tests will be skipped"
    exit 0
fi

as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        say "fetch-balancers: '$*' needs root"
        return 1
    fi
}

# apt-get refuses to download as its sandbox user into a folder that user cannot write.
APT_OPTS="-q"
if [ "$(id -u)" = 0 ]; then
    APT_OPTS="$APT_OPTS -o APT::Sandbox::User=root"
fi

refreshed=""
refresh_lists() {
    # A fresh machine has empty package lists; old ones name versions the mirror dropped.
    [ -z "$refreshed" ] || return 1
    refreshed=1
    say "fetch-balancers: refreshing the package lists (apt-get update)"
    as_root apt-get $APT_OPTS update >&2
}

if ! apt-cache show $PACKAGES >/dev/null 2>&1; then
    refresh_lists
fi

installed() {
    dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null | grep -q '^ii'
}

# The shared libraries the balancers need that this machine lacks (liblua5.3-0,
# libopentracing-c-wrapper0, libopentracing1 on a plain Debian 12): the `lib*` packages among
# their dependencies, followed through missing ones only.
missing=""
todo=$PACKAGES
while [ -n "$todo" ]; do
    next=""
    deps=$(apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances $todo | awk '$1 ~ /Depends:$/ && $2 ~ /^lib/ { print $2 }' \
        | sort -u)
    for dep in $deps; do
        case " $missing " in *" $dep "*) continue ;; esac
        installed "$dep" && continue
        missing="$missing $dep"
        next="$next $dep"
    done
    todo=$next
done

rm -rf "$DEBS.new"
mkdir -p "$DEBS.new"
download() {
    (cd "$DEBS.new" && apt-get $APT_OPTS download $PACKAGES $missing >&2)
}
if ! download; then
    refresh_lists || exit 1
    download
fi
rm -rf "$DEBS" "$DEST"
mv "$DEBS.new" "$DEBS"
mkdir -p "$DEST"
for deb in "$DEBS"/*.deb; do
    dpkg-deb -x "$deb" "$DEST"
done

libs=$(find "$DEST" -name '*.so*' -exec dirname {} \; | sort -u | tr '\n' ':')
for binary in $BINARIES; do
    path="$DEST/usr/sbin/$binary"
    test -x "$path" || { say "fetch-balancers: $path is missing"; exit 1; }
    if LD_LIBRARY_PATH="$libs" ldd "$path" | grep 'not found' >&2; then
        say "fetch-balancers: $binary lacks the libraries above"
        exit 1
    fi
done
LD_LIBRARY_PATH="$libs" "$DEST/usr/sbin/nginx" -v
LD_LIBRARY_PATH="$libs" "$DEST/usr/sbin/haproxy" -v | head -1
say "fetch-balancers: nginx and haproxy in $DEST/usr/sbin (extra libraries:${missing:- none})"
