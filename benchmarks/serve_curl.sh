#!/usr/bin/env bash
# curl transcript of every route of `tunesmith serve`, including the 400/401/413/429 answers.
#   benchmarks/serve_curl.sh RUN_DIR [PORT]
# Starts the server with two API keys and a rate limit of 6 requests a minute per key, runs each request
# (printing the command and the answer), then stops the server.
set -euo pipefail
RUN=${1:?usage: serve_curl.sh RUN_DIR [PORT]}
PORT=${2:-8765}
URL=http://127.0.0.1:$PORT
KEY=demo-key-0123456789
CFG=$(mktemp -d)
cp -r "$RUN" "$CFG/run"
${PYTHON:-python} - "$CFG/run/config.yaml" <<'PY'
import sys, yaml
path = sys.argv[1]
cfg = yaml.safe_load(open(path))
cfg.setdefault("serve", {}).update(rate_limit_per_minute=6, max_body_bytes=2048)
open(path, "w").write(yaml.safe_dump(cfg, sort_keys=False))
PY
TUNESMITH_API_KEYS="$KEY,scraper-key-0123456789" ${PYTHON:-python} -m tunesmith serve "$CFG/run" --port "$PORT" 2>"$CFG/server.log" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; rm -rf "$CFG"' EXIT
for _ in $(seq 120); do curl -sf "$URL/healthz" >/dev/null && break; sleep 1; done
show() { echo "\$ curl $*"; curl -s -w '\n[HTTP %{http_code}]\n' "$@"; echo; }
AUTH=(-H "Authorization: Bearer $KEY")
JSON=(-H "content-type: application/json")
show "$URL/healthz"
show "$URL/readyz" "${AUTH[@]}"
show -X POST "$URL/v1/classify" "${AUTH[@]}" "${JSON[@]}" -d '{"text": "I still have not received my new card"}'
show -X POST "$URL/v1/classify" "${AUTH[@]}" "${JSON[@]}" -d '{"texts": ["my card was stolen", "what is the exchange rate today?"]}'
show -X POST "$URL/v1/chat/completions" "${AUTH[@]}" "${JSON[@]}" -d '{"messages": [{"role": "user", "content": "Someone stole my card"}]}'
show -X POST "$URL/v1/completions" "${AUTH[@]}" "${JSON[@]}" -d '{"prompt": "How do I top up by bank transfer?", "stream": true}'
show -X POST "$URL/v1/classify" "${JSON[@]}" -d '{"text": "no key"}'
show -X POST "$URL/v1/classify" -H "Authorization: Bearer wrong" "${JSON[@]}" -d '{"text": "wrong key"}'
show -X POST "$URL/v1/classify" "${AUTH[@]}" "${JSON[@]}" -d '{"text": 42, "texts": null}'
python3 -c "print('{\"text\": \"' + 'x' * 5000 + '\"}')" > "$CFG/big.json"
show -X POST "$URL/v1/classify" "${AUTH[@]}" "${JSON[@]}" --data-binary "@$CFG/big.json"
show -X POST "$URL/v1/classify" "${AUTH[@]}" "${JSON[@]}" -d '{"text": "seventh request this minute"}'
show "$URL/metrics" -H "Authorization: Bearer scraper-key-0123456789" -o "$CFG/metrics.txt"
grep -E '^tunesmith_requests_total|^tunesmith_batch_size_count|^tunesmith_predicted_label_total' "$CFG/metrics.txt" || true
