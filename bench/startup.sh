#!/usr/bin/env bash
# Time from `serve run deployments:app` to the first answered chat request, and the resident memory
# of the cluster's processes while serving. Run in the project's venv, with no other Ray cluster on
# the machine (the memory figure sums every Ray/Serve process): bash bench/startup.sh
set -m
log=$(mktemp)
t0=$(date +%s.%N)
serve run deployments:app > "$log" 2>&1 &
pid=$!
code=000
for _ in $(seq 1 600); do
  code=$(curl -s -o /tmp/startup_answer.json -w '%{http_code}' http://127.0.0.1:8000/v1/chat/completions \
    -H 'content-type: application/json' \
    -d '{"model":"embedded","messages":[{"role":"user","content":"Tell me about the sea."}],"max_tokens":24,"temperature":0}')
  [ "$code" = "200" ] && break
  sleep 0.5
done
t1=$(date +%s.%N)
echo "first answer after $(echo "$t1 - $t0" | bc) s (http $code)"
cat /tmp/startup_answer.json; echo
ps -eo rss,cmd | grep -E "ray|serve" | grep -v grep | awk '{s+=$1} END {printf "cluster RSS: %.2f GB\n", s/1024/1024}'
kill -INT -"$pid"; sleep 8; kill -9 -"$pid" 2>/dev/null; wait
