#!/usr/bin/env bash
# relay and Postfix side by side, in alternating rounds, on this machine; writes the table into BENCHMARKS.md
# (between the `side-by-side` markers) with the machine and the exact commands.
#
#   benches/side-by-side.sh            as root (Postfix's master runs as root); installs postfix if it is missing
#
# What it measures (BENCHMARKS.md, "Side by side with Postfix", says why each is set up so):
#   - accept: smtp-source (from Postfix) sends 4 KiB messages, a new connection for each, at 1, 20 and 100
#     sessions, against a fresh relay (release build, its own state dir, default log level) and against a private
#     Postfix 3.7 instance that holds what it receives (nothing is delivered). ROUNDS rounds (default 3); the order
#     alternates (odd rounds relay first, even rounds Postfix first). The same smtp-source runs once against
#     smtp-sink, which keeps nothing, as the load generator's ceiling on this machine.
#   - fresh-connection AUTH: `load auth` (benches/load.rs), 20 sessions, ROUNDS rounds.
#   - forward: `load drain`: the sink's own ceiling, then a drain of 20,000 queued messages into it; again with
#     the state dir on a default ext4 (loop-mounted), and again into aiosmtpd (installed from PyPI if missing).
#   - memory: VmHWM of relay in the accept rounds; `load big`: idle, and one 30 MiB message relayed.
#
# Knobs: ROUNDS (3); RELAY_BENCH_QUICK=1 (a tenth of the messages, one round; prints the table, records nothing);
# RELAY_BENCH_LOCK (default /tmp/cargo.lock: the whole run, build included, holds this lock, so that nothing else
# that takes it compiles meanwhile; empty: no lock); RELAY_BENCH_DIR (default /var/tmp/relay-side-by-side-PID;
# every state dir and Postfix's queue go there, removed at the end unless RELAY_BENCH_KEEP=1); PORT_BASE (2750:
# relay, Postfix and smtp-sink listen on PORT_BASE, +1, +2).
set -euo pipefail

if [ -z "${RELAY_BENCH_CHILD:-}" ]; then
  export RELAY_BENCH_CHILD=1
  lock=${RELAY_BENCH_LOCK-/tmp/cargo.lock}
  # Bounded as a whole: the measurements take 6 to 9 minutes on the 2-core VM, a build a few more.
  if [ -n "$lock" ]; then
    echo "side-by-side: waiting for $lock" >&2
    exec timeout 1500 flock "$lock" "$0" "$@"
  fi
  exec timeout 1500 "$0" "$@"
fi

cd "$(dirname "$0")/.."
say() { echo "side-by-side: $*" >&2; }
die() { say "$*"; exit 1; }

quick=${RELAY_BENCH_QUICK:-}
rounds=${ROUNDS:-3}
scale=1
if [ -n "$quick" ]; then rounds=1; scale=10; fi
m1=$((3000 / scale)); m20=$((20000 / scale)); m100=$((20000 / scale))
auth_msgs=$((20000 / scale)); drain_msgs=$((20000 / scale))
port_base=${PORT_BASE:-2750}
relay_port=$port_base; postfix_port=$((port_base + 1)); sink_port=$((port_base + 2))
# The 100-session case needs relay's per-client cap above 100 (default 50): smtp-source opens all 100 from
# 127.0.0.1, and a closing connection holds its place for a moment after its 221.
per_client_cap=150
drain_sessions=4
drain_limit=60
big_mib=30

[ "$(id -u)" = 0 ] || die "run as root: Postfix's master process starts as root"
if ! command -v smtp-source >/dev/null || ! command -v postfix >/dev/null; then
  say "installing postfix (for smtp-source, smtp-sink and the comparison)"
  DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q postfix >/dev/null ||
    die "cannot install postfix: apt-get install postfix"
fi
for tool in smtp-source smtp-sink postfix postconf python3 cargo; do
  command -v "$tool" >/dev/null || die "$tool not found"
