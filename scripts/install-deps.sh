#!/usr/bin/env bash
# Debian packages copyless's build, tests and benchmarks need.  Installs only
# what is missing, so it is cheap to call from every make target.
set -euo pipefail
need=()
for pkg in gcc make iproute2 procps strace openssl; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
