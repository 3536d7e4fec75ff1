"""Batch jobs over the cluster, each a reader -> mapper -> writer testable without Ray:

* `embed`       corpus embedding: sharded reader -> decode -> encoder actors -> writers (jobs/embed.py);
                its `encoder` (torch, ONNX Runtime or OpenVINO) also serves zero-shot and Serve
* `embed_source`/`embed_store`  the embed job's deterministic input shards and resumable outputs
* `retrieval`   one split: embed -> KNN both ways -> recall summary (jobs/retrieval_eval.py)
* `features`    feature files (cn_clip JSONL, Parquet shards) read and written
* `topk`        exact top-k with ties broken by id, mergeable across shards
* `faiss_index` approximate indexes chosen by corpus size
* `knn`         top-k predictions over the cluster (jobs/knn.py)
* `predictions` cn_clip's prediction / annotation files, checked line by line
* `evaluate`    recall@1/5/10 as cn_clip's evaluation.py (jobs/evaluate.py)
* `zeroshot`    zero-shot classification on Ray Data (jobs/zeroshot.py)
* `templates`   the Chinese prompt templates
* `runtime`     joining Ray, and task errors back to user errors
"""
