#!/usr/bin/env bash
# cross/deb.sh TARGET: builds target/deb/perch_<version>_<arch>.deb from the
# distribution binary of TARGET (built first by cross/build.sh):
#
#   bash cross/deb.sh x86_64-unknown-linux-gnu        # perch_<version>_amd64.deb
#   bash cross/deb.sh aarch64-unknown-linux-gnu       # perch_<version>_arm64.deb
#   bash cross/deb.sh armv7-unknown-linux-gnueabihf   # perch_<version>_armhf.deb
#
# The package: /usr/bin/perch, /lib/systemd/system/perch.service (systemd/),
# /etc/perch/perch.toml (a conffile of commented defaults, cross/deb/), the
# maintainer scripts of cross/deb/ (a perch system user, /var/lib/perch, the
# service enabled and started), docs and copyright under /usr/share/doc/perch.
# Built with plain dpkg-deb: nothing here needs debhelper or cargo-deb.
#
# Environment: PERCH_DEB_MAINTAINER (the Maintainer field), SOURCE_DATE_EPOCH
# (timestamps; default: the last commit's time, so rebuilds are identical).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

[ $# -eq 1 ] || {
    sed -n '2,8p' "$0" >&2
    exit 2
}
TARGET=$1
case $TARGET in
x86_64-unknown-linux-gnu) ARCH=amd64 ;;
aarch64-unknown-linux-gnu) ARCH=arm64 ;;
armv7-unknown-linux-gnueabihf) ARCH=armhf ;;
*)
    echo "cross/deb.sh: no Debian architecture for $TARGET (gnu targets only)" >&2
    exit 2
    ;;
esac

for tool in dpkg-deb objdump gzip python3; do
    command -v "$tool" >/dev/null || {
        echo "cross/deb.sh: $tool is missing (apt-get install dpkg-dev binutils gzip python3)" >&2
        exit 1
    }
done

VERSION=$(cargo metadata --no-deps --format-version 1 --offline 2>/dev/null |
    python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="perch"))')
MAINTAINER=${PERCH_DEB_MAINTAINER:-perch developers <perch-dev@lists.example.org>}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}

bash cross/build.sh "$TARGET"
BIN=target/$TARGET/release/perch

# libc6 must be at least the newest glibc symbol version the binary needs
# (2.28 or older by construction: cross/build.sh links against 2.28).
GLIBC_NEEDED=$(objdump -T "$BIN" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
[ -n "$GLIBC_NEEDED" ] || {
    echo "cross/deb.sh: $BIN needs no glibc symbol: is it a gnu binary?" >&2
    exit 1
}

STAGE=target/deb/$ARCH
ROOT=$STAGE/root
rm -rf "$STAGE"
mkdir -p "$ROOT/DEBIAN"
install -D -m 0755 "$BIN" "$ROOT/usr/bin/perch"
install -D -m 0644 systemd/perch.service "$ROOT/lib/systemd/system/perch.service"
install -D -m 0644 cross/deb/perch.toml "$ROOT/etc/perch/perch.toml"
DOC=$ROOT/usr/share/doc/perch
install -d -m 0755 "$DOC"
gzip -9n <README.md >"$DOC/README.md.gz"
install -D -m 0644 cross/deb/lintian-overrides "$ROOT/usr/share/lintian/overrides/perch"

# A Debian changelog is required in every binary package; this one names the
# version and the commit it was built from.
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
{
    echo "perch ($VERSION) unstable; urgency=medium"
    echo
    echo "  * Built by cross/deb.sh from commit $COMMIT."
    echo
    echo " -- $MAINTAINER  $(date -u -R -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n >"$DOC/changelog.gz"

# Machine-readable copyright: perch, and every crate linked into this binary
# with its licence (from cargo metadata, for this target's dependency graph).
python3 cross/deb/copyright.py "$TARGET" >"$DOC/copyright"

for script in postinst prerm postrm; do
    install -m 0755 "cross/deb/$script" "$ROOT/DEBIAN/$script"
done
echo /etc/perch/perch.toml >"$ROOT/DEBIAN/conffiles"
chmod 0644 "$ROOT/DEBIAN/conffiles"

INSTALLED_KB=$(du -sk --exclude=DEBIAN "$ROOT" | awk '{print $1}')
cat >"$ROOT/DEBIAN/control" <<EOF
Package: perch
Version: $VERSION
Architecture: $ARCH
Maintainer: $MAINTAINER
Installed-Size: $INSTALLED_KB
Depends: libc6 (>= $GLIBC_NEEDED), adduser
Section: net
Priority: optional
Description: thread-per-core message broker for edge gateways (NATS protocol)
 perch is a single-binary message broker for gateways between many small
 devices and the rest of a system. It speaks the NATS client protocol, so
 every NATS client library and tool works unchanged, a compact protocol for
 microcontrollers over UDP, TCP and serial lines, and keeps an optional
 write-ahead store where an acknowledgement means the message is on disk.
 .
 It runs as the perch service (systemd), configured in /etc/perch/perch.toml.
EOF

(cd "$ROOT" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | sort -z | xargs -0 md5sum) >"$ROOT/DEBIAN/md5sums"
chmod 0644 "$ROOT/DEBIAN/control" "$ROOT/DEBIAN/md5sums"
find "$ROOT" -type d -exec chmod 0755 {} +
find "$ROOT" -exec touch --no-dereference -d "@$SOURCE_DATE_EPOCH" {} +

DEB=target/deb/perch_${VERSION}_${ARCH}.deb
dpkg-deb --root-owner-group -Zxz --build "$ROOT" "$DEB" >/dev/null
echo "built $DEB ($(stat -c %s "$DEB") bytes; Depends: libc6 (>= $GLIBC_NEEDED), adduser)"
