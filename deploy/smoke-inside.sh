#!/usr/bin/env bash
# The demo's workload against a running compose stack, from a one-off client container on the
# stack's network (deploy/compose.sh smoke runs it): three high-priority requests streamed and
# followed live over Redis pub/sub, eight low-priority tickets and the nightly documents job
# through the batch path (beat flushes and polls), then the cost report. Exit 0 only when every
# request in the stack's database succeeded.
set -euo pipefail
MODEL=${SMOKE_MODEL:-sheepdog-mini}
TIMEOUT=${SMOKE_TIMEOUT_S:-300}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

json() { python -c "import json, sys; d = json.load(sys.stdin); print($1)"; }
total_before=$(sheepdog status --json | json 'd["total"]')

echo "== high priority: streamed, followed live"
prompts=(
  "A customer asks why their invoice doubled this month. Draft a short, friendly reply."
  "Explain in two sentences what a dead-letter queue is, for a new on-call engineer."
  "Suggest three names for an internal tool that routes LLM requests by priority."
)
for i in "${!prompts[@]}"; do
  echo "> ${prompts[$i]}"
  # --follow prints the id, then the answer as it streams; non-zero unless it succeeded.
  sheepdog submit --model "$MODEL" --priority high --tenant support --max-tokens 120 \
    --prompt "${prompts[$i]}" --follow | tee "$work/stream-$i"
  rid=$(head -1 "$work/stream-$i")
  sheepdog status "$rid" --json | json '"  %s %s, %s in / %s out, $%s" % (d["id"], d["status"], d["usage"]["prompt_tokens"], d["usage"]["completion_tokens"], d["cost_usd"])'
done

echo "== low priority: tickets and the nightly documents job, through the batch path"
for t in \
  "Password reset email never arrives for user on the EU cluster." \
  "Export to CSV cuts off summaries after the first line break." \
  "Dashboard shows yesterday's spend as zero between 00:00 and 00:15 UTC." \
  "Mobile app logs users out after the 4.2 update." \
  "Webhook retries hammer the partner endpoint after a 500." \
  "Search returns archived pages above current ones." \
  "Invoice PDF shows the wrong VAT number for Austrian customers." \
  "Batch job stuck in validating for six hours."; do
  T="$t" M="$MODEL" python -c 'import json, os; print(json.dumps({"model": os.environ["M"], "priority": "low", "max_tokens": 80, "metadata": {"tenant": "triage"}, "messages": [{"role": "user", "content": "Summarise and tag this ticket: " + os.environ["T"]}]}))'
done >"$work/tickets.jsonl"
tickets=$(sheepdog submit --file "$work/tickets.jsonl" | wc -l)
echo "submitted $tickets low-priority tickets"
docs=$(sheepdog documents scan --json | json 'd["requests"]')
echo "documents scan: $docs requests enqueued"
expected=$((total_before + ${#prompts[@]} + tickets + docs))

deadline=$((SECONDS + TIMEOUT))
while :; do
  line=$(sheepdog status --json | json '"%d %d %s" % (d["total"], sum(n for r in d["by_route"].values() for s, n in r.items() if s in ("succeeded", "failed", "cancelled")), json.dumps(d["by_route"], sort_keys=True))')
  read -r total ended counts <<<"$line"
  [ "$line" = "${last:-}" ] || echo "  $ended/$expected ended: $counts"
  last=$line
  [ "$total" -ge "$expected" ] && [ "$ended" -eq "$total" ] && break
  [ $SECONDS -lt $deadline ] || { echo "smoke: not every request ended within ${TIMEOUT}s" >&2; exit 1; }
  sleep 3
done

echo "== batches"
sheepdog batches
echo "== documents"
sheepdog documents status
echo "== costs"
sheepdog costs --by route

summary=$(sheepdog status --json)
succeeded=$(json 'sum(r.get("succeeded", 0) for r in d["by_route"].values())' <<<"$summary")
total=$(json 'd["total"]' <<<"$summary")
if [ "$succeeded" -eq "$total" ] && [ "$total" -ge "$expected" ]; then
  echo "smoke: all $total requests succeeded"
else
  echo "smoke: $succeeded of $total requests succeeded" >&2
  exit 1
fi