done
# The second drain's sink (benches/common/aiosink.py) is aiosmtpd, from PyPI.
if ! python3 -c 'import aiosmtpd' 2>/dev/null; then
  say "installing aiosmtpd (the second drain's sink)"
  timeout 300 python3 -m pip install -q aiosmtpd >/dev/null || say "cannot install aiosmtpd: its drain row is left out"
fi

bench=${RELAY_BENCH_DIR:-/var/tmp/relay-side-by-side-$$}
mkdir -p "$bench"
export RELAY_BENCH_DIR=$bench
results=$bench/results
: >"$results"
pf=$bench/postfix
relay_pid=
sink_pid=
# Deleting tens of thousands of files makes file creation on ext4 slow for minutes after (BENCHMARKS.md): a run
# that starts soon after the previous one's clean-up says so in its notes.
stamp=/var/tmp/.relay-side-by-side-cleanup

cleanup() {
  set +e
  [ -n "$relay_pid" ] && kill "$relay_pid" 2>/dev/null && wait "$relay_pid" 2>/dev/null
  [ -n "$sink_pid" ] && kill "$sink_pid" 2>/dev/null && wait "$sink_pid" 2>/dev/null
  if [ -f "$pf/conf/main.cf" ]; then
    say "stopping Postfix"
    postfix -c "$pf/conf" stop >/dev/null 2>&1
    local master
    master=$(cat "$pf/spool/pid/master.pid" 2>/dev/null | tr -d ' ')
    for _ in $(seq 50); do
      [ -n "$master" ] && kill -0 "$master" 2>/dev/null || break
      sleep 0.2
    done
    [ -n "$master" ] && kill -9 "$master" 2>/dev/null
  fi
  mountpoint -q "$bench/ext4" 2>/dev/null && umount "$bench/ext4"
  rm -f "$bench/ext4.img"
  if [ -z "${RELAY_BENCH_KEEP:-}" ]; then
    say "removing $bench"
    local t0=$SECONDS
    rm -rf "$bench"
    date +%s >"$stamp"
    say "removed in $((SECONDS - t0)) s"
  else
    say "left in place: $bench"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

record() { echo "$*" >>"$results"; }

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$relay_port" "$postfix_port" "$sink_port"; do
  port_free "$p" || die "port $p is in use (set PORT_BASE)"
done

wait_greeting() {
  local port=$1
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  die "nothing listens on 127.0.0.1:$port after 10 s"
}

# --- the machine, and how busy it is -------------------------------------------------------------------------
noise_samples=0
noise_busy=0
noise_max=0
noise() {
  # Between measurements nothing of ours runs: whatever keeps the CPUs busy for this second belongs to someone
  # else (another worktree's build or tests).
  local a b busy
  a=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $5+$6}' /proc/stat)
  sleep 1
  b=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $5+$6}' /proc/stat)
  busy=$(echo "$a $b" | awk '{t = ($3 - $1) + ($4 - $2); printf "%d", t ? 100 * ($3 - $1) / t : 0}')
  noise_samples=$((noise_samples + 1))
  [ "$busy" -le 15 ] || noise_busy=$((noise_busy + 1))
  [ "$busy" -le "$noise_max" ] || noise_max=$busy
}
record "machine_nproc $(nproc)"
record "machine_cpu $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
record "machine_kernel $(uname -r)"
record "machine_fs $(df --output=fstype "$bench" | tail -1) ($(findmnt -n -o OPTIONS -T "$bench" 2>/dev/null || echo '?'))"
record "machine_load_start $(cut -d' ' -f1-3 /proc/loadavg)"
record "started $(date -u +%FT%TZ)"
record "commit $(git describe --always --dirty 2>/dev/null || echo unknown)"
record "postfix_version $(postconf -h mail_version)"
if [ -f "$stamp" ] && [ $(($(date +%s) - $(cat "$stamp"))) -lt 360 ]; then
  record "note the previous run's files were deleted $(($(date +%s) - $(cat "$stamp"))) s before this run began: file creation may be slowed"
fi

