"""Ray executor overhead on a connected Ray instance (start-up excluded): python bench/data_ray_overhead.py local|ray"""
import json, os, sys, tempfile, time
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
from lmforge.data.stage import Config, run
from lmforge.data import ray_executor
ex = sys.argv[1]
cfg = Config(inputs=["data/demo/books", "data/demo/jsonl", "data/demo/html"], shards=4, workers=1, executor=ex, minhash=True, line_dedup=True)
if ex == "ray":
    ray_executor.connect(None, 1)
t = time.time(); run(cfg, os.path.join(tempfile.gettempdir(), f"lmforge-ray-overhead-{ex}"), force=True); total = time.time() - t
st = json.load(open(f"/tmp/cmp/prof-{ex}/stats.json"))
print(ex, "total", round(total, 1), "phase1", st["timing"]["phase1_seconds"], "all", st["timing"]["seconds"], os.getloadavg()[0])
