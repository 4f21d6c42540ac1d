#!/bin/bash
# Plain vLLM with the same 8 adapters on the same GPU: base vs adapter traffic (one engine).
set -u
python3 -m serve_app.models.adapters /tmp/adapters7b --base-model /tmp/mistral7b-dummy --count 8 --rank 16 > $OUT/gen.log 2>&1
MODS=""; NAMES=""
for i in 0 1 2 3 4 5 6 7; do MODS="$MODS mistral-7b-lora-$i=/tmp/adapters7b/mistral7b-dummy-lora-$i"; NAMES="$NAMES mistral-7b-lora-$i"; done
python3 -m vllm.entrypoints.cli.main serve /tmp/mistral7b-dummy --served-model-name mistral-7b-dummy \
  --tokenizer-mode mistral --load-format dummy --max-model-len 4096 --gpu-memory-utilization 0.85 \
  --enable-lora --max-loras 4 --max-lora-rank 16 --max-cpu-loras 8 --lora-modules $MODS \
  --host 127.0.0.1 --port 8100 > $OUT/vllm.log 2>&1 &
PID=$!
for t in $(seq 1 300); do curl -sf http://127.0.0.1:8100/health >/dev/null && break; sleep 1; done
echo "vllm up after ${t}s"
for mode in base lora; do
  extra=""; [ $mode = lora ] && extra="--lora-modules $NAMES"
  python3 -m vllm.entrypoints.cli.main bench serve --backend openai-chat --endpoint /v1/chat/completions \
    --base-url http://127.0.0.1:8100 --model mistral-7b-dummy --tokenizer /tmp/mistral7b-dummy --tokenizer-mode mistral \
    --dataset-name random --random-input-len 512 --random-output-len 128 --ignore-eos \
    --max-concurrency 64 --num-prompts 512 --seed 0 $extra --save-result --result-dir $OUT --result-filename plain-$mode.json \
    > $OUT/bench-$mode.log 2>&1
  echo "== $mode"; grep -E "Output token throughput|Median TTFT|Median TPOT|Failed" $OUT/bench-$mode.log
done
kill $PID; wait $PID 2>/dev/null
