"""Would an HNSW coarse quantizer cut the per-request cost of the served 1M-item IVF-PQ index?

    OMP_NUM_THREADS=1 python bench/coarse_quantizer.py   (after bench_serve.py full runs/bench-serve)

Takes bench_serve's IVF4096,PQ32np index, swaps its flat coarse quantizer for an HNSW32 graph
over the same 4,096 centroids (efSearch 32; the inverted lists are untouched), tunes nprobe to
recall@50 >= 0.95 on validation users (index.tuning.tune_on_validation, as build-index does),
then times Recommender.recommend per request at batch sizes 1..64 against the original,
interleaved in one process (medians of 5 rounds). Prints only; the README quotes its run.
"""
import time, statistics as st, numpy as np, faiss
from pathlib import Path
from retrieval.serving import Recommender, Request, set_threads, load_served_index
from index.tuning import tune_on_validation
set_threads(1)
R = Path("runs/bench-serve")
a = Recommender.load(R/"bundle", R/"indexes/IVF4096_PQ32np", None); a.warm()
idx, man, ch = load_served_index(a.bundle, R/"indexes/IVF4096_PQ32np")
ivf = faiss.extract_index_ivf(idx)
print("quantizer", type(faiss.downcast_index(ivf.quantizer)), ivf.quantizer.metric_type)
cent = ivf.quantizer.reconstruct_n(0, ivf.nlist)
t0 = time.perf_counter()
hq = faiss.IndexHNSWFlat(ivf.d, 32, ivf.quantizer.metric_type)
hq.hnsw.efConstruction = 80
hq.add(cent)
hq.hnsw.efSearch = 32
ivf.quantizer = hq; hq.this.disown(); ivf.own_fields = True
print("hnsw built in", time.perf_counter() - t0)
b = Recommender(a.bundle, idx, man, None, channels=ch); b.warm()
xb = a.model.item_vectors().detach().numpy()
tun = tune_on_validation(idx, a.bundle, xb, 0.95, n=50, max_users=1000)
print("HNSW quantizer tuning", tun.manifest()["tuning"], tun.search_value)
ds = a.dataset
rng = np.random.default_rng(0)
users = [str(ds.user_ids[i]) for i in rng.integers(0, len(ds.user_ids), 4000)]
for B in (1, 4, 16, 64):
    res = {"flat": [], "hnsw": []}
    reps = max(2, 256 // B)
    for rnd in range(5):
        for name, rec in (("flat", a), ("hnsw", b)):
            t0 = time.perf_counter()
            for i in range(reps):
                s = (rnd * reps + i) * B % 3900
                rec.recommend([Request(user=u, n=50) for u in users[s:s+B]])
            res[name].append((time.perf_counter() - t0) / reps / B * 1e6)
    print(f"B={B}: us/request median of 5 rounds: flat quantizer {st.median(res['flat']):.0f}  HNSW quantizer {st.median(res['hnsw']):.0f}", flush=True)
