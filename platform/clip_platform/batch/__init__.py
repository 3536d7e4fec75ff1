"""The batch jobs, each a reader -> mapper -> writer testable without Ray. Nothing outside
this package imports it (the demo runner aside): what the jobs share lives in the layers
below (data, encode, index, ray_context).

* `embed`       corpus embedding (jobs/embed.py): `source` (deterministic input shards) ->
                `decode` -> `actor` (encoder actor pool) -> `store` (resumable outputs)
* `knn`         top-k predictions over the cluster (jobs/knn.py)
* `predictions` cn_clip's prediction / annotation files, checked line by line
* `evaluate`    recall@1/5/10 as cn_clip's evaluation.py (jobs/evaluate.py)
* `retrieval`   one split: embed -> KNN both ways -> recall summary (jobs/retrieval_eval.py)
* `zeroshot`    zero-shot classification on Ray Data (jobs/zeroshot.py)
"""
