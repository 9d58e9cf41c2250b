#!/bin/sh
# Builds build/crate-operator_<version>_all.deb from crate_operator.py with
# dpkg-deb alone (no debhelper, no source package).
#
# Environment:
#   PYTHON             interpreter that prints the version and the unit
#                      (default python3)
#   OUT_DIR            output directory (default <repo>/build)
#   DEB_MAINTAINER     Maintainer field and changelog signature
#   SOURCE_DATE_EPOCH  time stamp of every file and of the changelog
#                      (default: the last commit, else now)
# Prints the path of the .deb.
set -eu
umask 022

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-$REPO/build}
DEB_MAINTAINER=${DEB_MAINTAINER:-crate-operator developers <crate-operator@example.org>}
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH=$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH

PROGRAM="$REPO/crate_operator.py"
VERSION=$("$PYTHON" "$PROGRAM" version)
PACKAGE=crate-operator
STAGE="$OUT_DIR/deb-root"
DOC="$STAGE/usr/share/doc/$PACKAGE"
DEB="$OUT_DIR/${PACKAGE}_${VERSION}_all.deb"

rm -rf "$STAGE"
mkdir -p "$STAGE/DEBIAN" "$STAGE/usr/bin" "$STAGE/usr/lib/$PACKAGE" \
  "$STAGE/lib/systemd/system" \
  "$STAGE/etc/crate-operator" "$DOC" "$STAGE/usr/share/man/man1" \
  "$STAGE/usr/share/lintian/overrides"

# === Files ===
# The module goes to /usr/lib/crate-operator, and /usr/bin/crate-operator
# is a launcher that imports it, so that the service runs from the bytecode
# postinst compiles instead of compiling the script at every start.
install -m 0644 "$PROGRAM" "$STAGE/usr/lib/$PACKAGE/crate_operator.py"
"$PYTHON" "$PROGRAM" launcher --lib-dir "/usr/lib/$PACKAGE" \
  >"$STAGE/usr/bin/crate-operator"
chmod 0755 "$STAGE/usr/bin/crate-operator"
"$PYTHON" "$PROGRAM" unit --program /usr/bin/crate-operator \
  >"$STAGE/lib/systemd/system/crate-operator.service"
chmod 0644 "$STAGE/lib/systemd/system/crate-operator.service"
# The conffile contains no secret, but an administrator may put the token in
# it, so only root may read it.
install -m 0600 "$HERE/config.json" "$STAGE/etc/crate-operator/config.json"
gzip -9n <"$HERE/crate-operator.1" >"$STAGE/usr/share/man/man1/crate-operator.1.gz"
chmod 0644 "$STAGE/usr/share/man/man1/crate-operator.1.gz"
install -m 0644 "$HERE/lintian-overrides" \
  "$STAGE/usr/share/lintian/overrides/$PACKAGE"

# copyright in the machine-readable format, with the text of LICENSE.
{
  printf '%s\n' \
    'Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/' \
    "Upstream-Name: $PACKAGE" '' \
    'Files: *' \
    'Copyright: 2026 The crate-operator developers' \
    'License: Expat'
  sed -n '/^Permission/,$p' "$REPO/LICENSE" | sed -e 's/^$/./' -e 's/^/ /'
} >"$DOC/copyright"
chmod 0644 "$DOC/copyright"

# A native package carries its own changelog: one entry per built version.
date_rfc2822=$(date -u -R -d "@$SOURCE_DATE_EPOCH")
printf '%s\n' \
  "$PACKAGE ($VERSION) unstable; urgency=medium" '' \
  "  * Package crate_operator.py version $VERSION." '' \
  " -- $DEB_MAINTAINER  $date_rfc2822" \
  | gzip -9n >"$DOC/changelog.gz"
chmod 0644 "$DOC/changelog.gz"

# === Control files ===
installed_size=$(du -sk --apparent-size --exclude=DEBIAN "$STAGE" | cut -f1)
sed -e "s|@VERSION@|$VERSION|" -e "s|@MAINTAINER@|$DEB_MAINTAINER|" \
  -e "s|@INSTALLED_SIZE@|$installed_size|" \
  "$HERE/control.in" >"$STAGE/DEBIAN/control"
install -m 0644 "$HERE/conffiles" "$STAGE/DEBIAN/conffiles"
for script in postinst prerm postrm; do
  install -m 0755 "$HERE/$script" "$STAGE/DEBIAN/$script"
done
# md5sums leaves out conffiles, whose sums dpkg keeps in its status file.
(
  cd "$STAGE"
  find usr lib -type f | LC_ALL=C sort | xargs md5sum >DEBIAN/md5sums
)
chmod 0644 "$STAGE/DEBIAN/control" "$STAGE/DEBIAN/md5sums"

# Same input, same bytes: every time stamp is SOURCE_DATE_EPOCH.
find "$STAGE" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$DEB" >/dev/null
echo "$DEB"
