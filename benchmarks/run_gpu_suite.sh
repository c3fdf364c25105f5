#!/usr/bin/env bash
# Every GPU check and timing in one go (the device gives each command at most 10 minutes):
# the gpu-marked tests, then the benchmarks, each under its own timeout so one failure does not
# hide the rest. Results land in $OUT (or ./gpu-results). Usage: bash benchmarks/run_gpu_suite.sh [parts...]
# parts: tests kda kda_decode mla mla_prefill moe engine prefix_on prefix_off synthetic synthetic_mqar synthetic_mqar16 synthetic_probe demo soak train_tests train fp8 fp8_tests
#   fp8_tiles profile profile_fp8 long_ctx prefill throughput throughput_sweep tc_save tc_restore
#   (default: tests kda_decode engine)
# train_tests (<= 50 s): the training kernels compiled against their references
# train (<= 540 s): benchmarks.train, ours vs transformers + fla at 1b-4k, 1b-32k with checkpointing in both,
#   1b-32k with ours checkpointing every 2nd / 4th layer (the peer every layer, measured once), 1b-32k, 48b-4l-4k (set TRITON_CACHE_AUTOTUNING=1 FLA_CACHE_RESULTS=1: fla's first-use autotuning is ~4 min
#   of the peer's first row)
# fp8_tiles (<= 150 s): the FP8 decode kernels' tile sweep; profile_fp8 (<= 300 s): decode-step profiles, fp8 and bf16
# soak: benchmarks/soak.py on a 48b-a3b-e64 dummy-weight server, 256 clients; startup + traffic + drain +
# report + shutdown bounded to 285 s by --time-budget (traffic up to 200 s), report in $OUT/soak.json.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1  # the benchmarks run as modules from the repository root: no PYTHONPATH needed
# Carried wheels, installed once per machine into /tmp/site when the call carries them: .whl (fla-core and
# transformers, the peers) and .whl_srv (xgrammar, fastapi, uvicorn, pydantic and their needs). The device image
# lacks xgrammar (a core dependency: structured outputs), so the gpu tests need .whl_srv carried too:
# test_structured_output_falls_back_and_agrees[cuda] fails with "structured outputs are unavailable" without it.
wheels=$(ls .whl/*.whl .whl_srv/*.whl 2>/dev/null)
if [ -n "$wheels" ] && [ ! -e /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
    && touch /tmp/site/.installed || echo "installing the carried wheels failed"
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
parts=${*:-tests kda_decode engine}
for part in $parts; do
  echo "=== $part ==="
  case $part in
    # tests: the whole log in $OUT/tests.log (a cut run keeps what pytest printed; -rfE lists every failure's
    #   test id, --tb=short its message)
    tests) timeout 240 python3 -m pytest tests/ops tests/models tests/engine tests/quant -m gpu -q -rfE --tb=short \
        -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -40 ;;
    profile) timeout 200 python3 -m benchmarks.profile_decode --context 4096 --json "$OUT/profile_4k.json" 2>&1 | tail -60 ;;
    # kda (<= 560 s, a call of its own): ours beside fla-core 0.6.0 (install its wheel first; FLA_CACHE_RESULTS=1:
    #   fla's first-use autotuning is ~325 s, untimed), then the decode step with its launch sweep
    kda) timeout 560 python3 -m benchmarks.kda --fla-deadline 450 --decode-deadline 490 --decode-sweep \
      2>&1 | tail -40 ;;  # JSON: $OUT/kda_bench.json
    kda_decode) timeout 150 python3 -m benchmarks.kda_decode --json "$OUT/kda_decode.json" 2>&1 | tail -30 ;;
    # mla (<= 330 s, ~17 s a variant): the default variants are the launches not yet timed on the H200 that compile
    #   without spills for sm_90 (`python -m benchmarks.sm90_compile`-style probes): 64-head programs (32 real heads
    #   + masked padding) with 8 warps lower to warpgroup MMAs reading the tiles from shared memory
    mla) timeout 330 python3 -m benchmarks.mla_decode --shapes 1x4096,1x131072,1x1048576,8x131072 --timeout 80 --variants \
        "${MLA_VARIANTS:-default,s3,bh16,bh64/w8,bh64/w8/bn64,fp8,fp8/bh64/w8,fp8/bn64/w8,fp8/w8/s3}" 2>&1 | tail -45 ;;
    # mla_prefill (<= 150 s): the MLA prefill attention kernel alone under tile configurations (prefill.TILES first),
    #   16K queries over 32K earlier keys and the causal first chunk, TFLOP/s beside a bf16 matmul
    mla_prefill) timeout 150 python3 -m benchmarks.mla_prefill --json "$OUT/mla_prefill.json" 2>&1 | tail -14 ;;
    moe) timeout 150 python3 -m benchmarks.moe 2>&1 | tail -30 ;;
    fp8) timeout 420 python3 -m benchmarks.fp8 --json "$OUT/fp8.json" 2>&1 | tail -60 ;;
    fp8_tests) timeout 170 python3 -m pytest tests/quant -q -p no:cacheprovider 2>&1 | tail -25 ;;
    engine) timeout 330 python3 -m benchmarks.engine_decode --steps 32 --json "$OUT/engine_decode.json" 2>&1 | tail -40 ;;
    prefix_on) timeout 570 python3 -m benchmarks.prefix_cache --modes on --json "$OUT/prefix_cache_on.json" 2>&1 | tail -30 ;;
    prefix_off) timeout 570 python3 -m benchmarks.prefix_cache --modes off --json "$OUT/prefix_cache_off.json" 2>&1 | tail -30 ;;
    # the report's synthetic tasks (<= 585 s, a call of its own): 36 runs (3 tasks x 256..2048 x KDA/GDN/MLA) in six
    #   worker processes, 535 s budget (the settings of docs/synthetic's run)
    synthetic) mkdir -p "$OUT/synthetic"
      timeout 585 python3 -m kimi_linear synthetic --workers 6 --out "$OUT/synthetic" --budget-s 535 2>&1 \
        | tee "$OUT/synthetic/log.txt" | tail -40 ;;
    # synthetic_mqar (<= 585 s, a call of its own): MQAR alone, KDA and GDN at 512 and 1024, four runs at once with
    #   the whole 535 s each (the grid gives a run 1/6 of a worker's time: 700-2,000 steps, where the report trains
    #   2K-20K), up to 20,000 steps: does either mixer leave the uniform-guess plateau given the report's step counts?
    synthetic_mqar) mkdir -p "$OUT/synthetic_mqar"
      timeout 585 python3 -m kimi_linear synthetic --tasks mqar --mixers kda,gdn --lengths 512,1024 --workers 4 \
        --steps 20000 --run-wall-s 530 --budget-s 535 --curves-length 1024 --out "$OUT/synthetic_mqar" 2>&1 \
        | tee "$OUT/synthetic_mqar/log.txt" | tail -30 ;;
    # synthetic_mqar16 (<= 420 s, a call of its own): MQAR with 16 key-value pairs at every length (the count that
    #   both mixers learn at 256 tokens), KDA and GDN at 1024 and 2048: with the recall load fixed, does the longer
    #   distance separate the channel-wise gate from the per-head one?
    synthetic_mqar16) mkdir -p "$OUT/synthetic_mqar16"
      timeout 420 python3 -m kimi_linear synthetic --tasks mqar --mixers kda,gdn --lengths 1024,2048 --mqar-pairs 16 \
        --workers 4 --steps 20000 --run-wall-s 320 --budget-s 330 --curves-length 1024 --out "$OUT/synthetic_mqar16" 2>&1 \
        | tee "$OUT/synthetic_mqar16/log.txt" | tail -30 ;;
    # synthetic_probe (<= 150 s): steps/s of one synthetic run per mixer / length / batch, then 4-16 runs at once
    synthetic_probe) timeout 150 python3 -m benchmarks.synthetic_probe --budget-s 120 --json "$OUT/synthetic_probe.json" 2>&1 | tail -30 ;;
    # the demo model (kimi_linear/tools/demo_model.py) from the prepared corpus + tokenizer in $DEMO_DATA
    # (made here by `python -m kimi_linear.tools.demo_model prepare --out .gpu_synth18/demo_data`, carried along)
    demo) timeout 240 python3 -m kimi_linear.tools.demo_model train --data "${DEMO_DATA:-.gpu_synth18/demo_data}" \
        --out /tmp/kimi_linear_demo_run --results "$OUT/demo" --budget-s 185 2>&1 | tail -60 ;;
    soak) timeout 300 python3 -m benchmarks.soak --preset 48b-a3b-e64 --concurrency 256 --duration 200 --time-budget 285 --startup-timeout 150 --drain-reserve 45 --sample-every 15 --out "$OUT/soak.json" 2>&1 | tail -45 ;;
    train_tests) timeout 50 python3 -m pytest -q -p no:cacheprovider tests/ops/test_conv_train.py tests/ops/test_norm_train.py \
        tests/ops/test_linear_cross_entropy.py tests/models/test_training_forward.py::test_gpu_training_call_matches_cpu 2>&1 | tail -8 ;;
    train) timeout 540 python3 -m benchmarks.train --rows "${TRAIN_ROWS:-1b-4k,1b-32k:gc,1b-32k:gc2,1b-32k:gc4,1b-32k,48b-4l-4k}" --steps 3 \
        --warmup 1 --timeout-per-impl "${TRAIN_TIMEOUT_PER_IMPL:-300}" --out "$OUT/train.json" 2>&1 | grep -v Warning | tail -60 ;;
    # long_ctx (<= 400 s): 1M-context decode, hybrid vs all-MLA, each at the largest batch its cache holds
    long_ctx) timeout 400 python3 -m benchmarks.long_context_throughput --json "$OUT/long_context_throughput.json" 2>&1 | tail -12 ;;
    # prefill (<= 400 s): batch-1 prefill (TTFT, max_tokens=1) of 32K, 128K, 1M random tokens, 48b-a3b (256 experts),
    #   dummy bf16, 16K-token chunks, MFU by metrics.forward_flops (0.258 / 1.955 / 84.6 PFLOP) vs the 989 TFLOP/s
    #   peak and an 8192^3 bf16 matmul timed in the run. Expected on the H200 at ~315 TFLOP/s (the MLA prefill
    #   kernel's rate; 128K took 6.1 s before): build + warm-up ~60-90 s, 32K ~0.8 s, 128K ~6 s, 1M ~270 s (108 s
    #   at 100% of 780 TFLOP/s); ~370 s in all. The JSON is written after each context: a cut run keeps 32K, 128K.
    prefill) timeout 400 python3 -m benchmarks.prefill --json "$OUT/prefill.json" 2>&1 | tail -12 ;;
    # throughput (<= 560 s): the peers' published workloads on the real 256-expert shape, dummy bf16, offline
    #   (`kimi-linear bench throughput`): SGLang's 200 random prompts of 8,000 in / 1,500 out, then 1,024 in /
    #   1,024 out with at most 100 requests running (their concurrency-100 figure; no HTTP in between here)
    throughput) python3 -m kimi_linear init --preset 48b-a3b --no-weights /tmp/kl-48b >/dev/null &&
      timeout 330 python3 -m kimi_linear bench throughput /tmp/kl-48b --load-format dummy --num-prompts 200 \
        --input-len 8000 --output-len 1500 --max-model-len 10240 --output-json "$OUT/throughput_8k.json" 2>&1 | tail -6
      timeout 220 python3 -m kimi_linear bench throughput /tmp/kl-48b --load-format dummy --num-prompts 300 \
        --input-len 1024 --output-len 1024 --max-num-seqs 100 --max-model-len 4096 \
        --output-json "$OUT/throughput_1k_c100.json" 2>&1 | tail -6 ;;
    # throughput_sweep (<= 560 s): SGLang's 8,000 / 1,500 workload under three engine settings, to find what the
    #   12-04 figure (15,617 total tok/s, below the 17,971 of an earlier main) lost: prefix caching off (on by
    #   default since 12-02: KDA state snapshots at block boundaries, chunk ends aligned to blocks, 10% of the
    #   cache memory), async scheduling off, a 16K step token budget (default 8,192: 256 experts see ~256 tokens
    #   each per prefill step)
    throughput_sweep) python3 -m kimi_linear init --preset 48b-a3b --no-weights /tmp/kl-48b >/dev/null &&
      for a in "--no-enable-prefix-caching" "--no-async-scheduling" "--max-num-batched-tokens 16384"; do
        echo "--- $a"; timeout 180 python3 -m kimi_linear bench throughput /tmp/kl-48b --load-format dummy \
          --num-prompts 200 --input-len 8000 --output-len 1500 --max-model-len 10240 $a \
          --output-json "$OUT/throughput_8k_$(echo $a | tr -dc 'a-z0-9').json" 2>&1 | grep -v Generating | tail -3; done ;;
    fp8_tiles) timeout 150 python3 -m benchmarks.fp8_tiles --out "$OUT/fp8_tiles.json" --budget-s 115 2>&1 | tail -14 ;;
    profile_fp8) for q in fp8 bf16; do [ $q = fp8 ] && a="--quantization fp8" || a=""
        timeout 150 python3 -m benchmarks.profile_decode --preset 48b-a3b --context 4096 --top 28 $a \
          --json "$OUT/profile_$q.json" 2>&1 | sed -n '/=== graph/,$p'; done ;;
    # the Triton cache (fla's autotuning is ~4 min of a first call): tc_save writes TRITON_CACHE_DIR into $OUT as
    # parts of <= 15 MiB (the device returns files of at most 16 MiB); copy them into .tc/ (git-ignored) and carry
    # it, then tc_restore (first in the next call's parts) unpacks them
    tc_save) tar czf - -C "$(dirname "${TRITON_CACHE_DIR:-/tmp/tc}")" "$(basename "${TRITON_CACHE_DIR:-/tmp/tc}")" \
        | split -b 15M - "$OUT/tc.tgz.part-" && ls -la "$OUT"/tc.tgz.part-* ;;
    tc_restore) if ls .tc/tc.tgz.part-* >/dev/null 2>&1; then mkdir -p "$(dirname "${TRITON_CACHE_DIR:-/tmp/tc}")"
        cat .tc/tc.tgz.part-* | tar xzf - -C "$(dirname "${TRITON_CACHE_DIR:-/tmp/tc}")" && echo restored; else echo "no .tc/"; fi ;;
    *) echo "unknown part $part" ;;
  esac
done
