"""``python -m tests.dist.cluster_analyze STORE OUT``: H4's analyze stage on a 2-worker dask LocalCluster
(separate processes), printing the report as JSON on the last line. A script, because
``LocalCluster(processes=True)`` needs a ``__main__`` guard."""

import json
import sys

if __name__ == "__main__":
    from distributed import LocalCluster

    from loca_pipe.stages.analyze import AnalyzeParams, run as analyze

    store, out = sys.argv[1], sys.argv[2]
    with LocalCluster(processes=True, n_workers=2, threads_per_worker=1, dashboard_address=None,
                      host="127.0.0.1") as cluster:
        rep = analyze(AnalyzeParams(store=store, out=out, tau=4.0, alpha=(0.9, 0.95), figures=False, samples=True,
                                    scheduler=cluster.scheduler_address))
    print(json.dumps({"teachers": rep["teachers"]}, default=str))
