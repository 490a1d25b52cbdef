#!/usr/bin/env bash
# Make sure Debian's headless Chromium and its chromedriver are installed: the gallery tests
# (tests/test_gallery.py) open real pages in them. Idempotent; does nothing when both exist.
set -euo pipefail

CHROMIUM=/usr/bin/chromium
CHROMEDRIVER=/usr/bin/chromedriver
PACKAGES=(chromium chromium-driver)

have_browser() {
  [[ -x "$CHROMIUM" && -x "$CHROMEDRIVER" ]]
}

if have_browser; then
  exit 0
fi

# apt-get needs root: run it directly as root, or through sudo when that works without a password.
if [[ "$(id -u)" -eq 0 ]]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  echo "ensure-browser: $CHROMIUM or $CHROMEDRIVER is missing and this user cannot install" \
    "packages; run: sudo apt-get install ${PACKAGES[*]}" >&2
  exit 1
fi

apt() {
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "$@"
}

install() {
  apt install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

echo "ensure-browser: installing ${PACKAGES[*]} with apt-get" >&2
# A fresh machine may have no package lists yet (or stale ones): update only when needed.
if ! install; then
  apt update -qq >/dev/null
  install
fi

if ! have_browser; then
  echo "ensure-browser: apt-get finished but $CHROMIUM or $CHROMEDRIVER is still missing" >&2
  exit 1
fi
"$CHROMIUM" --version >&2
