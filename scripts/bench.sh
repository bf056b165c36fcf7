#!/usr/bin/env bash
# npm run bench [-- raw|qcow2] [ROUNDS] [nbd-bench-vs options, e.g. --only connect --duration 1]
# Compares blockd with qemu-storage-daemon using ../shared/bench (nbd-bench-vs), on the
# reference images made by nbd-bench-mkimages (cached in .bench/). Needs fio, python3-libnbd,
# qemu-utils, qemu-system-common (apt-get install -y fio python3-libnbd qemu-utils qemu-system-common).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BENCH=${NBD_BENCH_DIR:-$ROOT/../shared/bench}
KIND=${1:-raw}
case $KIND in raw | qcow2) ;; *) echo "usage: npm run bench [-- raw|qcow2] [ROUNDS] [nbd-bench-vs options]" >&2; exit 2 ;; esac
ROUNDS=${2:-3}
IMGDIR=$ROOT/.bench/images
OUT=$ROOT/.bench/vs-$KIND-$(date +%Y%m%d-%H%M%S).json
mkdir -p "$IMGDIR"
[ -f dist/cli/main.js ] || npm run --silent build
if [ ! -f "$IMGDIR/raw.img" ] || [ ! -f "$IMGDIR/frag.qcow2" ]; then
  "$BENCH/nbd-bench-mkimages" "$IMGDIR"
fi
if [ "$KIND" = raw ]; then
  IMG=$IMGDIR/raw.img
  PREP="cat $IMG > /dev/null"
  FILE="filename=$IMG"
  FMT="--blockdev driver=raw,node-name=r,file=f"
else
  PREP="cp $IMGDIR/frag.qcow2 {dir}/work.qcow2 && sync {dir}/work.qcow2 && cat {dir}/work.qcow2 > /dev/null"
  FILE="filename={dir}/work.qcow2"
  FMT="--blockdev driver=qcow2,node-name=r,file=f"
fi
COMMON="--blockdev driver=file,node-name=f,$FILE $FMT --nbd-server addr.type=unix,addr.path={sock} --export type=nbd,id=e,node-name=r,name=x,writable=on"
rc=0
"$BENCH/nbd-bench-vs" --export x --rounds "$ROUNDS" --order abba \
  --prep "$PREP" \
  --server blockd "exec $ROOT/bin/blockd --log-level warn $COMMON" \
  --server qsd "exec qemu-storage-daemon $COMMON" \
  --json "$OUT" "${@:3}" || rc=$?
# Ratio table against the issue 14 targets (met/missed) and a bar chart of the ratios, next to
# the JSON; publishing it is a copy: cp .bench/vs-KIND-DATE.svg docs/img/bench-KIND.svg
if [ -f "$OUT" ]; then
  echo
  /usr/bin/python3 "$ROOT/scripts/bench-plot.py" "$OUT" --kind "$KIND" --svg "${OUT%.json}.svg" || rc=$?
  echo "to publish: cp ${OUT%.json}.svg docs/img/bench-$KIND.svg"
fi
exit "$rc"
