#!/usr/bin/env bash
# The issue's benchmark: Postfix's smtp-source against a release build of relay.
#   benches/smtp-source.sh            (needs smtp-source: apt-get install postfix)
# 20 concurrent sessions, 20000 messages of 4 KiB, each fsynced before its 250. Writes the figure into
# BENCHMARKS.md between the smtp-source markers. STATE (default: a fresh directory under /var/tmp) picks the
# filesystem measured. The queue is left in place (its path is printed): on ext4 without a journal, inodes freed
# in the last minutes are skipped by the allocator, so deleting 20,000 files right before the next run slows that
# run's file creation several times over. Delete old runs a few minutes before measuring.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v smtp-source >/dev/null || { echo "smtp-source not found: apt-get install postfix" >&2; exit 1; }
cargo build --release --quiet
state=${STATE:-/var/tmp/relay-bench-$$}
port=${PORT:-2700}
conf=$(mktemp)
trap 'kill $pid 2>/dev/null || true; rm -f "$conf"' EXIT
cat > "$conf" <<TOML
state_dir = "$state"
[[listener]]
address = "127.0.0.1:$port"
auth = "none"
TOML
RUST_LOG=warn target/release/relay serve --config "$conf" &
pid=$!
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
start=$(date +%s.%N)
smtp-source -s 20 -m 20000 -l 4096 -f bench@example.com -t sink@example.com 127.0.0.1:$port
end=$(date +%s.%N)
queued=$(find "$state/queue" -name '*.msg' | wc -l)
rate=$(echo "20000 / ($end - $start)" | bc)
line="$rate messages/s: smtp-source -s 20 -m 20000 -l 4096, $queued queued, state on $(df --output=fstype "$state" | tail -1) ($(date -u +%FT%TZ))"
echo "$line"
echo "queue left in $state"
python3 - "$line" <<'PY'
import sys, re
p = "BENCHMARKS.md"
t = open(p).read()
t = re.sub(r"(<!-- smtp-source -->\n).*?(\n<!-- /smtp-source -->)", lambda m: m.group(1) + sys.argv[1] + m.group(2), t, flags=re.S)
open(p, "w").write(t)
PY