# --- build ---------------------------------------------------------------------------------------------------
say "building (release)"
exe_of() { python3 -c '
import json, sys
want = sys.argv[1]
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == want:
        print(m["executable"])' "$1"; }
relay_bin=$(timeout 1200 cargo build --release --locked --message-format=json | exe_of relay)
load_bin=$(timeout 1200 cargo bench --bench load --no-run --locked --message-format=json | exe_of load)
[ -x "$relay_bin" ] && [ -x "$load_bin" ] || die "build failed"
export RELAY_BIN=$relay_bin
say "relay: $relay_bin"

# --- Postfix: a private instance that holds what it receives --------------------------------------------------
start_postfix() {
  mkdir -p "$pf/conf" "$pf/spool" "$pf/data"
  chown postfix "$pf/data"
  cat >"$pf/conf/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $pf/spool
data_directory = $pf/data
maillog_file = $pf/maillog
maillog_file_prefixes = $pf
myhostname = bench.invalid
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
smtpd_relay_restrictions = permit_mynetworks reject
smtpd_end_of_data_restrictions = check_client_access static:HOLD
default_process_limit = 150
EOF
  # Debian's master.cf services, without the chroot (it needs copies of /etc files in the private queue).
  cat >"$pf/conf/master.cf" <<EOF
127.0.0.1:$postfix_port inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
  postfix -c "$pf/conf" check || die "postfix check failed ($pf/conf)"
  postfix -c "$pf/conf" start >/dev/null 2>&1 || die "postfix did not start; see $pf/maillog"
  wait_greeting "$postfix_port"
}
held() { find "$pf/spool/hold" -type f | wc -l; }

# --- one accept run --------------------------------------------------------------------------------------------
# Prints messages/s; the caller records it. smtp-source exits non-zero when the server refuses it.
smtp_source() {
  local port=$1 sessions=$2 msgs=$3 start end
  start=$(date +%s.%N)
  if ! timeout 300 smtp-source -s "$sessions" -m "$msgs" -l 4096 -f bench@example.com -t sink@example.com \
    "127.0.0.1:$port" >"$bench/smtp-source.out" 2>&1; then
    say "smtp-source -s $sessions against port $port failed: $(tail -1 "$bench/smtp-source.out")"
    echo failed
    return
  fi
  end=$(date +%s.%N)
  awk -v m="$msgs" -v a="$start" -v b="$end" 'BEGIN { printf "%.0f\n", m / (b - a) }'
}

proc_kib() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"; }

accept_relay() {
  local round=$1 sessions=$2 msgs=$3 dir rate
  dir=$bench/relay-s$sessions-r$round
  mkdir -p "$dir"
  cat >"$dir/relay.toml" <<EOF
state_dir = "$dir/state"
[[listener]]
address = "127.0.0.1:$relay_port"
auth = "none"
max_connections_per_client = $per_client_cap
EOF
  env -u NOTIFY_SOCKET -u JOURNAL_STREAM -u STATE_DIRECTORY "$relay_bin" serve --config "$dir/relay.toml" \
    2>"$dir/relay.log" &
  relay_pid=$!
  wait_greeting "$relay_port"
  rate=$(smtp_source "$relay_port" "$sessions" "$msgs")
  local hwm queued
  hwm=$(proc_kib "$relay_pid" VmHWM)
  kill "$relay_pid"
  wait "$relay_pid" || say "relay exited with $? (log: $dir/relay.log)"
  relay_pid=
  queued=$(find "$dir/state/queue" -name '*.msg' | wc -l)
  [ "$rate" = failed ] || [ "$queued" = "$msgs" ] || say "relay queued $queued of $msgs"
  record "accept_s${sessions}_relay $rate"
  record "hwm_s${sessions}_relay $hwm"
  say "round $round, $sessions sessions: relay $rate msg/s (VmHWM $hwm KiB)"
}

accept_postfix() {
  local round=$1 sessions=$2 msgs=$3 before rate after
  before=$(held)
  rate=$(smtp_source "$postfix_port" "$sessions" "$msgs")
  after=$(held)
  [ "$rate" = failed ] || [ $((after - before)) = "$msgs" ] ||
    say "postfix held $((after - before)) of $msgs (the rest may still be in incoming/)"
  record "accept_s${sessions}_postfix $rate"
  say "round $round, $sessions sessions: postfix $rate msg/s"
}

# --- the run ---------------------------------------------------------------------------------------------------
say "starting Postfix on 127.0.0.1:$postfix_port ($pf)"
start_postfix
noise

say "smtp-sink, the load generator's ceiling"
smtp-sink -u nobody "127.0.0.1:$sink_port" 256 &
sink_pid=$!
wait_greeting "$sink_port"
record "sink_s1 $(smtp_source "$sink_port" 1 "$m1")"
record "sink_s20 $(smtp_source "$sink_port" 20 "$m20")"
kill "$sink_pid"; wait "$sink_pid" 2>/dev/null || true; sink_pid=

for round in $(seq "$rounds"); do
  for pair in "1 $m1" "20 $m20" "100 $m100"; do
    set -- $pair
    if [ $((round % 2)) = 1 ]; then
      accept_relay "$round" "$1" "$2"; accept_postfix "$round" "$1" "$2"
    else
      accept_postfix "$round" "$1" "$2"; accept_relay "$round" "$1" "$2"
    fi
    noise
  done
done

for round in $(seq "$rounds"); do
  say "fresh-connection AUTH, round $round"
  timeout 600 "$load_bin" auth 20 "$auth_msgs" >>"$results" || say "load auth failed"
  noise
done

say "forward drain into the XOAUTH2 sink"
timeout 900 "$load_bin" drain "$drain_msgs" "$drain_sessions" "$drain_limit" >>"$results" || say "load drain failed"
noise
# The same drain with the state dir on a fresh ext4 made with mkfs's defaults (a journal, no online discard), as
# a Debian install has it, loop-mounted from a file: where the machine's own filesystem has unusual options (this
# VM's has no journal and `discard`, which makes every unlink wait for the disk), this row shows what they cost.
if truncate -s 4G "$bench/ext4.img" && mkfs.ext4 -q -F "$bench/ext4.img" && mkdir -p "$bench/ext4" &&
  mount -o loop "$bench/ext4.img" "$bench/ext4" 2>/dev/null; then
  say "forward drain again, state dir on a default ext4 (loop-mounted)"
  RELAY_BENCH_DIR=$bench/ext4 timeout 900 "$load_bin" drain "$drain_msgs" "$drain_sessions" "$drain_limit" |
    sed 's/^/loop_/' >>"$results" || say "load drain on the loop-mounted ext4 failed"
  umount "$bench/ext4"
  noise
else
  say "cannot loop-mount an ext4 image here: the drain on a default ext4 is left out"
fi
rm -f "$bench/ext4.img"
# The same drain into aiosmtpd (a third-party Python server, the kind of local sink the issue measured its
# ceiling against), its own ceiling measured the same way.
if python3 -c 'import aiosmtpd' 2>/dev/null; then
  say "forward drain into the aiosmtpd sink"
  timeout 900 "$load_bin" drain "$drain_msgs" "$drain_sessions" "$drain_limit" aiosmtpd |
    sed 's/^/aio_/' >>"$results" || say "load drain into aiosmtpd failed"
  noise
fi
say "one ${big_mib} MiB message"
timeout 600 "$load_bin" big "$big_mib" >>"$results" || say "load big failed"
noise

record "machine_load_end $(cut -d' ' -f1-3 /proc/loadavg)"
record "finished $(date -u +%FT%TZ)"
record "noise $noise_busy $noise_samples $noise_max"

# --- the table -------------------------------------------------------------------------------------------------
python3 - "$results" "${quick:+quick}" <<'PY'
import re, statistics, sys

results, quick = sys.argv[1], len(sys.argv) > 2 and sys.argv[2] == "quick"
vals, notes = {}, []
for line in open(results):
    line = line.rstrip("\n")
    if not line:
        continue
    if "=" in line.split(" ")[0]:
        k, v = line.split("=", 1)
    else:
        k, _, v = line.partition(" ")
    if k == "note":
        notes.append(v)
    vals.setdefault(k, []).append(v)

def one(k, default="?"):
    return vals.get(k, [default])[-1]

def nums(k):
    return [int(v) for v in vals.get(k, []) if re.fullmatch(r"\d+", v)]

def fmt(n):
    return f"{n:,}"

def series(k):
    vs = vals.get(k, [])
    return " / ".join(fmt(int(v)) if re.fullmatch(r"\d+", v) else v for v in vs) or "—"

def ratio(a, b):
    a, b = nums(a), nums(b)
    if not a or not b:
        return None
    return statistics.median(a) / statistics.median(b)

def mib(kib):
    return f"{int(kib) / 1024:.1f} MiB" if re.fullmatch(r"\d+", str(kib)) else "?"

rows = []
def accept_row(label, s, target):
    r = ratio(f"accept_s{s}_relay", f"accept_s{s}_postfix")
    verdict = "" if r is None or target is None else (" (met)" if r >= target else " (**not met**)")
    rows.append((label, series(f"accept_s{s}_relay") + " msg/s", series(f"accept_s{s}_postfix") + " msg/s",
                 "—" if r is None else f"{r:.2f}×", (f"≥ {target}×" if target else "—") + verdict))

accept_row("accept, 1 session (`-s 1 -m 3000`)", 1, 2)
accept_row("accept, 20 sessions (`-s 20 -m 20000`)", 20, 4)
accept_row("accept, 100 sessions from one address (`-s 100 -m 20000`; relay's `max_connections_per_client` raised to 150)", 100, None)
rows.append(("smtp-source against smtp-sink (keeps nothing, no disk): the load generator's ceiling",
             f"1 session {series('sink_s1')}, 20 sessions {series('sink_s20')} msg/s", "", "", ""))
auth = nums("auth_rate")
auth_failed = sum(nums("auth_failed"))
rows.append(("fresh connection + EHLO + AUTH PLAIN + one message each, 20 sessions (`load auth`; default limits and failure throttling)",
             series("auth_rate") + " msg/s" + (f", {auth_failed} failed" if auth_failed else ""), "—", "—",
             "≥ 4,000 msg/s" + ("" if not auth else (" (met)" if statistics.median(auth) >= 4000 else " (**not met**)"))))
drain, sink = nums("drain_rate"), nums("sink_rate")
dr = drain[-1] / sink[-1] if drain and sink and sink[-1] else None
drain_note = one("drain_note", "")
rows.append((f"forward: drain {fmt(int(one('drain_queued', '0') or 0))} queued messages into a local XOAUTH2 sink (`load drain`)",
             f"{series('drain_rate')} msg/s over {one('drain_connections')} upstream connections, BDAT (the sink offers CHUNKING, as Microsoft 365 and Gmail do)"
             f" ({one('drain_delivered')} delivered{'; ' + drain_note if drain_note else ''})",
             f"sink's own ceiling: {series('sink_rate')} msg/s (`smtp-source -s 4 -d`, DATA)",
             "—" if dr is None else f"{dr:.2f}× the sink" if dr >= 0.1 else f"{dr:.3f}× the sink",
             "≥ 0.8× the sink" + ("" if dr is None else (" (met)" if dr >= 0.8 else " (**not met**)"))))
ldrain, lsink = nums("loop_drain_rate"), nums("loop_sink_rate")
if ldrain and lsink and lsink[-1]:
    lr = ldrain[-1] / lsink[-1]
    rows.append(("forward: the same drain with the state dir on a fresh ext4 with mkfs's defaults (journal, no online discard), loop-mounted from a file",
                 f"{series('loop_drain_rate')} msg/s ({one('loop_drain_delivered')} delivered)",
                 f"sink's own ceiling: {series('loop_sink_rate')} msg/s",
                 f"{lr:.2f}× the sink", "(for comparison)"))
adrain, asink = nums("aio_drain_rate"), nums("aio_sink_rate")
if adrain and asink and asink[-1]:
    ar = adrain[-1] / asink[-1]
    anote = one("aio_drain_note", "")
    rows.append(("forward: the same drain into aiosmtpd (`load drain … aiosmtpd`: a third-party Python server offering XOAUTH2 without PIPELINING or CHUNKING, the kind of sink the issue measured at 1,167–1,344 msg/s)",
                 f"{series('aio_drain_rate')} msg/s over {one('aio_drain_connections')} upstream connections, DATA"
                 f" ({one('aio_drain_delivered')} delivered{'; ' + anote if anote else ''})",
                 f"sink's own ceiling: {series('aio_sink_rate')} msg/s (`smtp-source -s 4 -d`)",
                 f"{ar:.2f}× the sink", "(for comparison; ≥ 0.8× " + ("met" if ar >= 0.8 else "not met") + " against this sink)"))
hwm = [int(v) for k in ("hwm_s20_relay", "hwm_s100_relay") for v in vals.get(k, []) if v.isdigit()]
big = one("big_hwm_kib")
big_ok = big.isdigit() and int(big) / 1024 <= 61
rows.append(("relay RSS: idle (2 s after start, with an account) / under load (VmHWM, 20 and 100 sessions, worst round) / peak relaying one 30 MiB message (VmHWM)",
             f"{mib(one('idle_rss_kib'))} / {mib(max(hwm)) if hwm else '?'} / {mib(big)}"
             + ("" if one("big_relayed") == "1" else " (the 30 MiB message was not relayed)"),
             "—", "—", "30 MiB: ≤ 61 MiB" + ("" if not big.isdigit() else (" (met)" if big_ok else " (**not met**)"))))

busy, samples, peak = (vals.get("noise", ["0 0 0"])[-1].split() + ["0", "0", "0"])[:3]
quiet = busy == "0"
out = ["| figure | relay | Postfix 3.7 (delivery held) | ratio (medians) | target |",
       "| --- | --- | --- | --- | --- |"]
out += [f"| {' | '.join(r)} |" for r in rows]
out.append("")
out.append(f"Run {one('started')} to {one('finished')} (UTC), commit `{one('commit')}`, Postfix {one('postfix_version')}. "
           f"Machine: {one('machine_nproc')} CPUs ({one('machine_cpu')}), kernel {one('machine_kernel')}, "
           f"state dirs on {one('machine_fs')}. Load average {one('machine_load_start')} at the start, "
           f"{one('machine_load_end')} at the end. "
           + (f"Quiet: between measurements (nothing of the benchmark running) the CPUs were at most {peak}% busy "
              f"({samples} one-second checks)."
              if quiet else f"**Noisy run**: between measurements, when nothing of the benchmark runs, other programs "
                            f"kept the CPUs over 15% busy in {busy} of {samples} one-second checks (up to {peak}%); "
                            "read the ratios of neighbouring rounds rather than the absolute figures."))
for n in notes:
    out.append("")
    out.append(f"Note: {n}.")
if one("auth_first_error", ""):
    out.append("")
    out.append(f"First AUTH failure: `{one('auth_first_error')}`.")
table = "\n".join(out)
print(table)
if quick:
    print("\n(RELAY_BENCH_QUICK: not recorded in BENCHMARKS.md)", file=sys.stderr)
    sys.exit(0)
path = "BENCHMARKS.md"
doc = open(path).read()
open_m, close_m = "<!-- side-by-side -->", "<!-- /side-by-side -->"
if open_m in doc and close_m in doc:
    a, b = doc.index(open_m), doc.index(close_m)
    doc = doc[:a] + open_m + "\n" + table + "\n" + doc[b:]
else:
    doc += "\n" + open_m + "\n" + table + "\n" + close_m + "\n"
open(path, "w").write(doc)
print(f"\nrecorded in {path}", file=sys.stderr)
PY
