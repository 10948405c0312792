#!/usr/bin/env bash
# How well run_train_clip.sh keeps an 8-GPU server busy with a mixed sweep: 1-GPU and 2-GPU jobs with
# different memory needs, on the scenario of two NVLink quads of 80 GB GPUs, packed by memory
# (--need-mem per config) and, for comparison, one job a GPU (JOBS_PER_GPU=1, no packing). Prints figures;
# asserts nothing.
#   bash bench/packing.sh
# Figures: the busy period (first start to last end); GPU utilization = GPU-seconds with at least one job
# on the GPU / (8 x the busy period) (target >= 0.9 when packed); the makespan against a lower bound:
# max(longest job, the work divided by the capacity), where work is duration x GPUs (x memory share of
# an 80 GB GPU when packed); and the most memory any GPU ever had in use against its total (never above).
set -Eeuo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
TMP=$(mktemp -d /tmp/mgpu-bench.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
export MGPU_LOCK_DIR=$TMP/locks FAKE_TRAIN_RECORD=$TMP/record.tsv FAKE_MEM_RECORD=$TMP/mem.txt MGPU_POLL_MS=200

# The trainer: sleeps --sleep seconds using --mem MiB on each of its GPUs (through the fake trainer).
cat >"$TMP/trainer" <<'SH'
#!/usr/bin/env bash
while (($#)); do case $1 in --sleep) sleep_s=$2 ;; --mem) mem=$2 ;; esac; shift; done
FAKE_TRAIN_SLEEP=$sleep_s FAKE_TRAIN_MEM_MIB=$mem exec "$MGPU_BENCH_ROOT/tests/fakes/fake-trainer"
SH
chmod +x "$TMP/trainer"
export MGPU_BENCH_ROOT=$ROOT

# 16 one-GPU jobs needing 20 GiB, 8 two-GPU jobs needing 30 GiB, 1-4 s each
"$PYTHON" - "$TMP" <<'PY'
import json, sys
configs = [{"name": f"one{i}", "image_encoder": "x", "text_encoder": "t", "sleep": 1 + i % 3, "mem": 20480,
            "need_mem": "20G"} for i in range(16)]
configs += [{"name": f"two{i}", "image_encoder": "x", "text_encoder": "t", "sleep": 2 + i % 3, "mem": 30720,
             "need_mem": "30G", "gpus_per_job": 2} for i in range(8)]
json.dump({"configs": configs}, open(f"{sys.argv[1]}/packed.json", "w"))
for c in configs:
    del c["need_mem"]
json.dump({"configs": configs}, open(f"{sys.argv[1]}/one-a-gpu.json", "w"))
PY

run() { # run NAME [settings...] — one sweep on a fresh copy of the scenario
  local name=$1
  shift
  cp "$ROOT/examples/scenarios/8x-h100-2-nvlink-quads.json" "$TMP/gpus.json"
  : >"$FAKE_TRAIN_RECORD"
  : >"$FAKE_MEM_RECORD"
  env MGPU_FAKE_GPUS="$TMP/gpus.json" "$@" bash "$ROOT/run_train_clip.sh" --train-cmd "$TMP/trainer" \
    --gpus 0,1,2,3,4,5,6,7 --config-file "$TMP/$name.json" --log-dir "$TMP/logs-$name" --ckpt-dir "$TMP/ckpt-$name" \
    >/dev/null 2>&1
  cp "$FAKE_TRAIN_RECORD" "$TMP/$name.rec"
  cp "$FAKE_MEM_RECORD" "$TMP/$name.mem"
}

run packed
run one-a-gpu JOBS_PER_GPU=1
"$PYTHON" - "$TMP" <<'PY'
import json, sys
tmp = sys.argv[1]
sweep = json.load(open(f"{tmp}/packed.json"))["configs"]
work = {c["name"]: c for c in sweep}
for name, packed in (("packed", True), ("one-a-gpu", False)):
    starts, spans = {}, []
    for line in open(f"{tmp}/{name}.rec"):
        f = line.rstrip("\n").split("\t")
        t = float(f[3].replace(",", "."))
        if f[1] == "start":
            starts[f[0]] = (t, f[2].split(","))
        elif f[1] == "end":
            s, gpus = starts.pop(f[0])
            spans.append((f[0], s, t, gpus))
    first, last = min(s for _, s, _, _ in spans), max(e for _, _, e, _ in spans)
    period = last - first
    busy = 0.0
    for g in map(str, range(8)):
        iv = sorted((s, e) for _, s, e, gpus in spans if g in gpus)
        end = None
        for s, e in iv:
            if end is None or s > end:
                busy += e - s
                end = e
            elif e > end:
                busy += e - end
                end = e
    longest = max(e - s for _, s, e, _ in spans)
    share = lambda c: c["mem"] / 81559 if packed else 1.0
    total = sum((e - s) * len(gpus) * share(work[n]) for n, s, e, gpus in spans)
    bound = max(longest, total / 8)
    peak = max((int(u) / int(t), g) for g, u, t in (l.split() for l in open(f"{tmp}/{name}.mem")))
    print(f"{name:<10} {len(spans)} jobs: busy period {period:6.2f} s, GPU utilization {busy / (8 * period):.3f}, "
          f"makespan / lower bound {period:.2f} / {bound:.2f} = {period / bound:.3f}; "
          f"most memory in use on a GPU: {peak[0] * 100:.1f}% (GPU {peak[1]})")
PY
