import time, functools
def run(job):
    import distrain.launch.worker as w
    from distrain.train import trainer as T
    import torch.distributed as dist
    marks = [("start", time.time())]
    def wrap(obj, name):
        f = getattr(obj, name)
        @functools.wraps(f)
        def g(*a, **k):
            t = time.time(); r = f(*a, **k); marks.append((name, time.time() - t)); return r
        setattr(obj, name, g)
    wrap(w, "init_distributed"); wrap(w, "agree"); wrap(T.Trainer, "__init__"); wrap(T.Trainer, "train_step")
    wrap(T.Trainer, "evaluate") if hasattr(T.Trainer, "evaluate") else None
    import distrain.checkpoint.dcp as d
    for n in dir(d.Checkpointer) if hasattr(d, "Checkpointer") else []:
        if n in ("save", "wait", "load"): wrap(d.Checkpointer, n)
    t0 = time.time(); s = w.run(job); total = time.time() - t0
    from collections import defaultdict
    agg = defaultdict(float)
    for n, v in marks[1:]: agg[n] += v
    return {"total": round(total, 2), **{k: round(v, 2) for k, v in agg.items()}}
