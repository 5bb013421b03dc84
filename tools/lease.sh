#!/usr/bin/env bash
# One GPU lease, from here to committed results (docs/TOOLS.md, "A GPU lease").
#
#   bash tools/lease.sh prepare [--no-smoke] [--slice] [--budget SECONDS] [STUDY ...]  # here
#   bash tools/lease.sh device  [--no-smoke] [--slice] [--budget SECONDS] [STUDY ...]  # there
#   bash tools/lease.sh unpack DIR                                            # here, after
#
# prepare: fills the git-ignored carry folders of this checkout (.whl/: lightly, the one package
#   ssl_ema needs that the lease machine lacks, as a Python 3.12 wheel; .data/: the CIFAR-10
#   JPEG tarball and CIFAR-10N from ../shared/data), checks that what travels stays under the
#   64 MiB a call carries, and prints the exact device call.
# device: installs the wheel, unpacks the data, runs the smoke check (tools/smoke.py, at most
#   --smoke-budget s) unless --no-smoke, then `reproduce.py run` with what is left of the
#   command's --budget (default 570 s of the 600 s a command may run; only runs the rest can
#   finish start; --slice: a longer one too, cut with a checkpoint that only a second command on
#   the same, still warm machine can resume), everything logged. $OUT gets 3 files: lease.log, smoke.jsonl and
#   results.tar.gz (records and run files, repacked after every finished run).
# unpack: restores docs/results/ and runs/ from a returned results.tar.gz (then `git add
#   docs/results` and commit).
set -o pipefail

usage() { sed -n '2,6p' "$0" >&2; exit 2; }
[ $# -ge 1 ] || usage
mode=$1; shift
smoke=1; slice=0; budget=570; smoke_budget=170; studies=()
while [ $# -gt 0 ]; do
  case $1 in
    --no-smoke) smoke=0 ;;
    --slice) slice=1 ;;
    --budget) budget=$2; shift ;;
    --smoke-budget) smoke_budget=$2; shift ;;
    -*) echo "lease.sh: unknown option $1" >&2; usage ;;
    *) studies+=("$1") ;;
  esac
  shift
done
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 2

prepare() {
  local shared=${SSL_EMA_SHARED:-../shared/data} args=()
  [ -f "$shared/cifar10-jpg.tar.gz" ] || { echo "lease.sh: no $shared/cifar10-jpg.tar.gz (set SSL_EMA_SHARED to the folder holding it)" >&2; exit 2; }
  mkdir -p .whl .data/cifar10n
  cp "$shared/cifar10-jpg.tar.gz" .data/ && cp "$shared/cifar10n/CIFAR-10_human.pt" .data/cifar10n/ || exit 1
  # lightly 1.6.0 is pure Python; of its requirements only hydra-core is missing there, and
  # ssl_ema never imports it (lightly's CLI does), so lightly alone, without its deps.
  rm -f .whl/lightly-*.whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform any -d .whl lightly==1.6.0 || exit 1
  local tree carry
  tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  carry=$(du -cb .whl .data | tail -1 | cut -f1)
  echo "travels: tree $((tree / 1024)) KiB + carry $((carry / 1024)) KiB (limit 65536 KiB)"
  [ $((tree + carry)) -lt $((64 * 1024 * 1024)) ] || { echo "lease.sh: over 64 MiB" >&2; exit 1; }
  [ $smoke = 0 ] && args+=(--no-smoke)
  [ $slice = 1 ] && args+=(--slice)
  [ "$budget" != 570 ] && args+=(--budget "$budget")
  local command="bash tools/lease.sh device"
  for a in "${args[@]}" "${studies[@]}"; do command+=" $a"; done
  echo "device call: run(carry=[\".whl\", \".data\"], timeout_s=600, command=\"$command\")"
}

device() {
  local out=${OUT:-/tmp/lease-out}
  mkdir -p "$out"
  on_device "$out" 2>&1 | tee -a "$out/lease.log"  # the log returns too, to the last line
}

on_device() {
  local out=$1
  echo "lease: $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null) budget ${budget}s"
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$root PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
  if [ ! -d /tmp/data/cifar10 ]; then  # a second command on the same machine finds it there
    mkdir -p /tmp/data && tar xzf .data/cifar10-jpg.tar.gz -C /tmp/data && cp -r .data/cifar10n /tmp/data/ || exit 1
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  if [ $smoke = 1 ]; then
    timeout $((smoke_budget + 30)) python3 tools/smoke.py --out "$out/smoke.jsonl" --budget "$smoke_budget"
    echo "smoke: exit $? after ${SECONDS}s"
  fi
  local left=$((budget - SECONDS - 20))  # 20 s: the report and the last pack after the runs
  if [ $left -lt 60 ]; then  # still pack what the smoke check measured (devices.json)
    echo "lease: ${left}s left, no study started"
    python3 tools/reproduce.py report --out "$out"
    return
  fi
  local extra=()
  [ $slice = 1 ] && extra+=(--slice)
  python3 tools/reproduce.py run "${studies[@]}" --budget "${left}s" --data /tmp/data --out "$out" "${extra[@]}"
  echo "lease: done after ${SECONDS}s; files: $(ls "$out")"
}

unpack() {
  [ -f "${studies[0]}/results.tar.gz" ] || { echo "lease.sh: no results.tar.gz in '${studies[0]}'" >&2; exit 2; }
  tar xzf "${studies[0]}/results.tar.gz" -C "$root" && git status --short docs/results
}

case $mode in
  prepare) prepare ;;
  device) device ;;
  unpack) unpack ;;
  *) usage ;;
esac
