#!/usr/bin/env bash
# The whole test suite, from a fresh checkout: installs what it needs, builds, runs
# vitest (unit + integration) and the iotests. Used by the README and by .ci/run.
set -uo pipefail
cd "$(dirname "$0")/.."

need_tools=(qemu-img qemu-io qemu-nbd qemu-storage-daemon nbdinfo nbdsh nbdcopy openssl)
missing=()
for t in "${need_tools[@]}"; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
if ! /usr/bin/python3 -c 'import nbd' >/dev/null 2>&1; then missing+=(python3-libnbd); fi
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing Debian test tools (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null && apt-get install -y -qq \
      qemu-utils qemu-system-common libnbd-bin python3-libnbd openssl >/dev/null \
      || { echo "apt-get install failed"; exit 1; }
  else
    echo "warning: missing tools (${missing[*]}); run as root to install them, tests needing them will not run"
  fi
fi

echo "== npm ci"
if [ -f package-lock.json ]; then npm ci --no-audit --no-fund --loglevel=error || exit 1
else npm install --no-audit --no-fund --loglevel=error || exit 1; fi

# npm ci runs the postinstall step that builds the native addon (native/); without it blockd
# falls back to pure JS, which CI must not test by accident.
if [ ! -f native/build/Release/blockd_native.node ]; then
  node scripts/build-addon.mjs --strict || { [ "${CI:-}" = true ] && exit 1; }
fi

echo "== build"
npm run --silent build || exit 1

echo "== vitest"
npx vitest run
vitest_rc=$?

echo "== iotests"
iotests/check
iotests_rc=$?

if [ $vitest_rc -ne 0 ] || [ $iotests_rc -ne 0 ]; then
  echo "vitest exit $vitest_rc, iotests exit $iotests_rc" >&2
  exit 1
fi
